"""A key/value cache for incremental decoding with the shared backbone.

``Backbone(ids, cache=cache)`` runs n new positions against everything the cache holds:
their rotary positions are ``cache.length`` .. ``cache.length + n - 1``; every layer writes
their (rotated) keys and values into its buffer at those slots and attends over slots
0 .. length + n - 1; then ``length`` advances by n. The output equals the matching rows of
a full forward pass over the whole sequence (to float rounding) when the full pass would
let each new position see the same keys:

- a causal backbone: new position i sees the cached keys and the new ones up to itself
  (autoregressive decoding, one or many positions per call);
- a bidirectional backbone: the new positions see all cached keys and each other, i.e. a
  full pass with a block-causal mask (block diffusion: a block attends to the clean blocks
  before it and to itself).

``attn_mask`` (bool, broadcastable to [B, H, n, length + n], True = may attend) narrows it
further, e.g. to the current document. ``commit=False`` leaves ``length`` where it was, so
the next call overwrites the slots: a block denoised several times against the same
context (BD3-LM) before its clean version is committed. Buffers [B, H, max_len, D] are
allocated on a layer's first write, in the keys' dtype and device; a cache filled under
``torch.inference_mode`` is used under it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    def __init__(self, max_len: int):
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be >= 1")
        self.max_len, self.length = int(max_len), 0
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (later writes overwrite them)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = int(length)

    def step(self, n: int, causal: bool, attn_mask: torch.Tensor | None, device) -> "CacheStep":
        return CacheStep(self, n, causal, attn_mask, device)

    def _write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        if layer not in self.keys:
            B, H, _, D = k.shape
            self.keys[layer] = k.new_empty(B, H, self.max_len, D)
            self.values[layer] = v.new_empty(B, H, self.max_len, D)
        kb, vb = self.keys[layer], self.values[layer]
        if kb.shape[0] != k.shape[0]:
            raise ValueError(f"this cache holds batch size {kb.shape[0]}, got {k.shape[0]} rows")
        end = start + k.shape[2]
        kb[:, :, start:end] = k
        vb[:, :, start:end] = v
        return kb[:, :, :end], vb[:, :, :end]


class CacheStep:
    """One forward pass over n new positions; ``layer(i)`` is layer i's attention (the
    ``plan(q, k, v, dropout_p)`` callable every block expects)."""

    def __init__(self, cache: KVCache, n: int, causal: bool, attn_mask, device):
        self.cache, self.start, self.end = cache, cache.length, cache.length + n
        if self.end > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} positions; {cache.length} used, {n} more asked for")
        mask = None
        if causal and n > 1:
            q_pos = torch.arange(self.start, self.end, device=device)[:, None]
            mask = torch.arange(self.end, device=device)[None, :] <= q_pos  # [n, end]
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise ValueError(f"attn_mask must be a bool tensor (True = may attend), got {attn_mask.dtype}")
            mask = attn_mask if mask is None else mask & attn_mask
            # a row with nothing to attend to attends to itself (no NaN), as in attention.py
            own = torch.arange(self.end, device=device)[None, :] == torch.arange(self.start, self.end, device=device)[:, None]
            mask = mask | (own & ~mask.any(-1, keepdim=True))
        self.mask = mask

    def layer(self, i: int):
        def attend(q, k, v, dropout_p: float = 0.0):
            keys, values = self.cache._write(i, self.start, k, v)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, dropout_p=dropout_p)

        return attend
