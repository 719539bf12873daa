"""SEDD's samplers against the exact score ratios of a known source (tests/sedd_oracles.py).

With exact scores both tau-leaping samplers converge to the source as steps grow; at 128 steps
on sequences of 8 the bigram statistics of 3000 samples must pass a chi-square test at
significance 1e-3 (p > 1e-3 passes, fixed seeds), and one step (every token drawn independently
given pure noise) must fail it.
"""

import math

import pytest
import torch
from sedd_oracles import (K, AbsorbScoreOracle, UniformScoreOracle, chi2_pvalue, exact_pair, pair_counts,
                          sedd_module)
from torch import nn

from dlmtrain.diffusion.schedules import LogLinear
from dlmtrain.diffusion.score_entropy import absorb_move_scale
from dlmtrain.errors import ConfigError
from dlmtrain.sampling import sample

L, N, STEPS, ALPHA = 8, 3000, 128, 1e-3
GRAPHS = {
    "absorb": (AbsorbScoreOracle, ["objective=sedd"]),
    "absorb-geometric": (AbsorbScoreOracle, ["objective=sedd", "objective.noise=geometric"]),
    "uniform": (UniformScoreOracle, ["objective=sedd_uniform"]),
    "uniform-loglinear": (UniformScoreOracle, ["objective=sedd_uniform", "objective.noise=loglinear"]),
}
# (absorb, tweedie) draws exactly what (absorb, euler) does: see the test of their coincidence
CASES = [("absorb", "euler"), ("absorb-geometric", "tweedie"), ("absorb-geometric", "euler"), ("uniform", "euler"),
         ("uniform", "tweedie"), ("uniform-loglinear", "tweedie")]


def module(graph):
    oracle, overrides = GRAPHS[graph]
    return sedd_module(oracle(), *overrides)


@pytest.mark.parametrize("graph,sampler", CASES)
def test_samplers_reproduce_the_markov_source(graph, sampler):
    res = sample(module(graph), N, L, STEPS, sampler=sampler, seed=1)
    assert res.ids.shape == (N, L) and 0 <= res.ids.min() and res.ids.max() < K
    assert res.nfe <= STEPS + 1 and (res.nfe == STEPS + 1 or graph.startswith("absorb"))
    for i, j in [(0, 1), (3, 4), (6, 7), (2, 5)]:
        p = chi2_pvalue(pair_counts(res.ids, i, j), exact_pair(i, j, L))
        assert p > ALPHA, (i, j, p)


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_one_step_is_rejected_by_the_same_test(graph):
    res = sample(module(graph), N, L, 1, sampler="tweedie", seed=1)
    assert res.nfe == 2  # the step from t = 1 and the final denoising
    assert chi2_pvalue(pair_counts(res.ids, 3, 4), exact_pair(3, 4, L)) < 1e-6


COND = {0: 2, 4: 1, 7: 0}  # prompt [2], fixed position 4 = 1, suffix [0]


@pytest.mark.parametrize("sampler", ["euler", "tweedie"])
def test_absorb_samplers_reproduce_conditionals_given_prompt_suffix_and_fixed(sampler):
    m = module("absorb")
    res = sample(m, N, L, STEPS, sampler=sampler, prompt_ids=[2], suffix_ids=[0], fixed={4: 1}, seed=2)
    for pos, tok in COND.items():
        assert (res.ids[:, pos] == tok).all()
    assert all((z[:, p] == t).all() for z in m.backbone.calls for p, t in COND.items())  # seen from the first call
    for i, j in [(1, 2), (3, 5), (5, 6)]:
        p = chi2_pvalue(pair_counts(res.ids, i, j), exact_pair(i, j, L, COND))
        assert p > ALPHA, (i, j, p)


@pytest.mark.parametrize("sampler", ["euler", "tweedie"])
def test_uniform_samplers_never_change_conditioning_tokens(sampler):
    m = module("uniform")
    res = sample(m, 200, L, 16, sampler=sampler, prompt_ids=[2], suffix_ids=[0], fixed={4: 1}, seed=3)
    assert len(m.backbone.calls) == 17
    for pos, tok in COND.items():
        assert (res.ids[:, pos] == tok).all()
        assert all((z[:, pos] == tok).all() for z in m.backbone.calls)
    # the free positions did move away from their uniform start (not all equal across samples)
    assert len(torch.unique(res.ids[:, 1])) == K


class IIDScores(nn.Module):
    """Absorb scores of an i.i.d. source: raw = log p + log K at every position."""

    def __init__(self, p):
        super().__init__()
        self.logp = torch.log(torch.as_tensor(p, dtype=torch.float64))
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, z, **kw):
        out = torch.zeros(*z.shape, K + 1, dtype=torch.float64)
        out[..., :K] = self.logp + math.log(K)
        return out.float()


def test_temperature_shapes_the_revealed_values_of_absorb():
    # An i.i.d. source p: with temperature 0.5 every revealed token is drawn from p^2 / sum p^2.
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    res = sample(sedd_module(IIDScores(p)), 1000, L, 16, sampler="euler", temperature=0.5, seed=4)
    counts = torch.bincount(res.ids.flatten(), minlength=K)
    assert chi2_pvalue(counts, p**2) > ALPHA
    assert chi2_pvalue(counts, p) < 1e-6
    top1 = sample(sedd_module(IIDScores(p)), 50, L, 16, sampler="tweedie", top_k=1, seed=4)
    assert (top1.ids == 0).all()


def test_euler_and_tweedie_coincide_for_absorb_with_loglinear_noise():
    # alpha = 1 - t: the Euler reveal probability (t - s) w(t) = (t - s) / t is exactly Tweedie's.
    for t, s in [(1.0, 0.9), (0.5, 0.3), (0.01, 0.001)]:
        assert absorb_move_scale("euler", t, s, LogLinear()) == pytest.approx(absorb_move_scale("tweedie", t, s,
                                                                                                LogLinear()))
    a = sample(module("absorb"), 64, L, 32, sampler="euler", seed=5).ids
    b = sample(module("absorb"), 64, L, 32, sampler="tweedie", seed=5).ids
    c = sample(module("absorb"), 64, L, 32, sampler="ancestral", seed=5).ids
    assert torch.equal(a, b) and torch.equal(b, c)


def test_unsupported_options_are_config_errors():
    with pytest.raises(ConfigError, match="uniform graph"):
        sample(module("uniform"), 4, L, 4, sampler="tweedie", temperature=0.7)
    with pytest.raises(ConfigError, match="cfg_scale"):
        sample(module("absorb"), 4, L, 4, sampler="tweedie", cfg_scale=1.0, prompt_ids=[1])
    with pytest.raises(ConfigError, match="choose one of: euler, tweedie, ancestral"):
        sample(module("absorb"), 4, L, 4, sampler="first_hitting")
