"""The masked samplers against oracle denoisers of known sources.

An MDLM whose backbone is replaced by an oracle returning the exact conditionals
p(x^i | revealed tokens) of a known source: an exact sampler must then reproduce the
source. Chi-square tests at fixed seeds, each at significance 1e-3 (p-value > 1e-3 passes);
a negative control shows the same test rejects a sampler that ignores dependencies.
"""

import math

import pytest
import torch
from torch import nn

from dlmtrain import build_module, load_config
from dlmtrain.diffusion.masked import first_hitting_time, reveal_probability
from dlmtrain.diffusion.schedules import SCHEDULES, Schedule, get_schedule
from dlmtrain.errors import ConfigError
from dlmtrain.sampling import sample

K, L = 3, 8  # Markov source: 3 states, sequences of 8 (3^8 = 6561 sequences: enumerable)
P = torch.tensor([[0.8, 0.15, 0.05], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64)
_evals, _evecs = torch.linalg.eig(P.T)
PI = _evecs[:, torch.argmin((_evals - 1).abs())].real
PI = PI / PI.sum()
ALPHA = 1e-3  # significance of every chi-square test here


class MarkovOracle(nn.Module):
    """Exact p(x^i | visible tokens) of the stationary chain (P, PI): only the nearest visible
    token on each side matters, p ∝ (P^(i-l))[x_l, :] * (P^(r-i))[:, x_r]. Records its inputs."""

    def __init__(self, n_max: int = 64):
        super().__init__()
        self.register_buffer("pw", torch.stack([torch.linalg.matrix_power(P, d) for d in range(n_max + 1)]))
        self.inputs = []

    def forward(self, z, sigma=None, segment_ids=None, attention_mask=None):
        self.inputs.append(z.clone())
        B, n = z.shape
        vis = z != K
        idx = torch.arange(n).expand(B, n)
        left = torch.where(vis, idx, -1).cummax(1).values  # nearest visible at or left of i
        left = torch.cat([torch.full((B, 1), -1), left[:, :-1]], 1)  # strictly left
        right = torch.where(vis, idx, n).flip(1).cummin(1).values.flip(1)
        right = torch.cat([right[:, 1:], torch.full((B, 1), n)], 1)  # strictly right
        zl = z.gather(1, left.clamp_min(0)).clamp_max(K - 1)
        zr = z.gather(1, right.clamp_max(n - 1)).clamp_max(K - 1)
        lv = self.pw[(idx - left).clamp_max(n), zl]  # [B, n, K]: P^(i-l)[x_l, :]
        rv = self.pw.transpose(1, 2)[(right - idx).clamp_max(n), zr]  # P^(r-i)[:, x_r]
        lv = torch.where((left >= 0)[..., None], lv, PI.expand(B, n, K))
        rv = torch.where((right < n)[..., None], rv, torch.ones_like(rv))
        p = lv * rv
        out = torch.full((B, n, K + 1), 5.0)  # SUBS must ignore what sits on [MASK]
        out[..., :K] = torch.log(p / p.sum(-1, keepdim=True)).float()
        return out


class IIDOracle(nn.Module):
    def __init__(self, probs):
        super().__init__()
        self.logp = torch.log(torch.as_tensor(probs, dtype=torch.float64)).float()

    def forward(self, z, **kw):
        out = torch.full((*z.shape, len(self.logp) + 1), 5.0)
        out[..., :-1] = self.logp
        return out


def oracle_module(backbone, vocab=K, *extra):
    module = build_module(load_config(None, ["model=tiny", f"model.vocab_size={vocab}", "optim.ema=0", *extra]))
    module.backbone = backbone
    return module


def chi2_pvalue(counts, probs):
    """Pearson chi-square goodness of fit; cells with probability 0 must be empty."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    exp = probs / probs.sum() * counts.sum()
    assert counts[exp == 0].sum() == 0, "a cell of probability 0 was drawn"
    keep = exp > 0
    stat = ((counts[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = torch.tensor((keep.sum() - 1).item() / 2, dtype=torch.float64)
    return torch.special.gammaincc(df, stat / 2).item()


def exact_pair(i, j, fixed=None):
    """The source's exact joint of (x_i, x_j) given the fixed positions (by enumeration)."""
    seqs = torch.cartesian_prod(*[torch.arange(K)] * L)
    lp = torch.log(PI[seqs[:, 0]]) + torch.log(P[seqs[:, :-1], seqs[:, 1:]]).sum(1)
    keep = torch.ones(len(seqs), dtype=torch.bool)
    for pos, tok in (fixed or {}).items():
        keep &= seqs[:, pos] == tok
    joint = torch.zeros(K, K, dtype=torch.float64)
    joint.index_put_((seqs[keep, i], seqs[keep, j]), lp[keep].exp(), accumulate=True)
    return joint / joint.sum()


def pair_counts(ids, i, j):
    return torch.bincount(ids[:, i] * K + ids[:, j], minlength=K * K).view(K, K)


EXACT = [
    ("ancestral", dict(steps=256)),
    ("first_hitting", dict(steps=1)),
    ("confidence", dict(steps=L, confidence="max_prob")),
    ("confidence", dict(steps=L, confidence="margin")),
    ("confidence", dict(steps=L, confidence="neg_entropy")),
    ("semi_ar", dict(steps=512, block_len=3, inner="ancestral")),
    ("semi_ar", dict(steps=L, block_len=3, inner="first_hitting")),
    ("semi_ar", dict(steps=L, block_len=3, inner="confidence")),
]
IDS = [f"{s}-{kw.get('confidence', kw.get('inner', ''))}".rstrip("-") for s, kw in EXACT]
N = 3000


@pytest.mark.parametrize("sampler,kw", EXACT, ids=IDS)
def test_exact_samplers_reproduce_markov_source(sampler, kw):
    # steps: ancestral 256 >> L (simultaneous reveals of neighbours become rare);
    # confidence L (one token per round); first_hitting ignores steps.
    res = sample(oracle_module(MarkovOracle()), N, L, sampler=sampler, seed=1, **kw)
    assert res.ids.shape == (N, L) and res.ids.max() < K
    for i, j in [(0, 1), (3, 4), (6, 7), (2, 5)]:
        p = chi2_pvalue(pair_counts(res.ids, i, j), exact_pair(i, j))
        assert p > ALPHA, (i, j, p)


COND = {0: 2, 4: 1, 7: 0}  # prompt [2], fixed position 4 = 1, suffix [0]


@pytest.mark.parametrize("sampler,kw", EXACT, ids=IDS)
def test_exact_samplers_reproduce_conditionals_given_prompt_suffix_and_fixed(sampler, kw):
    oracle = MarkovOracle()
    res = sample(oracle_module(oracle), N, L, sampler=sampler, prompt_ids=[2], suffix_ids=[0], fixed={4: 1},
                 seed=2, **kw)
    for pos, tok in COND.items():
        assert (res.ids[:, pos] == tok).all()
    # the model saw the conditioning from its first call on
    assert all((z[:, p] == t).all() for z in oracle.inputs for p, t in COND.items())
    for i, j in [(1, 2), (3, 5), (5, 6)]:
        p = chi2_pvalue(pair_counts(res.ids, i, j), exact_pair(i, j, COND))
        assert p > ALPHA, (i, j, p)


def test_the_markov_test_rejects_a_sampler_that_ignores_dependencies():
    # One ancestral step reveals every token at once, each from its marginal: bigrams are
    # products of marginals, which the same chi-square test must reject.
    res = sample(oracle_module(MarkovOracle()), N, L, 1, sampler="ancestral", seed=1)
    assert chi2_pvalue(pair_counts(res.ids, 3, 4), exact_pair(3, 4)) < 1e-6
    assert res.nfe == 1


IID = [0.5, 0.25, 0.15, 0.07, 0.03]


@pytest.mark.parametrize("sampler,kw", EXACT, ids=IDS)
def test_samplers_reproduce_skewed_iid_unigrams(sampler, kw):
    res = sample(oracle_module(IIDOracle(IID), 5), 2000, L, sampler=sampler, seed=3, **kw)
    assert chi2_pvalue(torch.bincount(res.ids.flatten(), minlength=5), torch.tensor(IID)) > ALPHA


@pytest.mark.parametrize("kw,target", [
    (dict(temperature=0.5), [p**2 for p in IID]),  # p^(1/T)
    (dict(top_k=2), [0.5, 0.25, 0, 0, 0]),
    (dict(top_p=0.8), [0.5, 0.25, 0.15, 0, 0]),  # 0.5 + 0.25 < 0.8 <= 0.9
    (dict(float64=False), IID),  # the peers' float32 Gumbel path is fine on a short tail
])
def test_temperature_top_k_top_p_reshape_the_denoiser_distribution(kw, target):
    res = sample(oracle_module(IIDOracle(IID), 5), 2000, L, 1, sampler="first_hitting", seed=4, **kw)
    assert chi2_pvalue(torch.bincount(res.ids.flatten(), minlength=5), torch.tensor(target)) > ALPHA


def test_ancestral_cache_gives_the_same_tokens_with_fewer_network_calls():
    oracle = MarkovOracle()
    module = oracle_module(oracle)
    on = sample(module, 16, L, 400, cache=True, seed=5)
    calls_on = len(oracle.inputs)
    off = sample(module, 16, L, 400, cache=False, seed=5)
    assert torch.equal(on.ids, off.ids)
    assert on.nfe == calls_on < off.nfe == len(oracle.inputs) - calls_on
    assert on.nfe <= 16 * L  # at most one evaluation per revealed token
    # with the cache every evaluation sees a state no earlier evaluation saw
    seen = oracle.inputs[:calls_on]
    assert all(not torch.equal(a, b) for a, b in zip(seen, seen[1:]))


def test_first_hitting_makes_one_network_call_per_free_position():
    oracle = MarkovOracle()
    res = sample(oracle_module(oracle), 5, L, 100, sampler="first_hitting")
    assert res.nfe == len(oracle.inputs) == L
    assert [int((z == K).sum(1).max()) for z in oracle.inputs] == list(range(L, 0, -1))
    oracle.inputs.clear()
    res = sample(oracle_module(oracle), 5, L, 100, sampler="first_hitting", prompt_ids=[0, 1, 2])
    assert res.nfe == len(oracle.inputs) == L - 3


def test_confidence_reveals_everything_in_exactly_steps_rounds():
    oracle = MarkovOracle()
    res = sample(oracle_module(oracle), 5, L, 3, sampler="confidence")
    # 8 free positions in 3 rounds: 3, 3, 2 revealed (remainder first)
    assert res.nfe == 3 and [int((z == K).sum(1).max()) for z in oracle.inputs] == [8, 5, 2]
    assert (res.ids < K).all()
    oracle.inputs.clear()
    res = sample(oracle_module(oracle), 5, L, 50, sampler="confidence")  # steps > free positions: clipped
    assert res.nfe == L


def test_semi_ar_keeps_positions_right_of_the_block_masked():
    oracle = MarkovOracle()
    res = sample(oracle_module(oracle), 4, L, L, sampler="semi_ar", block_len=4, inner="first_hitting")
    assert res.nfe == L
    for z in oracle.inputs[:4]:  # first block: the second is entirely masked
        assert (z[:, 4:] == K).all()
    for z in oracle.inputs[4:]:  # second block: the first is final
        assert (z[:, :4] < K).all() and torch.equal(z[:, :4], res.ids[:, :4])


def test_classifier_free_guidance_sharpens_towards_the_prompt():
    # One free token after the prompt [2]: cond = P[2, :], uncond (prompt masked) = PI, so the
    # guided distribution is P[2]^(1+w) / PI^w, normalised.
    w = 1.5
    oracle = MarkovOracle()
    res = sample(oracle_module(oracle), 20000, 2, 1, sampler="first_hitting", prompt_ids=[2], cfg_scale=w)
    assert res.nfe == 2 == len(oracle.inputs)
    assert (oracle.inputs[1] == K).all()  # the unconditional pass sees the prompt masked
    target = P[2] ** (1 + w) / PI**w
    assert chi2_pvalue(torch.bincount(res.ids[:, 1], minlength=K), target) > ALPHA
    assert chi2_pvalue(torch.bincount(res.ids[:, 1], minlength=K), P[2]) < 1e-6  # and it differs from w = 0


def test_mistakes_are_config_errors():
    module = oracle_module(MarkovOracle())
    with pytest.raises(ConfigError, match="choose one of: ancestral, first_hitting, confidence, semi_ar"):
        sample(module, 2, L, 4, sampler="ddim")
    with pytest.raises(ConfigError, match="inner='semi_ar'"):
        sample(module, 2, L, 4, sampler="semi_ar", inner="semi_ar")
    with pytest.raises(ConfigError, match="cfg_scale"):
        sample(module, 2, L, 4, cfg_scale=1.0)
    with pytest.raises(ConfigError, match="position 0"):
        sample(module, 2, L, 4, prompt_ids=[1], fixed={0: 2})
    with pytest.raises(ConfigError, match="MASK"):
        sample(module, 2, L, 4, prompt_ids=[K])
    with pytest.raises(ConfigError, match="exceed seq_len"):
        sample(module, 2, L, 4, prompt_ids=[0] * 5, suffix_ids=[0] * 4)
    with pytest.raises(ConfigError, match="steps"):
        sample(module, 2, L, 0)


# ---- the reverse-process math ------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_time_of_alpha_inverts_alpha(name):
    s = get_schedule(name)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert torch.allclose(s.time_of_alpha(s.alpha(t)), t, atol=1e-7)
    # the generic bisection agrees with the closed form
    a = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(Schedule.time_of_alpha(s, a), s.time_of_alpha(a), atol=1e-9)


def test_first_hitting_time_is_the_first_reveal_of_the_fine_grid_reverse_process():
    # n masked tokens at t0 run through the ancestral reveal probabilities on a fine grid;
    # the first reveal time must have the law of first_hitting_time (two-sample KS test).
    sched, t0, n, R, steps = get_schedule("cosine"), 0.7, 3, 20000, 1400
    g = torch.Generator().manual_seed(6)
    grid = torch.linspace(t0, 0, steps + 1, dtype=torch.float64)
    a = sched.alpha(grid)
    first = torch.full((R,), float("nan"), dtype=torch.float64)
    for k in range(steps):
        hit = (torch.rand(R, n, generator=g, dtype=torch.float64) < reveal_probability(a[k + 1], a[k])).any(1)
        first = torch.where(hit & first.isnan(), grid[k + 1], first)
    u = torch.rand(R, generator=g, dtype=torch.float64)

    def ks(x, y):
        both = torch.sort(torch.cat([x, y])).values
        cdf = lambda v: torch.searchsorted(torch.sort(v).values, both, right=True) / len(v)  # noqa: E731
        return (cdf(x) - cdf(y)).abs().max().item()

    crit = 1.95 * math.sqrt(2 / R)  # two-sample KS critical value at 0.001
    assert ks(first_hitting_time(sched, torch.tensor(t0), torch.tensor(n), u), first) < crit
    assert ks(first_hitting_time(sched, torch.tensor(t0), torch.tensor(n - 1), u), first) > 3 * crit  # power
