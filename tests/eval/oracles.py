"""Denoisers that return the exact conditionals of a known source, and exact bounds for them.

With exact conditionals the continuous-time masked-diffusion bound is tight (its
expectation is -log p(x)), and the discrete T-step bound can be enumerated over masks.
"""

import math
from itertools import product

import torch
from torch import nn

from dlmtrain import build_module, load_config

P = torch.tensor([[0.8, 0.15, 0.05], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64)
V = 3  # Markov vocabulary; [MASK] = V


def stationary(P):
    w, v = torch.linalg.eig(P.T)
    pi = v[:, torch.argmin((w - 1).abs())].real
    return pi / pi.sum()


class MarkovOracle(nn.Module):
    """p(x^i | visible tokens) of a stationary chain: only the nearest visible neighbour on each
    side matters, p ~ P^(i-j)[x_j, .] * P^(k-i)[., x_k]. Vectorised over batch and positions."""

    def __init__(self, P, mask_id):
        super().__init__()
        self.P, self.pi, self.mask_id = P, stationary(P), mask_id
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, z, sigma=None, segment_ids=None, attention_mask=None):
        B, L = z.shape
        k = self.P.shape[0]
        pow_ = torch.stack([torch.linalg.matrix_power(self.P, d) for d in range(L + 1)])  # [L+1, k, k]
        vis = z != self.mask_id
        pos = torch.arange(L).expand(B, L)
        last = torch.where(vis, pos, -1).cummax(1).values  # nearest visible at or left of i
        left = torch.cat([torch.full((B, 1), -1), last[:, :-1]], 1)
        nxt = torch.where(vis, pos, L).flip(1).cummin(1).values.flip(1)
        right = torch.cat([nxt[:, 1:], torch.full((B, 1), L)], 1)
        zl = z.gather(1, left.clamp(min=0)).clamp(max=k - 1)
        lv = pow_[(pos - left).clamp(max=L), zl]  # [B, L, k]
        lv = torch.where((left >= 0)[..., None], lv, self.pi)
        zr = z.gather(1, right.clamp(max=L - 1)).clamp(max=k - 1)
        rv = pow_[(right - pos).clamp(max=L), :, zr]  # [B, L, k]
        rv = torch.where((right < L)[..., None], rv, torch.ones_like(rv))
        p = lv * rv
        out = torch.full((B, L, self.mask_id + 1), float("-inf"), dtype=torch.float64)
        out[..., :k] = torch.log(p / p.sum(-1, keepdim=True))
        out[..., self.mask_id] = 3.0  # SUBS must ignore the [MASK] logit
        return out.float()


class IIDOracle(nn.Module):
    """Every position ~ probs over ``ids`` (the only ids with mass), whatever is visible."""

    def __init__(self, logp_by_id: torch.Tensor):
        super().__init__()
        self.logp = logp_by_id.float()  # [vocab incl. mask]
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, z, **kw):
        return self.logp.expand(*z.shape, -1).clone()


def module_with(backbone, vocab_size, *extra):
    cfg = load_config(None, ["model=tiny", f"model.vocab_size={vocab_size}", "optim.ema=0", *extra])
    m = build_module(cfg)
    m.backbone = backbone
    return m


def markov_module(*extra):
    return module_with(MarkovOracle(P, V), V, *extra)


def sample_markov(n, L, g):
    pi = stationary(P)
    x = torch.empty(n, L, dtype=torch.long)
    x[:, 0] = torch.multinomial(pi, n, replacement=True, generator=g)
    for i in range(1, L):
        x[:, i] = torch.multinomial(P[x[:, i - 1]], 1, generator=g).squeeze(-1)
    return x


def markov_nll(x):
    """-log p(x) per row, exactly."""
    lp = torch.log(stationary(P)[x[:, 0]])
    for i in range(1, x.shape[1]):
        lp = lp + torch.log(P[x[:, i - 1], x[:, i]])
    return -lp


def mask_costs(x, oracle, mask_id):
    """For every mask pattern M of each row of x [N, L]: (|M| [2^L], c [N, 2^L]) with
    c = sum_{i in M} -log p(x^i | the tokens outside M) under SUBS."""
    n, L = x.shape
    pats = torch.tensor(list(product([False, True], repeat=L)))  # [2^L, L]
    xs = x[:, None, :].expand(n, len(pats), L)
    z = torch.where(pats, mask_id, xs).reshape(-1, L)
    logits = oracle(z).double()
    logits[..., mask_id] = float("-inf")
    logp = logits.log_softmax(-1).gather(-1, xs.reshape(-1, L, 1)).view(n, len(pats), L)
    return pats.sum(1).double(), -(logp * pats).sum(-1)


def exact_discrete_bound(x, oracle, mask_id, steps, alpha):
    """L_T per row, enumerated: sum_{i=1}^T sum_M q(M | t_i) w_i c(M), w_i = (a_{i-1} - a_i) / (1 - a_i)."""
    L = x.shape[1]
    m, c = mask_costs(x, oracle, mask_id)
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for i in range(1, steps + 1):
        a_t, a_s = alpha(i / steps), alpha((i - 1) / steps)
        w = 1.0 if i == 1 else (a_s - a_t) / (1 - a_t)
        total += w * (c * (1 - a_t) ** m * a_t ** (L - m)).sum(1)
    return total


def exact_eps_bound(x, oracle, mask_id, eps):
    """Per row, the expectation of MDLM's estimator under alpha = 1 - t with its t < eps branch
    (one-shot decoding at eps): sum_M c(M) [int_eps^1 (1/t) q(M | t) dt + q(M | eps)], the
    integral of t^(m-1) (1-t)^(L-m) expanded binomially. eps -> 0 gives the continuous bound."""
    L = x.shape[1]
    m, c = mask_costs(x, oracle, mask_id)
    coef = []
    for k in m.long().tolist():
        integral = sum(math.comb(L - k, j) * (-1) ** j * (1 - eps ** (k + j)) / (k + j) for j in range(L - k + 1)) if k else 0.0
        coef.append(integral + (eps ** k * (1 - eps) ** (L - k) if k else 0.0))
    return (c * torch.tensor(coef, dtype=torch.float64)).sum(1)
