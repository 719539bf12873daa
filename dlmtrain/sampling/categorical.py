"""Categorical draws from a denoiser's distribution: temperature, top-k, nucleus, then one draw.

Two ways to draw, chosen by ``float64``:

- ``float64=True`` (default): inverse CDF on float64 cumulative probabilities, one
  float64 uniform per draw. Token i is chosen with probability p_i up to float64
  rounding (~1e-16 relative), however small p_i is.
- ``float64=False``: the peers' float32 Gumbel-max, argmax(p / E) with E = -log(u + 1e-10)
  + 1e-10 on float32 uniforms (the exponential race; = argmax(log p + Gumbel)). float32
  uniforms cap the Gumbel noise near 16.6, so tokens below about 1e-7 are under-drawn and
  a long tail of them loses most of its mass: lower entropy, flattering generative
  perplexity (Zheng et al., 2024, arXiv:2409.02908). Kept only to reproduce peers.
"""

from __future__ import annotations

import torch


def filter_log_probs(logp: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     dtype=torch.float64) -> torch.Tensor:
    """log p [..., V] -> the distribution actually drawn from, normalised, in ``dtype``.

    temperature: p^(1/T); top_k > 0: keep the k most likely (ties with the k-th kept too);
    top_p < 1: keep the smallest set of most likely tokens whose mass reaches top_p (a token
    is dropped when the mass of the more likely ones already reaches top_p). -inf entries
    ([MASK] under SUBS) stay -inf; at least one token always survives."""
    x = logp.to(dtype)
    if temperature != 1.0:
        x = x / temperature
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(x, dim=-1, descending=True)
        p = torch.softmax(srt, dim=-1)
        before = torch.cumsum(p, dim=-1) - p  # mass of the strictly more likely tokens
        drop = before >= top_p
        drop[..., 0] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    return torch.log_softmax(x, dim=-1)


def draw(logp: torch.Tensor, generator: torch.Generator | None = None, float64: bool = True) -> torch.Tensor:
    """One draw per row of normalised log-probabilities logp [..., V] -> ids [...] (long)."""
    shape = logp.shape[:-1]
    flat = logp.reshape(-1, logp.shape[-1])
    dev = flat.device
    if flat.shape[0] == 0:
        return torch.empty(shape, dtype=torch.long, device=dev)
    if float64:
        p = torch.exp(flat.double())
        cdf = torch.cumsum(p, dim=-1)
        u = torch.rand(flat.shape[0], 1, generator=generator, device=dev, dtype=torch.float64)
        idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
        # u * total can round up to total itself (probability ~2^-53): take the last token with mass
        last = flat.shape[-1] - 1 - torch.argmax(torch.flip(p > 0, dims=[-1]).to(torch.uint8), dim=-1)
        return torch.minimum(idx, last).view(shape)
    p = torch.exp(flat.float())
    u = torch.rand(flat.shape, generator=generator, device=dev, dtype=torch.float32)
    return (p / (1e-10 - torch.log(u + 1e-10))).argmax(dim=-1).view(shape)


def confidence(logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position confidence of a distribution logp [..., V] (larger = more certain).

    max_prob: the argmax token's probability; margin: top-1 minus top-2 probability;
    neg_entropy: sum p log p. All three are functions of the distribution only, not of a
    drawn token, so choosing where to reveal does not bias the revealed values."""
    p = torch.exp(logp)
    if kind == "max_prob":
        return p.max(dim=-1).values
    if kind == "margin":
        top = torch.topk(p, 2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if kind == "neg_entropy":
        return torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    raise ValueError(f"unknown confidence {kind!r}")
