"""The MDLM NELBO against sources whose likelihood is known exactly.

A denoiser that outputs the true conditional p(x^i | visible tokens) makes the
continuous-time bound tight: its expectation is exactly -log p(x) for every x. An
estimator whose weight is off by any factor misses that value by the same factor,
which the tests resolve at a fraction of a percent.
"""

import math

import pytest
import torch
from torch import nn

from dlmtrain import build_module, load_config
from dlmtrain.diffusion.masked import corrupt, masked_token_nll, subs_logits, time_weights
from dlmtrain.diffusion.schedules import get_schedule

K = 3  # data vocabulary; [MASK] = K


def markov_chain():
    P = torch.tensor([[0.8, 0.15, 0.05], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64)
    evals, evecs = torch.linalg.eig(P.T)
    pi = evecs[:, torch.argmin((evals - 1).abs())].real
    return P, pi / pi.sum()


class MarkovOracle(nn.Module):
    """True p(x^i | unmasked tokens) of a stationary Markov chain, as logits; [MASK] gets junk."""

    def __init__(self, P, pi):
        super().__init__()
        self.P, self.pi = P, pi
        self.dummy = nn.Parameter(torch.zeros(1))  # modules need a parameter to optimise

    def forward(self, z, sigma=None, segment_ids=None, attention_mask=None):
        B, L = z.shape
        visible = z != K
        out = torch.zeros(B, L, K + 1, dtype=torch.float64)
        for i in range(L):
            left = self.pi.expand(B, K).clone()  # no visible token to the left: stationary
            right = torch.ones(B, K, dtype=torch.float64)  # none to the right: no constraint
            done = torch.zeros(B, dtype=torch.bool)
            for j in range(i - 1, -1, -1):  # nearest visible token on the left
                rows = visible[:, j] & ~done
                if rows.any():
                    left[rows] = torch.linalg.matrix_power(self.P, i - j)[z[rows, j]]
                    done |= rows
            done = torch.zeros(B, dtype=torch.bool)
            for j in range(i + 1, L):
                rows = visible[:, j] & ~done
                if rows.any():
                    right[rows] = torch.linalg.matrix_power(self.P, j - i)[:, z[rows, j]].T
                    done |= rows
            p = left * right
            out[:, i, :K] = torch.log(p / p.sum(-1, keepdim=True))
        out[:, :, K] = 5.0  # SUBS must ignore whatever the model puts on [MASK]
        return out.float()


def log_prob(x, P, pi):
    lp = torch.log(pi[x[:, 0]])
    for i in range(1, x.shape[1]):
        lp = lp + torch.log(P[x[:, i - 1], x[:, i]])
    return lp


def sample_chain(n, L, P, pi, g):
    x = torch.empty(n, L, dtype=torch.long)
    x[:, 0] = torch.multinomial(pi, n, replacement=True, generator=g)
    for i in range(1, L):
        x[:, i] = torch.multinomial(P[x[:, i - 1]], 1, generator=g).squeeze(-1)
    return x


def oracle_module(schedule="loglinear", eps=1e-3, antithetic=True):
    cfg = load_config(None, ["model=tiny", f"model.vocab_size={K}", f"objective.schedule={schedule}",
                             f"objective.eps={eps}", f"objective.antithetic={antithetic}", "optim.ema=0"])
    module = build_module(cfg)
    P, pi = markov_chain()
    module.backbone = MarkovOracle(P, pi)
    return module, P, pi


# the sigma-linear schedule masks most tokens early, so its estimator is noisier
@pytest.mark.parametrize("schedule,rel", [("loglinear", 0.03), ("cosine", 0.03), ("linear", 0.08)])
def test_nelbo_of_true_denoiser_equals_log_likelihood(schedule, rel):
    module, P, pi = oracle_module(schedule)
    g = torch.Generator().manual_seed(0)
    x = sample_chain(3, 6, P, pi, g)
    reps = 20000
    est = module.nelbo(x.repeat_interleave(reps, 0), generator=g).double().view(3, reps)
    mean, se = est.mean(1), est.std(1) / math.sqrt(reps)
    truth = -log_prob(x, P, pi)
    # each sequence unbiased within 4 standard errors ...
    assert ((mean - truth).abs() < 4 * se).all(), (mean, truth, se)
    # ... and the pooled estimate precise enough that a weight off by rel (3%) would fail
    se_sum = se.pow(2).sum().sqrt()
    assert (mean.sum() - truth.sum()).abs() < 4 * se_sum < rel * truth.sum()


def test_reconstruction_branch_with_large_eps_stays_exact_on_iid_source():
    # With eps = 0.4 the t < eps branch (one-shot decoding at eps) carries 40% of the
    # mass; for an i.i.d. source the factorised decoder is exact, so the bound stays tight.
    cfg = load_config(None, ["model=tiny", f"model.vocab_size={K}", "objective.eps=0.4", "optim.ema=0"])
    module = build_module(cfg)
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)

    class IID(nn.Module):
        def forward(self, z, **kw):
            out = torch.zeros(*z.shape, K + 1)
            out[..., :K] = torch.log(pi).float()
            return out

    module.backbone = IID()
    g = torch.Generator().manual_seed(1)
    x = torch.multinomial(pi, 2 * 10, replacement=True, generator=g).view(2, 10)
    reps = 4000
    est = module.nelbo(x.repeat_interleave(reps, 0), generator=g).double().view(2, reps)
    truth = -torch.log(pi[x]).sum(-1)
    se = est.std(1) / math.sqrt(reps)
    assert ((est.mean(1) - truth).abs() < 4 * se).all()
    assert (4 * se < 0.03 * truth).all()


def test_time_weights_below_eps_use_reconstruction_weight():
    s = get_schedule("cosine")
    t = torch.tensor([0.0005, 0.5])
    tau, w = time_weights(t, s, 1e-3)
    assert tau.tolist() == pytest.approx([1e-3, 0.5])
    assert w[0].item() == pytest.approx(1e3)
    assert w[1].item() == pytest.approx(s.weight(torch.tensor(0.5)).item())


def test_subs_zero_mass_on_mask_and_carry_over():
    logits = torch.randn(2, 5, K + 1)
    z = torch.tensor([[0, K, 2, K, 1], [K, K, K, 0, 2]])
    logp = subs_logits(logits, z, K)
    assert torch.isinf(logp[..., K]).all() and (logp[..., K] < 0).all()
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 5))
    carried = z != K
    assert torch.equal(logp.argmax(-1)[carried], z[carried])
    assert (logp.exp().max(-1).values[carried] == 1).all()


def test_masked_token_nll_matches_subs_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, K + 1, generator=g)
    x0 = torch.randint(0, K, (3, 7), generator=g)
    z = corrupt(x0, torch.full((3,), 0.5), K, generator=g)
    nll = masked_token_nll(logits, x0, z, K)
    ref = -subs_logits(logits, z, K).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(nll, ref)
    assert (nll[z != K] == 0).all()


def test_corrupt_rate_and_keep():
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(200, 500, dtype=torch.long)
    keep = torch.zeros_like(x0, dtype=torch.bool)
    keep[:, :10] = True
    z = corrupt(x0, torch.full((200,), 0.3), K, generator=g, keep=keep)
    assert (z[:, :10] == 0).all()
    assert (z[:, 10:] == K).float().mean().item() == pytest.approx(0.3, abs=0.005)
