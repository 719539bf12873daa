"""Categorical draws and the filters applied before them (dlmtrain/sampling/categorical.py)."""

import math

import pytest
import torch

from dlmtrain.sampling.categorical import confidence, draw, filter_log_probs


def chi2_pvalue(counts, probs):
    counts, probs = counts.double(), probs.double()
    exp = probs / probs.sum() * counts.sum()
    assert counts[exp == 0].sum() == 0, "a token of probability 0 was drawn"
    keep = exp > 0
    stat = ((counts[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    return torch.special.gammaincc(torch.tensor((keep.sum().item() - 1) / 2, dtype=torch.float64), stat / 2).item()


PROBS = torch.tensor([0.4, 0.3, 0.2, 0.09, 0.009, 0.001, 0.0], dtype=torch.float64)


@pytest.mark.parametrize("float64", [True, False])
def test_draws_match_the_probabilities(float64):
    # 200k draws; the 0.001 token expects 200 hits, the 0-probability token none (chi-square, p > 1e-3)
    logp = torch.log(PROBS).expand(200_000, -1)
    ids = draw(logp, torch.Generator().manual_seed(0), float64=float64)
    assert chi2_pvalue(torch.bincount(ids, minlength=7), PROBS) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("float64", [True, False])
def test_only_float64_draws_keep_a_long_tail(float64):
    # 65535 tail tokens of probability 2.4e-8 each (mass 0.0016). The peers' float32 uniforms
    # make E = -log(u) a multiple of 2^-24 ~ 6e-8 near 0 (the Gumbel capped near 16.6), so
    # such a token wins only ~22% as often as it should. At N = 16000 draws an exact sampler
    # hits the tail Poisson(25.2) times, float32 about 5.6 times. The acceptance test
    # |hits - 25.2| < 3 sd rejects an exact sampler with probability ~0.5% and float32 with
    # ~97%. 1e9 noise values or cumulative sums per path: ~15 s each, hence slow.
    V, p_tail, n, chunk = 2**16, 2.4e-8, 16000, 100
    probs = torch.full((V,), p_tail, dtype=torch.float64)
    probs[0] = 1 - p_tail * (V - 1)
    logp = torch.log(probs).expand(chunk, -1)
    g = torch.Generator().manual_seed(2)
    hits = sum(int((draw(logp, g, float64=float64) != 0).sum()) for _ in range(n // chunk))
    lam = n * p_tail * (V - 1)
    assert (abs(hits - lam) < 3 * math.sqrt(lam)) == float64, (hits, lam)


def test_low_temperature_and_top_k_1_give_the_argmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(500, 50, generator=g, dtype=torch.float64) * 2
    logp = torch.log_softmax(logits, -1)
    best = logp.argmax(-1)
    assert torch.equal(draw(filter_log_probs(logp, top_k=1), g), best)
    assert torch.equal(draw(filter_log_probs(logp, temperature=1e-4), g), best)
    assert torch.equal(draw(filter_log_probs(logp, top_k=1, dtype=torch.float32), g, float64=False), best)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=torch.float64)  # sorted: 0.5, 0.3, 0.15, 0.05
    logp = torch.log(probs)
    kept = lambda p: torch.isfinite(filter_log_probs(logp, top_p=p)).nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.4) == [1]  # 0.5 alone reaches 0.4
    assert kept(0.75) == [1, 3]  # 0.5 < 0.75 <= 0.8
    assert kept(0.85) == [1, 2, 3]  # 0.8 < 0.85 <= 0.95
    assert kept(1.0) == [0, 1, 2, 3]
    # the kept set is renormalised: 0.5 / 0.8 and 0.3 / 0.8
    assert torch.allclose(filter_log_probs(logp, top_p=0.75).exp()[[1, 3]], torch.tensor([0.625, 0.375], dtype=torch.float64))


def test_filters_never_revive_masked_entries():
    logp = torch.log_softmax(torch.tensor([1.0, 2.0, float("-inf"), 0.5]), -1)
    for kw in (dict(temperature=5.0), dict(top_k=4), dict(top_p=1.0), dict(temperature=0.1, top_p=0.99)):
        assert filter_log_probs(logp, **kw)[2] == float("-inf")


def test_confidence_scores():
    p = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.4, 0.4, 0.1, 0.1]], dtype=torch.float64)
    logp = torch.log(p)
    assert torch.allclose(confidence(logp, "max_prob"), torch.tensor([0.7, 0.4], dtype=torch.float64))
    assert torch.allclose(confidence(logp, "margin"), torch.tensor([0.5, 0.0], dtype=torch.float64))
    ent = -(p * torch.where(p > 0, logp, torch.zeros_like(p))).sum(-1)
    assert torch.allclose(confidence(logp, "neg_entropy"), -ent)
