"""The ancestral sampler of D3PM (absorbing, uniform) and UDLM against a known source.

The backbone is the exact Markov-chain denoiser of tests/chain_oracles.py (for uniform noise
the leave-one-out posterior the x0-parameterization calls for), so the reverse chain is the
true one up to positions moving independently within a step: with enough steps the samples
must follow the chain. Pearson chi-square on bigram pairs (x_i, x_j), N = 2000 samples of
length 8 (3^8 sequences: the exact pair laws by enumeration), each test at significance 1e-3;
the negative control shows the same test rejects a one-step sampler.
"""

import pytest
import torch
from chain_oracles import K, ChainOracle, chi2_pvalue, exact_pair

from dlmtrain import build_module, load_config
from dlmtrain.errors import ConfigError
from dlmtrain.sampling import sample

L, N, ALPHA = 8, 2000, 1e-3
PAIRS = [(0, 1), (3, 4), (6, 7), (2, 5)]


def module(objective, *extra):
    m = build_module(load_config(None, ["model=tiny", f"model.vocab_size={K}", "optim.ema=0", f"objective={objective}",
                                        *extra]))
    if m.graph == "absorb":
        m.backbone = ChainOracle("absorb", K + 1, mask_id=m.mask_id)
    elif objective == "udlm":
        m.backbone = ChainOracle("uniform", K, alpha_of=lambda s: torch.exp(-torch.as_tensor(s).double()))
    else:
        abar = m.abar
        m.backbone = ChainOracle("uniform", K, alpha_of=lambda s: abar[torch.as_tensor(s).long().cpu()])
    return m


def pair_counts(ids, i, j):
    return torch.bincount(ids[:, i] * K + ids[:, j], minlength=K * K).view(K, K)


# (objective, overrides, steps): absorbing D3PM over all T = 128 steps and with 64 jumps over
# T = 1000; uniform D3PM (T = 1000) and UDLM (one evaluation per step) on 64-step grids. At
# N = 4000 all of them passed at 32 steps too (the chain is smooth); 1 step fails (below).
CASES = [
    ("d3pm", ["objective.T=128"], 128),
    ("d3pm", [], 64),
    ("d3pm_uniform", [], 64),
    ("udlm", [], 64),
    ("udlm", ["objective.schedule=cosine"], 64),
]
IDS = ["d3pm-absorb-T", "d3pm-absorb-64", "d3pm-uniform-64", "udlm-loglinear-64", "udlm-cosine-64"]


@pytest.mark.parametrize("objective,extra,steps", CASES, ids=IDS)
def test_ancestral_reproduces_the_markov_source(objective, extra, steps):
    m = module(objective, *extra)
    res = sample(m, N, L, steps, sampler="ancestral", seed=1)
    assert res.ids.shape == (N, L) and 0 <= res.ids.min() and res.ids.max() < K
    for i, j in PAIRS:
        p = chi2_pvalue(pair_counts(res.ids, i, j), exact_pair(L, i, j))
        assert p > ALPHA, (i, j, p)
    assert res.nfe == steps  # with 2000 rows some token is revealed in every step

@pytest.mark.parametrize("objective", ["d3pm_uniform", "udlm"])
def test_a_one_step_uniform_sampler_is_rejected(objective):
    # one step from pure noise draws every position from its marginal: independent pairs
    res = sample(module(objective), N, L, 1, sampler="ancestral", seed=1)
    assert chi2_pvalue(pair_counts(res.ids, 3, 4), exact_pair(L, 3, 4)) < 1e-6
    assert res.nfe == 1


COND = {0: 2, 4: 1, 7: 0}  # prompt [2], fixed position 4 = 1, suffix [0]


def conditioned(m, steps, seed):
    m.backbone.record = True
    res = sample(m, N, L, steps, sampler="ancestral", prompt_ids=[2], suffix_ids=[0], fixed={4: 1}, seed=seed)
    m.backbone.record = False
    for pos, tok in COND.items():
        assert (res.ids[:, pos] == tok).all()
    # the model saw the conditioning from its first call on
    assert m.backbone.inputs and all((z[:, p] == t).all() for z in m.backbone.inputs for p, t in COND.items())
    return res


def test_absorbing_conditioning_is_exact():
    res = conditioned(module("d3pm", "objective.T=128"), 128, 2)
    for i, j in [(1, 2), (3, 5), (5, 6)]:
        p = chi2_pvalue(pair_counts(res.ids, i, j), exact_pair(L, i, j, COND))
        assert p > ALPHA, (i, j, p)


@pytest.mark.parametrize("objective", ["d3pm_uniform", "udlm"])
def test_uniform_conditioning_keeps_fixed_tokens_and_pulls_neighbours(objective):
    # Uniform-state denoisers read the fixed tokens as tokens of z_t that might be noise (they
    # never see known-clean tokens in training), so conditioning is approximate: the neighbours
    # of a fixed token must move most of the way from their unconditional law to the conditional.
    res = conditioned(module(objective), 64, 3)
    for pos in (1, 3, 5, 6):
        got = torch.bincount(res.ids[:, pos], minlength=K).double() / N
        cond = exact_pair(L, pos, pos, COND).diagonal()
        free = exact_pair(L, pos, pos).diagonal()
        assert (got - cond).abs().sum() < 0.5 * (free - cond).abs().sum(), (pos, got, cond, free)


def test_absorbing_network_runs_only_in_steps_that_reveal():
    m = module("d3pm")
    res = sample(m, 1, L, 1000, seed=6)
    assert res.nfe <= L
    res = sample(m, 1, L, 1000, prompt_ids=[0, 1, 2], seed=6)
    assert res.nfe <= L - 3 and res.ids[0, :3].tolist() == [0, 1, 2]


def test_options_and_errors():
    m = module("d3pm_uniform", "objective.T=50")
    a = sample(m, 64, L, 50, seed=4)
    assert torch.equal(a.ids, sample(m, 64, L, 50, seed=4).ids)  # same seed, same samples
    assert not torch.equal(a.ids, sample(m, 64, L, 50, seed=5).ids)
    assert sample(m, 64, L, 500, seed=4).nfe == 50  # steps >= T: the T steps of the chain
    greedy = sample(m, 64, L, 10, top_k=1, seed=4).ids  # top_k=1 on p~, then the posterior step
    assert greedy.shape == (64, L)
    assert sample(m, 8, L, 10, float64=False, seed=4).ids.max() < K
    with pytest.raises(ConfigError, match="cfg_scale"):
        sample(m, 8, L, 10, prompt_ids=[1], cfg_scale=1.0)
    with pytest.raises(ConfigError, match="not supported"):
        sample(m, 8, L, 10, sampler="first_hitting")
    # uniform noise puts EOS anywhere: under document masking a row is sampled as one document
    dm = module("udlm", "model.document_mask=true", "model.eos_id=2")
    seen = []
    forward = dm.backbone.forward
    dm.backbone.forward = lambda z, segment_ids=None, **kw: seen.append(segment_ids) or forward(z, **kw)
    sample(dm, 8, L, 10)
    assert len(seen) == 10 and all(s is not None and (s == 0).all() for s in seen)
