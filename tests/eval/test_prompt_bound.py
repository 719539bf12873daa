"""The prompt-conditioned (SFT) bound against a source whose conditional likelihood is exact.

The source is one stationary Markov chain cut into a prompt (the first LP tokens) and an
answer (the rest): the answer is the chain's continuation of the prompt's last token, so
-log p(answer | prompt) = -sum_j log P[x_{j-1}, x_j] over the answer. The oracle denoiser
returns the chain's exact conditionals given every visible token (prompt included), which
makes the conditional bound tight: its expectation is exactly -log p(answer | prompt).
"""

import math

import pytest
import torch
from oracles import P, V, MarkovOracle, markov_module, markov_nll, sample_markov

from dlmtrain.data.tokenizer import ByteTokenizer
from dlmtrain.eval.bytes import ByteCounter
from dlmtrain.eval.elbo import ELBOAccumulator

torch.set_num_threads(1)
L, LP = 8, 5


def answer_nll(x):
    return -torch.log(P[x[:, LP - 1:-1], x[:, LP:]]).sum(1)


def prompt_mask(n):
    pm = torch.zeros(n, L, dtype=torch.bool)
    pm[:, :LP] = True
    return pm


class Recording(MarkovOracle):
    def __init__(self):
        super().__init__(P, V)
        self.z = []

    def forward(self, z, **kw):
        self.z.append(z.clone())
        return super().forward(z, **kw)


def test_conditional_bound_is_tight_for_the_oracle_and_never_touches_the_prompt():
    m = markov_module()
    m.backbone = oracle = Recording()
    g = torch.Generator().manual_seed(0)
    x = sample_markov(3, L, g)
    reps = 20000
    xs = x.repeat_interleave(reps, 0)
    pm = prompt_mask(len(xs))
    est = m.nelbo(xs, generator=g, prompt_mask=pm).double().view(3, reps)
    mean, se = est.mean(1), est.std(1) / math.sqrt(reps)
    truth = answer_nll(x).double()
    assert ((mean - truth).abs() < 4 * se).all(), (mean, truth, se)
    se_sum = se.pow(2).sum().sqrt()
    # precise enough that a weight 3% off would fail
    assert (mean.sum() - truth.sum()).abs() < 4 * se_sum < 0.03 * truth.sum()
    # the prompt is never corrupted; the answer is, at rate E[1 - alpha(t)] = 1/2
    z = oracle.z[0]
    assert torch.equal(z[pm], xs[pm])
    assert (z[:, LP:] == m.mask_id).double().mean().item() == pytest.approx(0.5, abs=0.01)
    # without the prompt mask it is the bound on the whole sequence: far more
    assert markov_nll(x).sum() > truth.sum() + 5


class JunkOnPrompt(MarkovOracle):
    """The oracle with garbage predictions at prompt positions: an unscored position's
    prediction cannot move the bound."""

    def forward(self, z, **kw):
        out = super().forward(z, **kw)
        out[:, :LP] = torch.randn(out[:, :LP].shape, generator=torch.Generator().manual_seed(5))
        return out


def test_prompt_is_not_scored_and_elbo_eval_counts_answer_tokens_and_bytes():
    g = torch.Generator().manual_seed(1)
    x = sample_markov(64, L, g)
    pm = prompt_mask(64)
    am = torch.ones(64, L, dtype=torch.bool)
    am[-4:] = False  # padding rows of a validation batch
    pm[-4:] = False
    batch = {"input_ids": x, "prompt_mask": pm, "attention_mask": am}
    m = markov_module()
    a = m.elbo_batch(batch, torch.Generator().manual_seed(2), 2)
    m.backbone = JunkOnPrompt(P, V)
    b = m.elbo_batch(batch, torch.Generator().manual_seed(2), 2)
    assert torch.equal(a["nats"], b["nats"])
    assert torch.equal(a["scored"], ~pm & am) and a["nats"][-4:].abs().sum() == 0
    # bits per byte over the answer's bytes only: token i is the byte i (one byte each)
    acc = ELBOAccumulator(4)
    acc.add(a, x, ByteCounter(ByteTokenizer()))
    s = acc.summary()
    assert s["tokens"] == s["bytes"] == 60 * (L - LP) and s["sequences"] == 60
    assert s["nelbo"] == pytest.approx(a["nats"][:60].mean(1).sum().item() / (60 * (L - LP)))
    assert s["bpb"] == pytest.approx(s["nelbo"] / math.log(2))
