"""Left-to-right sampling for ar: exact with true conditionals, the KV cache changes no token."""

import numpy as np
import pytest
import torch

from dlmtrain import build_module, load_config
from dlmtrain.data.synthetic import stationary
from dlmtrain.errors import ConfigError
from dlmtrain.sampling import sample, supported_samplers

P = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
# chi-square 0.999 quantiles (2 and 8 degrees of freedom): a correct sampler fails one check
# with probability 1e-3; the seeds are fixed, so the test is deterministic.
CHI2_999 = {2: 13.816, 8: 26.124}


def chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def joint(x: torch.Tensor, i: int) -> np.ndarray:
    """Counts of (x_i, x_{i+1}) over the rows, flattened to 9 cells."""
    return np.bincount((x[:, i] * 3 + x[:, i + 1]).numpy(), minlength=9).astype(float)


def real(*extra, V=9, seed=0):
    torch.manual_seed(seed)
    m = build_module(load_config(None, ["objective=ar", "model=tiny", f"model.vocab_size={V}", "optim.ema=0", *extra]))
    with torch.no_grad():
        torch.nn.init.normal_(m.backbone.head.weight, std=0.5)
    return m.eval()


def test_oracle_sampler_reproduces_the_chain_with_and_without_prompt(markov_ar):
    """Independent rows, one statistic per row: x_0 ~ pi, (x_0, x_1) and (x_4, x_5) ~ pi[a] P[a, b];
    after the prompt [2, 0]: x_2 ~ P[0], (x_4, x_5) ~ (P^3)[0, a] P[a, b]; prompt untouched."""
    m = markov_ar(torch.tensor(P))
    pi = stationary(P)
    pair = (pi[:, None] * P).ravel()
    N, L = 3000, 6
    free = sample(m, N, L, steps=1, seed=0)
    x = free.ids
    assert free.nfe == L and x.max() < 3
    stats = [chi2(np.bincount(x[:, 0].numpy(), minlength=3), pi), chi2(joint(x, 0), pair), chi2(joint(x, 4), pair)]
    assert stats[0] < CHI2_999[2] and stats[1] < CHI2_999[8] and stats[2] < CHI2_999[8], stats

    prompted = sample(m, N, L, steps=50, prompt_ids=[2, 0], seed=1)
    y = prompted.ids
    assert prompted.nfe == L - 2  # steps ignored: one evaluation per generated position
    assert (y[:, :2] == torch.tensor([2, 0])).all()
    m3 = np.linalg.matrix_power(P, 3)[0]  # x_4 is three steps after x_1 = 0
    s1 = chi2(np.bincount(y[:, 2].numpy(), minlength=3), P[0])
    s2 = chi2(joint(y, 4), (m3[:, None] * P).ravel())
    assert s1 < CHI2_999[2] and s2 < CHI2_999[8], (s1, s2)
    # and the check has teeth: the unconditional pair law is rejected at (x_2, x_3) after the prompt
    assert chi2(joint(y, 2), pair) > CHI2_999[8]


@pytest.mark.parametrize("doc", [False, True])
def test_kv_cache_gives_the_same_tokens_as_full_passes(doc):
    """Prompts of different lengths per row (fixed prefixes); under document masking EOS (id 0,
    likely among 4 ids) restarts the document in both paths."""
    extra = ["model.document_mask=true", "model.eos_id=0"] if doc else []
    m = real(*extra, V=4 if doc else 9, seed=1)
    fixed = torch.full((4, 24), -1)
    for r, n in enumerate([3, 5, 3, 8]):
        fixed[r, :n] = torch.arange(1, n + 1) % (3 if doc else 8) + 1
    a = sample(m, 4, 24, 1, fixed=fixed, seed=3, temperature=1.3, top_p=0.95)
    b = sample(m, 4, 24, 1, fixed=fixed, seed=3, temperature=1.3, top_p=0.95, cache=False)
    assert torch.equal(a.ids, b.ids) and a.nfe == b.nfe == 24 - 3
    assert torch.equal(a.ids[fixed >= 0], fixed[fixed >= 0])
    if doc:
        assert (a.ids[:, 3:] == 0).sum() >= 3  # documents did end (and restart) along the way


def test_greedy_takes_the_full_pass_argmax():
    m = real(seed=2)
    res = sample(m, 3, 12, 1, sampler="greedy", prompt_ids=[4, 2], seed=5)
    with torch.no_grad():
        best = m.logits(res.ids).argmax(-1)
    assert torch.equal(res.ids[:, 2:], best[:, 2:])
    assert supported_samplers(m) == ["ancestral", "greedy"]


@pytest.mark.parametrize("kw,needle", [
    ({"suffix_ids": [1, 2]}, "cannot condition on later tokens"),
    ({"fixed": {5: 1}}, "cannot condition on later tokens"),
    ({"prompt_ids": [1], "cfg_scale": 1.0}, "cfg_scale"),
    ({"prompt_ids": [9]}, "outside the model's vocabulary"),  # 9 = the start token: never an input of choice
    ({"sampler": "confidence"}, "choose one of: ancestral, greedy"),
])
def test_refusals(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        sample(real(), 2, 8, 1, **kw)
