"""Chunked linear + cross-entropy: -log softmax(h W^T + b)[target] per row, in float32, without
ever holding the [rows x V] float32 logits at once (issue 12: at V = 50k they dominate a small
model's activation memory).

Forward and backward loop over ``chunk_size`` rows: each chunk's logits are computed in
float32 (also under bf16 autocast, like VocabHead), reduced with logsumexp and dropped; only
the per-row logsumexp [rows] is kept. The backward recomputes each chunk's logits (one extra
head matmul forward) and uses d nll_i / d logits_i = softmax_i - onehot(target_i), scaled by
the incoming per-row gradient. ``exclude`` >= 0 is a column kept out of the softmax (logit
-inf, so its probability and gradient are exactly 0): SUBS's [MASK]. Pure torch; any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunk_logits(h, weight, bias, exclude):
    with torch.autocast(device_type=h.device.type, enabled=False):
        logits = F.linear(h.float(), weight.float(), None if bias is None else bias.float())
    if exclude >= 0:
        logits[:, exclude] = float("-inf")
    return logits


class _ChunkedLinearNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, exclude, chunk):
        n = h.shape[0]
        nll = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            logits = _chunk_logits(h[s:s + chunk], weight, bias, exclude)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            nll[s:s + chunk] = lse[s:s + chunk] - logits.gather(1, targets[s:s + chunk, None]).squeeze(1)
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.exclude, ctx.chunk = exclude, chunk
        return nll

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, targets, lse = ctx.saved_tensors
        gh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[1] else None
        gb = None
        if bias is not None and ctx.needs_input_grad[2]:
            gb = torch.zeros(bias.shape, dtype=torch.float32, device=h.device)
        w32 = weight.float()
        for s in range(0, h.shape[0], ctx.chunk):
            hc = h[s:s + ctx.chunk].float()
            g = torch.exp(_chunk_logits(hc, weight, bias, ctx.exclude) - lse[s:s + ctx.chunk, None])  # softmax
            g.scatter_add_(1, targets[s:s + ctx.chunk, None], torch.full_like(hc[:, :1], -1.0))
            g.mul_(grad[s:s + ctx.chunk, None].float())
            if gh is not None:
                gh[s:s + ctx.chunk] = g @ w32
            if gw is not None:
                gw.addmm_(g.t(), hc)
            if gb is not None:
                gb += g.sum(0)
        return (None if gh is None else gh.to(h.dtype), None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(bias.dtype), None, None, None)


def chunked_linear_nll(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                       exclude: int = -1, chunk_size: int = 0) -> torch.Tensor:
    """h [N, D], weight [V, D], bias [V] or None, targets [N] -> -log softmax(h W^T + b)[targets]
    [N] float32; chunk_size <= 0 means all rows in one chunk."""
    chunk = chunk_size if chunk_size > 0 else max(1, h.shape[0])
    return _ChunkedLinearNLL.apply(h, weight, bias, targets, int(exclude), chunk)
