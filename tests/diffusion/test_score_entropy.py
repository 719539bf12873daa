"""SEDD's bound against a source whose likelihood is known exactly, and its formulas.

With the exact score ratios of a stationary Markov chain (tests/sedd_oracles.py) the complete
bound (DSE integral over [eps, 1] + reconstruction at eps + prior KL) has expectation -log p(x)
up to O(eps^2). Tolerances: each sequence within 4 standard errors, and the pooled estimate
precise enough (4 SE < 3% of -log p(x)) that a weight off by 3% fails, which a negative
control checks.
"""

import math

import pytest
import torch
from sedd_oracles import K, PI, AbsorbScoreOracle, P, UniformScoreOracle, chain_nll, sample_chain, sedd_module
from torch import nn

from dlmtrain import build_module, load_config
from dlmtrain.diffusion.schedules import Geometric, LogLinearFloor
from dlmtrain.diffusion.score_entropy import (absorb_terms, phi, prior_kl, uniform_decoder_log_probs, uniform_dse,
                                              uniform_tweedie_probs)

CONFIGS = {  # name -> (overrides, oracle, repetitions per sequence)
    "absorb-loglinear": (["objective=sedd"], AbsorbScoreOracle, 20000),
    "absorb-geometric": (["objective=sedd", "objective.noise=geometric"], AbsorbScoreOracle, 60000),
    "uniform-geometric": (["objective=sedd_uniform"], UniformScoreOracle, 60000),
    "uniform-loglinear": (["objective=sedd_uniform", "objective.noise=loglinear"], UniformScoreOracle, 40000),
}


def estimate(module, seed=0, n=3, L=6, reps=20000):
    g = torch.Generator().manual_seed(seed)
    x = sample_chain(n, L, g)
    est = module.nelbo(x.repeat_interleave(reps, 0), generator=g).double().view(n, reps)
    return est.mean(1), est.std(1) / math.sqrt(reps), chain_nll(x)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nelbo_of_exact_scores_equals_log_likelihood(name):
    overrides, oracle, reps = CONFIGS[name]
    module = sedd_module(oracle(), *overrides)
    mean, se, truth = estimate(module, reps=reps)
    assert ((mean - truth).abs() < 4 * se).all(), (mean, truth, se)
    se_sum = se.pow(2).sum().sqrt()
    # uniform + loglinear: pi = Unif is not the q_1 marginal, so the bound may exceed -log p(x) by
    # up to the prior KL (1e-6 nats/token at K = 3: far below the resolution here)
    assert (mean.sum() - truth.sum()).abs() < 4 * se_sum < 0.03 * truth.sum()


@pytest.mark.parametrize("name,attr", [("absorb-loglinear", "weight"), ("uniform-geometric", "dsigma")])
def test_a_weight_three_percent_off_is_caught(name, attr):
    overrides, oracle, reps = CONFIGS[name]
    module = sedd_module(oracle(), *overrides)
    right = getattr(module.schedule, attr)
    setattr(module.schedule, attr, lambda t: 1.03 * right(t))
    mean, se, truth = estimate(module, reps=reps)
    assert (mean.sum() - truth.sum()).abs() > 4 * se.pow(2).sum().sqrt()


class Conditionals(nn.Module):
    """MDLM's view of the same oracle: log p(x^i | visible) as logits (SUBS ignores the [MASK] column)."""

    def __init__(self):
        super().__init__()
        self.scores = AbsorbScoreOracle()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, z, **kw):
        return self.scores(z) - math.log(K)


def test_sedd_absorb_and_mdlm_agree_draw_by_draw_with_exact_conditionals():
    # Same times and masks (same generator), exact conditionals vs exact score ratios: the integrands
    # coincide (score_entropy.py docstring), so every draw agrees, not just the expectations.
    sedd = sedd_module(AbsorbScoreOracle())
    mdlm = build_module(load_config(None, ["model=tiny", f"model.vocab_size={K}", "optim.ema=0"]))
    mdlm.backbone = Conditionals()
    x = sample_chain(4, 6, torch.Generator().manual_seed(1)).repeat_interleave(2000, 0)
    a, ta = sedd.nelbo_draws(x, num_samples=2, generator=torch.Generator().manual_seed(5))
    b, tb = mdlm.nelbo_draws(x, num_samples=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ta, tb)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)
    truth = chain_nll(x[::2000])
    mean = a.double().view(4, 2000 * 2).mean(1)
    assert (mean - truth).abs().max() < 0.1 * truth.min()  # sanity: both estimate -log p(x)


def test_sedd_absorb_exceeds_mdlm_by_the_unnormalised_mass_term():
    # For any network, SEDD-absorb = MDLM(softmax(u)) + w phi(log Z) draw by draw, Z = sum_y e^{u_y}.
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = torch.randn(1, 6, K + 1, generator=torch.Generator().manual_seed(0)) * 2 + 0.7
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, z, **kw):
            return self.out.expand(z.shape[0], -1, -1)

    sedd = sedd_module(Fixed())
    mdlm = build_module(load_config(None, ["model=tiny", f"model.vocab_size={K}", "optim.ema=0"]))
    mdlm.backbone = Fixed()
    x = sample_chain(200, 6, torch.Generator().manual_seed(2))
    t = torch.rand(200, generator=torch.Generator().manual_seed(3)) * 0.99 + 0.01
    a = sedd._token_nelbo(x, t, generator=torch.Generator().manual_seed(4))
    b = mdlm._token_nelbo(x, t, generator=torch.Generator().manual_seed(4))
    u = Fixed().out[0, :, :K] - math.log(K)
    excess = phi(torch.logsumexp(u, -1))  # [6]
    masked = b > 0
    expect = b + torch.where(masked, excess / t[:, None], torch.zeros_like(b))  # w = 1/t for alpha = 1 - t
    assert masked.any() and (excess > 0.01).all()
    assert torch.allclose(a, expect, rtol=1e-5, atol=1e-5)


# ---- the formulas against SEDD's own closed forms (OBJECTIVES.md section 2b) ------------------


def test_uniform_dse_matches_seddS_closed_forms():
    g = torch.Generator().manual_seed(0)
    B, L, N = 5, 7, 6
    s_hat = torch.randn(B, L, N, generator=g, dtype=torch.float64) * 2
    x0 = torch.randint(0, N, (B, L), generator=g)
    z = torch.where(torch.rand(B, L, generator=g) < 0.5, x0, torch.randint(0, N, (B, L), generator=g))
    sigma = torch.tensor([1e-3, 0.05, 0.7, 3.0, 12.0], dtype=torch.float64)
    alpha, dsig = torch.exp(-sigma), torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    got = uniform_dse(s_hat, x0, z, alpha, dsig)
    r = (torch.expm1(sigma) / (torch.expm1(sigma) + N))[:, None]
    off = torch.ones_like(s_hat).scatter(-1, z[..., None], 0.0)  # y != z
    sum_exp, sum_s = (s_hat.exp() * off).sum(-1), (s_hat * off).sum(-1)
    s_x = s_hat.gather(-1, x0[..., None]).squeeze(-1)
    clean = sum_exp / N - r * sum_s / N + (N - 1) / N * r * (r.log() - 1)
    moved = sum_exp / N - (sum_s / N + s_x / torch.expm1(sigma)[:, None]) + ((-r.log() - 1) / r - (N - 2)) / N
    want = torch.where(z == x0, clean, moved) * dsig[:, None]
    assert (z != x0).any() and (z == x0).any()
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)


def test_absorb_integrand_matches_seddS_closed_form():
    g = torch.Generator().manual_seed(1)
    B, L, N = 4, 9, 5  # N tokens + [MASK] = N
    raw = torch.randn(B, L, N + 1, generator=g) * 2
    x0 = torch.randint(0, N, (B, L), generator=g)
    z = torch.where(torch.rand(B, L, generator=g) < 0.6, torch.full_like(x0, N), x0)
    sched = Geometric(1e-4, 20.0)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64)
    sigma, dsig = sched.sigma(t), sched.dsigma(t)
    ce, excess = absorb_terms(raw, x0, z, N, N)
    got = sched.weight(t)[:, None] * (ce.double() + excess.double())
    s_hat = raw.double()[..., :N] - torch.log(torch.expm1(sigma))[:, None, None] - math.log(N)  # scale by sigma
    r = (1 / torch.expm1(sigma))[:, None]
    s_x = s_hat.gather(-1, x0[..., None]).squeeze(-1)
    want = dsig[:, None] * (s_hat.exp().sum(-1) - r * s_x + r * (r.log() - 1)) * (z == N)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_phi_is_accurate_near_zero_and_far():
    u = torch.cat([torch.logspace(-8, 1.5, 60), -torch.logspace(-8, 1.5, 60)])
    want = torch.expm1(u.double()) - u.double()
    got = phi(u.float()).double()
    assert torch.allclose(got, want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("graph,a1,N", [("absorb", 1e-3, 7), ("absorb", 2e-9, 50257), ("uniform", 1e-3, 7),
                                        ("uniform", 1e-3, 50258), ("uniform", 0.3, 4)])
def test_prior_kl_against_direct_sum(graph, a1, N):
    if graph == "absorb":  # states: x, the N - 1 other tokens, [MASK]
        q = torch.tensor([a1] + [0.0] * (N - 1) + [1 - a1], dtype=torch.float64)
        pi = torch.tensor([a1 / N] * N + [1 - a1], dtype=torch.float64)
    else:
        q = torch.full((N,), (1 - a1) / N, dtype=torch.float64)
        q[0] += a1
        pi = torch.full((N,), 1.0 / N, dtype=torch.float64)
    keep = q > 0
    direct = (q[keep] * (q[keep] / pi[keep]).log()).sum().item()
    assert prior_kl(graph, a1, N) == pytest.approx(direct, rel=1e-6, abs=1e-15)
    if graph == "uniform" and N == 50258:
        assert prior_kl(graph, a1, N) == pytest.approx(0.00302, abs=5e-6)  # OBJECTIVES.md section 4


def test_uniform_tweedie_step_and_decoder_are_the_exact_reverse_marginals():
    # Brute force over all 3^4 chains: q(x_s^i = y | z_t) and q(x_0^i = y | z_t) at every position.
    L = 4
    seqs = torch.cartesian_prod(*[torch.arange(K)] * L)
    lp = torch.log(PI[seqs[:, 0]]) + torch.log(P[seqs[:, :-1], seqs[:, 1:]]).sum(1)
    z = torch.tensor([[2, 0, 0, 1]])
    sig_t, sig_s = 0.9, 0.25
    chan = lambda s: math.exp(-s) * torch.eye(K, dtype=torch.float64) + (1 - math.exp(-s)) / K  # noqa: E731
    raw = UniformScoreOracle()(z, sigma=torch.tensor([sig_t]))
    step = uniform_tweedie_probs(raw, z, math.exp(-(sig_t - sig_s)))[0]  # [L, K]
    dec = uniform_decoder_log_probs(raw, z, torch.tensor(math.exp(-sig_t)), floor=0.0).exp()[0]
    for i in range(L):
        others = torch.stack([chan(sig_t)[seqs[:, j], z[0, j]] for j in range(L) if j != i]).prod(0)
        w = lp.exp() * others  # p(x0) q(z^{-i} | x0^{-i})
        # x_s^i = y: q_s(y | x0^i) q_{t|s}(z^i | y)
        want_s = torch.stack([(w * chan(sig_s)[seqs[:, i], y] * chan(sig_t - sig_s)[y, z[0, i]]).sum()
                              for y in range(K)])
        want_0 = torch.stack([(w * (seqs[:, i] == y) * chan(sig_t)[y, z[0, i]]).sum() for y in range(K)])
        assert torch.allclose(step[i], want_s / want_s.sum(), atol=1e-10), i
        assert torch.allclose(dec[i], want_0 / want_0.sum(), atol=1e-10), i


@pytest.mark.parametrize("sched", [Geometric(1e-4, 20.0), LogLinearFloor(1e-3)])
def test_sedd_noises_exact_derivatives_and_inverse(sched):
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    h = 1e-6
    fd = (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h)
    assert torch.allclose(sched.alpha_prime(t), fd, rtol=1e-5, atol=1e-9)
    assert torch.allclose(sched.dsigma(t), -sched.alpha_prime(t) / sched.alpha(t), rtol=1e-10)
    assert torch.allclose(sched.weight(t), -sched.alpha_prime(t) / (1 - sched.alpha(t)), rtol=1e-9)
    assert torch.allclose(sched.time_of_alpha(sched.alpha(t)), t, atol=1e-9)
    a01 = sched.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    if isinstance(sched, Geometric):
        assert a01.tolist() == pytest.approx([math.exp(-1e-4), math.exp(-20.0)], rel=1e-12)
    else:
        assert a01.tolist() == pytest.approx([1.0, 1e-3], rel=1e-12)


def test_module_wiring_states_prior_and_padding():
    absorb = sedd_module(AbsorbScoreOracle())
    assert (absorb.mask_id, absorb.n_tokens, absorb.alpha1, absorb.prior_nats) == (K, K, 0.0, 0.0)
    geo = sedd_module(AbsorbScoreOracle(), "objective.noise=geometric")
    assert geo.prior_nats == pytest.approx(math.exp(-20) * math.log(K), rel=1e-9)
    uni = sedd_module(UniformScoreOracle(), "objective=sedd_uniform")
    assert uni.mask_id is None and uni.n_tokens == K
    # padding is neither corrupted nor scored (the uniform DSE is nonzero at clean positions)
    x = sample_chain(2, 6, torch.Generator().manual_seed(0))
    am = torch.ones(2, 6, dtype=torch.bool)
    am[1, 4:] = False
    per_tok = uni._token_nelbo(x, torch.tensor([0.6, 0.6]), am, generator=torch.Generator().manual_seed(0))
    assert (per_tok[1, 4:] == 0).all() and (per_tok[:, :4] != 0).all()
    assert uni.scored_tokens(x, am).tolist() == [6, 4]


def test_config_errors():
    from dlmtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="sigma_min"):
        sedd_module(AbsorbScoreOracle(), "objective.noise=geometric", "objective.sigma_min=30")
    with pytest.raises(ConfigError, match="document_mask=true with objective.graph=uniform"):
        sedd_module(UniformScoreOracle(), "objective=sedd_uniform", "model.document_mask=true", "model.eos_id=0")



class IIDScores(nn.Module):
    """Exact scores of an i.i.d. source p: absorb raw = log p + log K; uniform raw = log m_y - log m_z
    with the noisy marginal m = alpha p + (1 - alpha)/K."""

    def __init__(self, p, graph):
        super().__init__()
        self.p, self.graph = p, graph
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, z, sigma=None, **kw):
        if self.graph == "absorb":
            out = torch.zeros(*z.shape, K + 1, dtype=torch.float64)
            out[..., :K] = torch.log(self.p) + math.log(K)
            return out
        a = torch.exp(-sigma.double())[:, None, None]
        logm = torch.log(a * self.p + (1 - a) / K).expand(*z.shape, K)
        return logm - logm.gather(-1, z[..., None])


@pytest.mark.parametrize("graph,overrides,reps", [
    ("absorb", ["objective=sedd", "objective.eps=0.4"], 6000),
    ("uniform", ["objective=sedd_uniform", "objective.noise=loglinear", "objective.eps=0.7"], 12000),
])
def test_reconstruction_branch_with_large_eps_stays_exact_on_iid_source(graph, overrides, reps):
    # A large eps (sigma(eps) = 0.51 absorb, 1.2 uniform): the one-shot decoder at eps carries the
    # bound below it. For an i.i.d. source the factorised decoder is the exact posterior, so the
    # bound stays tight: this tests the decoders (the uniform one is Tweedie's, t -> 0).
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    module = sedd_module(IIDScores(p, graph), *overrides)
    g = torch.Generator().manual_seed(1)
    x = torch.multinomial(p, 2 * 10, replacement=True, generator=g).view(2, 10)
    est = module.nelbo(x.repeat_interleave(reps, 0), generator=g).double().view(2, reps)
    truth = -torch.log(p[x]).sum(-1)
    se = est.std(1) / math.sqrt(reps)
    assert ((est.mean(1) - truth).abs() < 4 * se).all(), (est.mean(1), truth, se)
    assert (4 * se < 0.03 * truth).all()


def test_uniform_dse_gradient_matches_plain_autograd():
    # the memory-saving custom backward against autograd through the plain formula, in float64
    g = torch.Generator().manual_seed(3)
    B, L, N = 3, 5, 4
    s_hat = (torch.randn(B, L, N, generator=g, dtype=torch.float64) * 2).requires_grad_()
    x0 = torch.randint(0, N, (B, L), generator=g)
    z = torch.where(torch.rand(B, L, generator=g) < 0.5, x0, torch.randint(0, N, (B, L), generator=g))
    alpha = torch.tensor([0.999, 0.6, 0.05], dtype=torch.float64)
    dsig = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    weights = torch.randn(B, L, generator=g, dtype=torch.float64)
    (uniform_dse(s_hat, x0, z, alpha, dsig) * weights).sum().backward()
    r = (1 - alpha) / (1 - alpha + N * alpha)
    s2 = s_hat.detach().clone().requires_grad_()
    ry = torch.where((z == x0)[..., None], r[:, None, None], torch.ones(B, L, N, dtype=torch.float64))
    ry = ry.scatter(-1, x0[..., None], torch.where((z == x0)[..., None], r[:, None, None], 1 / r[:, None, None]))
    plain = (s2.exp() - ry * s2 + ry * (ry.log() - 1)).scatter(-1, z[..., None], 0.0).sum(-1) * (dsig / N)[:, None]
    (plain * weights).sum().backward()
    assert torch.allclose(uniform_dse(s_hat, x0, z, alpha, dsig), plain, rtol=1e-10, atol=1e-12)
    assert torch.allclose(s_hat.grad, s2.grad, rtol=1e-8, atol=1e-10)  # phi's series: ~1e-11
    assert (s_hat.grad.gather(-1, z[..., None]) == 0).all()  # the current state's score gets no gradient
