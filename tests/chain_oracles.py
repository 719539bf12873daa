"""Exact denoisers for a 3-state stationary Markov chain under absorbing or uniform noise.

The noisy sequence z of a chain x (each z^j drawn from x^j independently) is a hidden Markov
model, so p(x^j | z) follows from forward-backward over the chain, exactly, for any length.
Emissions: absorbing e_j(x) = 1 if z^j = [MASK] else [z^j = x]; uniform
e_j(x) = alpha [z^j = x] + (1 - alpha) / N. Importable from every test directory (tests/ is
on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

P = torch.tensor([[0.8, 0.15, 0.05], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]], dtype=torch.float64)
K = 3
_w, _v = torch.linalg.eig(P.T)
PI = _v[:, torch.argmin((_w - 1).abs())].real
PI = PI / PI.sum()


def sample_chain(n: int, L: int, g: torch.Generator) -> torch.Tensor:
    x = torch.empty(n, L, dtype=torch.long)
    x[:, 0] = torch.multinomial(PI, n, replacement=True, generator=g)
    for i in range(1, L):
        x[:, i] = torch.multinomial(P[x[:, i - 1]], 1, generator=g).squeeze(-1)
    return x


def chain_nll(x: torch.Tensor) -> torch.Tensor:
    """-log p(x) per row, exactly (float64)."""
    lp = torch.log(PI[x[:, 0]]) + torch.log(P[x[:, :-1], x[:, 1:]]).sum(1)
    return -lp


def held_out_bound(per_seq: torch.Tensor, x: torch.Tensor) -> tuple[float, float, float, float]:
    """(gap, gap_se, nelbo, nelbo_se) in nats/token for per-sequence bounds ``per_seq`` [N] of the
    chain sequences ``x`` [N, L]: the bound's excess over the exact -log p(x), and the bound, each
    with its standard error over sequences."""
    n, rows = x.numel(), len(x)
    diff = per_seq - chain_nll(x)
    gap, gap_se = diff.sum().item() / n, diff.std().item() * math.sqrt(rows) / n
    return gap, gap_se, per_seq.sum().item() / n, per_seq.std().item() * math.sqrt(rows) / n


def exact_pair(L: int, i: int, j: int, fixed: dict | None = None) -> torch.Tensor:
    """The chain's exact joint of (x_i, x_j) given fixed positions, by enumeration [K, K]."""
    seqs = torch.cartesian_prod(*[torch.arange(K)] * L)
    lp = -chain_nll(seqs)
    keep = torch.ones(len(seqs), dtype=torch.bool)
    for pos, tok in (fixed or {}).items():
        keep &= seqs[:, pos] == tok
    joint = torch.zeros(K, K, dtype=torch.float64)
    joint.index_put_((seqs[keep, i], seqs[keep, j]), lp[keep].exp(), accumulate=True)
    return joint / joint.sum()


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells of probability 0 must be empty."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    exp = probs / probs.sum() * counts.sum()
    assert counts[exp == 0].sum() == 0, "a cell of probability 0 was drawn"
    keep = exp > 0
    stat = ((counts[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = torch.tensor((keep.sum() - 1).item() / 2, dtype=torch.float64)
    return torch.special.gammaincc(df, stat / 2).item()


class ChainOracle(nn.Module):
    """Backbone stand-in: logits = log p(x^j | z) of the chain, exactly, over ``out_dim`` ids
    (ids >= K get -inf; [MASK] gets junk that the objective must ignore).

    kind "absorb": z may hold ``mask_id``; the output is p(x^j | z). kind "uniform":
    ``alpha_of(sigma) -> [B]`` turns the backbone's conditioning input into alpha_t, N = ``out_dim``,
    and the output is p(x^j | z without z^j), the optimum of the x0-parameterization
    (dlmtrain/diffusion/uniform.py). Records its inputs when ``record``."""

    def __init__(self, kind: str, out_dim: int, mask_id: int | None = None, alpha_of=None):
        super().__init__()
        self.kind, self.out_dim, self.mask_id, self.alpha_of = kind, out_dim, mask_id, alpha_of
        self.dummy = nn.Parameter(torch.zeros(1))  # the optimiser needs a parameter
        self.inputs: list[torch.Tensor] = []
        self.record = False
        self.full = False

    def forward(self, z, sigma=None, segment_ids=None, attention_mask=None):
        if self.record:
            self.inputs.append(z.clone())
        B, L = z.shape
        onehot = z[..., None] == torch.arange(K)  # [B, L, K]
        if self.kind == "absorb":
            e = torch.where((z == self.mask_id)[..., None], torch.ones(B, L, K, dtype=torch.float64), onehot.double())
        else:
            a = torch.as_tensor(self.alpha_of(sigma), dtype=torch.float64).reshape(-1, 1, 1).expand(B, 1, 1)
            e = a * onehot + (1 - a) / self.out_dim
        m = torch.empty(B, L, K, dtype=torch.float64)  # p(x^j, z^{<j}) up to a constant
        b = torch.ones(B, L, K, dtype=torch.float64)  # p(z^{>j} | x^j) up to a constant
        m[:, 0] = PI
        for j in range(1, L):
            m[:, j] = (m[:, j - 1] * e[:, j - 1]) @ P
            m[:, j] /= m[:, j].sum(-1, keepdim=True)
        for j in range(L - 2, -1, -1):
            b[:, j] = (e[:, j + 1] * b[:, j + 1]) @ P.T
            b[:, j] /= b[:, j].sum(-1, keepdim=True)
        # absorbing: p(x^j | z); uniform: p(x^j | z without z^j), what the x0-parameterization
        # needs to be exact (dlmtrain/diffusion/uniform.py); ``full=True`` gives p(x^j | z)
        post = m * b * (e if self.kind == "absorb" or self.full else 1.0)
        out = torch.full((B, L, self.out_dim), -math.inf, dtype=torch.float64)
        out[..., :K] = torch.log(post / post.sum(-1, keepdim=True))
        if self.mask_id is not None:
            out[..., self.mask_id] = 5.0
        return out.float()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is much faster, and on a shared machine extra threads contend
    badly (use as ``from chain_oracles import one_thread  # noqa: F401`` in a test module)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
