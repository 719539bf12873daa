"""Exact score ratios of a stationary 3-state Markov chain, for SEDD's bound and sampler tests.

absorb: at a [MASK], the ratio of q_t(z with z^i := y) to q_t(z) is r_t p(x^i = y | visible tokens),
so under scale-by-sigma the raw output is log p(y | visible) + log N, whatever sigma is.
uniform: z is the chain observed through the symmetric channel q(y | x) = alpha [y = x] + (1 - alpha)/K
(a hidden Markov model); q(z^i = y | z^{-i}) follows from one forward-backward pass, and the raw
output is its log ratio to the current token's.
"""

import math

import torch
from torch import nn

from dlmtrain import build_module, load_config

P = torch.tensor([[0.8, 0.15, 0.05], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64)
K = 3


def stationary(P):
    w, v = torch.linalg.eig(P.T)
    pi = v[:, torch.argmin((w - 1).abs())].real
    return pi / pi.sum()


PI = stationary(P)


def visible_conditionals(z, mask_id, P=P, pi=PI):
    """p(x^i = . | the unmasked tokens of z) [B, L, K]: only the nearest visible token on each side
    matters, p ~ P^(i-l)[x_l, .] * P^(r-i)[., x_r]."""
    B, L = z.shape
    k = P.shape[0]
    pw = torch.stack([torch.linalg.matrix_power(P, d) for d in range(L + 1)])
    vis = z != mask_id
    idx = torch.arange(L).expand(B, L)
    left = torch.cat([torch.full((B, 1), -1), torch.where(vis, idx, -1).cummax(1).values[:, :-1]], 1)
    right = torch.where(vis, idx, L).flip(1).cummin(1).values.flip(1)
    right = torch.cat([right[:, 1:], torch.full((B, 1), L)], 1)
    zl = z.gather(1, left.clamp_min(0)).clamp_max(k - 1)
    zr = z.gather(1, right.clamp_max(L - 1)).clamp_max(k - 1)
    lv = torch.where((left >= 0)[..., None], pw[(idx - left).clamp_max(L), zl], pi.expand(B, L, k))
    rv = pw.transpose(1, 2)[(right - idx).clamp_max(L), zr]
    rv = torch.where((right < L)[..., None], rv, torch.ones_like(rv))
    p = lv * rv
    return p / p.sum(-1, keepdim=True)


class AbsorbScoreOracle(nn.Module):
    """Raw outputs whose SEDD absorb scores are exact: log p(y | visible) + log K; junk on [MASK]."""

    def __init__(self, P=P):
        super().__init__()
        self.P, self.pi, self.k = P, stationary(P), P.shape[0]
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, z, sigma=None, **kw):
        self.calls.append(z.clone())
        out = torch.full((*z.shape, self.k + 1), 7.0, dtype=torch.float64)  # the [MASK] column must be ignored
        out[..., :self.k] = torch.log(visible_conditionals(z, self.k, self.P, self.pi)) + math.log(self.k)
        return out.float()


class UniformScoreOracle(nn.Module):
    """Raw outputs = the exact log ratios log q_t(z^i = y | z^{-i}) / q_t(z^i | z^{-i}) at noise level sigma."""

    def __init__(self, P=P):
        super().__init__()
        self.P, self.pi, self.k = P, stationary(P), P.shape[0]
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, z, sigma=None, **kw):
        self.calls.append(z.clone())
        B, L = z.shape
        k = self.k
        a = torch.exp(-sigma.double()).reshape(B, 1, 1)
        E = a * torch.eye(k, dtype=torch.float64) + (1 - a) / k  # [B, x, y] = q(z = y | x)
        em = E.transpose(1, 2).gather(1, z[..., None].expand(B, L, k))  # [B, L, x] = q(z^j | x)
        f = torch.empty(B, L, k, dtype=torch.float64)
        b = torch.empty_like(f)
        f[:, 0] = self.pi
        for j in range(L - 1):
            nxt = (f[:, j] * em[:, j]) @ self.P
            f[:, j + 1] = nxt / nxt.sum(-1, keepdim=True)
        b[:, L - 1] = 1.0
        for j in range(L - 2, -1, -1):
            prv = (em[:, j + 1] * b[:, j + 1]) @ self.P.T
            b[:, j] = prv / prv.sum(-1, keepdim=True)
        post = f * b  # p(x^i | z^{-i}), unnormalised
        marg = torch.einsum("blx,bxy->bly", post / post.sum(-1, keepdim=True), E)  # q(z^i = y | z^{-i})
        return torch.log(marg) - torch.log(marg.gather(-1, z[..., None]))


def sedd_module(backbone, *overrides, vocab=K):
    """A SEDD module (tiny config, no EMA) whose backbone is replaced by ``backbone``."""
    cfg = load_config(None, ["model=tiny", f"model.vocab_size={vocab}", "optim.ema=0", "objective=sedd", *overrides])
    module = build_module(cfg)
    module.backbone = backbone
    return module


def sample_chain(n, L, g, P=P):
    pi = stationary(P)
    x = torch.empty(n, L, dtype=torch.long)
    x[:, 0] = torch.multinomial(pi, n, replacement=True, generator=g)
    for i in range(1, L):
        x[:, i] = torch.multinomial(P[x[:, i - 1]], 1, generator=g).squeeze(-1)
    return x


def chain_nll(x, P=P):
    """-log p(x) per row, exactly."""
    lp = torch.log(stationary(P)[x[:, 0]])
    return -(lp + torch.log(P[x[:, :-1], x[:, 1:]]).sum(1))


def chi2_pvalue(counts, probs):
    """Pearson chi-square goodness of fit of ``counts`` to ``probs``; a drawn cell of probability 0 fails."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    exp = probs / probs.sum() * counts.sum()
    assert counts[exp == 0].sum() == 0, "a cell of probability 0 was drawn"
    keep = exp > 0
    stat = ((counts[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = torch.tensor((keep.sum() - 1).item() / 2, dtype=torch.float64)
    return torch.special.gammaincc(df, stat / 2).item()


def exact_pair(i, j, L, fixed=None, P=P):
    """The chain's exact joint of (x_i, x_j) for sequences of length L given fixed positions (enumerated)."""
    k = P.shape[0]
    seqs = torch.cartesian_prod(*[torch.arange(k)] * L)
    lp = -chain_nll(seqs, P)
    keep = torch.ones(len(seqs), dtype=torch.bool)
    for pos, tok in (fixed or {}).items():
        keep &= seqs[:, pos] == tok
    joint = torch.zeros(k, k, dtype=torch.float64)
    joint.index_put_((seqs[keep, i], seqs[keep, j]), lp[keep].exp(), accumulate=True)
    return joint / joint.sum()


def pair_counts(ids, i, j, k=K):
    return torch.bincount(ids[:, i] * k + ids[:, j], minlength=k * k).view(k, k)
