"""MDLM's LLaDA options in training: random-length truncation and prompt-conditioned batches."""

import math

import pytest
import torch
from torch import nn

from dlmtrain import build_module, load_config
from dlmtrain.diffusion.masked import random_length_mask

torch.set_num_threads(1)
V = 8


def module(*extra):
    torch.manual_seed(0)
    return build_module(load_config(None, ["model=tiny", f"model.vocab_size={V}", "optim.ema=0", *extra]))


class Spy(nn.Module):
    """Wraps a backbone and records what each call saw."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, z, **kw):
        self.calls.append({"z": z.clone(), **kw})
        return self.inner(z, **kw)


def test_random_length_mask_fraction_and_uniform_lengths():
    B, L, f = 200_000, 16, 0.25
    keep = random_length_mask((B, L), f, torch.Generator().manual_seed(0))
    n = keep.sum(1)
    assert torch.equal(keep, torch.arange(L)[None] < n[:, None])  # a prefix of every row
    assert n.min() >= 1
    # P(n = k) = f / L for k < L (cut rows, uniform on 1..L), and 1 - f + f / L for k = L
    p = torch.full((L,), f / L, dtype=torch.float64)
    p[-1] += 1 - f
    counts = torch.bincount(n - 1, minlength=L).double()
    chi2 = ((counts - B * p) ** 2 / (B * p)).sum().item()
    assert chi2 < 40  # 15 degrees of freedom: P(chi2 > 40) ~ 5e-4
    short = (n < L).double().mean().item()  # cut rows that end early: f (L - 1) / L
    assert short == pytest.approx(f * (L - 1) / L, abs=4 * math.sqrt(f * (1 - f) / B))
    again = random_length_mask((B, L), f, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)
    assert not random_length_mask((4, L), 0.0, torch.Generator()).logical_not().any()


def test_truncated_positions_are_never_masked_and_contribute_nothing():
    m = module("objective.random_length_fraction=1.0")
    m.backbone = spy = Spy(m.backbone)
    x = torch.randint(0, V, (16, 24), generator=torch.Generator().manual_seed(1))
    loss = m.loss({"input_ids": x})
    (call,) = spy.calls
    am = call["attention_mask"]
    n = am.sum(1)
    assert torch.equal(am, torch.arange(24)[None] < n[:, None]) and n.min() >= 1 and n.max() <= 24
    assert (n < 24).sum() >= 12  # every row was cut (to a length uniform in 1..24)
    z = call["z"]
    assert torch.equal(z[~am], x[~am])  # padding is never masked
    assert (z[am] == m.mask_id).any()
    # the same step draws the same cuts, times and masks; what lies in the padding does not matter
    y = torch.where(am, x, (x + 3) % V)
    assert m.loss({"input_ids": y}).item() == pytest.approx(loss.item(), rel=1e-6)
    assert torch.equal(spy.calls[1]["attention_mask"], am)
    # the loss is normalised by the tokens kept, not by the full rows
    m.backbone = spy.inner
    per_tok = m._token_nelbo(x, torch.full((16,), 0.5), am, generator=torch.Generator().manual_seed(0))
    assert per_tok[~am].abs().sum() == 0


def test_no_truncation_by_default_and_existing_attention_mask_is_kept():
    m = module()
    m.backbone = spy = Spy(m.backbone)
    x = torch.randint(0, V, (4, 12))
    m.loss({"input_ids": x})
    assert spy.calls[0]["attention_mask"] is None
    m = module("objective.random_length_fraction=0.5")
    m.backbone = spy = Spy(m.backbone)
    am = torch.ones(4, 12, dtype=torch.bool)
    am[:, 9:] = False  # padding the data already had stays padding
    m.loss({"input_ids": x, "attention_mask": am})
    assert not spy.calls[0]["attention_mask"][:, 9:].any()


class ConstantOracle(nn.Module):
    """log p = log 1/2 on id 0 at every position, whatever is visible (a tight bound for all-0 rows)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, z, **kw):
        self.calls.append(z.clone())
        out = torch.full((*z.shape, V + 1), -30.0)
        out[..., 0] = out[..., 1] = 0.0  # p(0) = p(1) = 1/2
        return out


def test_prompt_tokens_never_masked_and_loss_is_per_answer_token():
    m = module()
    m.backbone = oracle = ConstantOracle()
    B, L = 8192, 8
    x = torch.zeros(B, L, dtype=torch.long)
    pm = torch.zeros(B, L, dtype=torch.bool)
    pm[:, :5] = True  # 5 prompt tokens, 2 answer tokens, 1 padding
    am = torch.ones(B, L, dtype=torch.bool)
    am[:, -1] = False
    loss = m.loss({"input_ids": x, "prompt_mask": pm, "attention_mask": am}).item()
    z = oracle.calls[0]
    assert not (z[pm] == m.mask_id).any() and not (z[~am] == m.mask_id).any()
    masked = (z[:, 5:7] == m.mask_id).double().mean().item()
    assert masked == pytest.approx(0.5, abs=0.02)  # answer tokens masked at E[1 - alpha(t)] = 1/2
    # tight bound: ln 2 per answer token; normalised over all 8 positions (or the 7 real ones) it
    # would be 2/8 (2/7) of that. The estimator is heavy-tailed (weight 1/t): 10% is 4 SE or more.
    assert loss == pytest.approx(math.log(2), rel=0.1)
    assert m.scored_mask(x, am, pm).sum(1).tolist() == [2] * B
