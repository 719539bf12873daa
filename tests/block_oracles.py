"""A backbone stand-in with the exact conditionals of the 3-state Markov chain (chain_oracles.P)
that learns nothing from the block structure: each query reads exactly the tokens its
attention lets it see.

For a query at position i, the visible tokens are those of the keys its attention mask allows
that are not [MASK] (with a KV cache: every cached token the mask allows, and the new ones).
The output is p(x^i | visible tokens at their rotary positions), the chain's exact
conditional (only the nearest visible neighbour on each side matters); if a visible key sits
at position i itself (a leak of the clean token), the output is that token with probability 1.
So a wrong block mask or wrong positions change the numbers: a leak makes the bound
collapse, a hidden prefix loosens it.
"""

from __future__ import annotations

import torch
from torch import nn

from chain_oracles import PI, K, P


class BlockMarkovOracle(nn.Module):
    def __init__(self, mask_id: int = K, out_dim: int | None = None, max_len: int = 128):
        super().__init__()
        self.mask_id, self.out_dim = mask_id, out_dim or mask_id + 1
        self.pw = torch.stack([torch.linalg.matrix_power(P, d) for d in range(max_len + 1)])  # [n+1, K, K]
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def conditionals(self, tokens, key_pos, allowed, q_pos):
        """tokens [B, Lk], key_pos [Lk], allowed [B or 1, Lq, Lk] bool, q_pos [Lq] -> log-probs [B, Lq, out_dim]."""
        B, Lk = tokens.shape
        Lq = q_pos.shape[0]
        n = int(max(key_pos.max(), q_pos.max())) + 1
        vis = allowed & (tokens != self.mask_id)[:, None, :] & (tokens < K)[:, None, :]  # [B, Lq, Lk]
        at = key_pos[:, None] == torch.arange(n)  # [Lk, n]: key k sits at position p
        # the visible token at each position for each query (+1; 0 = nothing visible there)
        seq = torch.where(vis[..., None] & at, (tokens + 1)[:, None, :, None], 0).amax(2)  # [B, Lq, n]
        own = seq.gather(2, q_pos.view(1, Lq, 1).expand(B, Lq, 1)).squeeze(2)  # [B, Lq]
        pos = torch.arange(n)
        left = torch.where((seq > 0) & (pos < q_pos[:, None]), pos, -1).amax(2)  # nearest visible left of i
        right = torch.where((seq > 0) & (pos > q_pos[:, None]), pos, n).amin(2)
        xl = seq.gather(2, left.clamp_min(0)[..., None]).squeeze(2).clamp_min(1) - 1
        xr = seq.gather(2, right.clamp_max(n - 1)[..., None]).squeeze(2).clamp_min(1) - 1
        lv = torch.where((left >= 0)[..., None], self.pw[(q_pos - left).clamp(0, n), xl], PI)  # [B, Lq, K]
        rv = torch.where((right < n)[..., None], self.pw[(right - q_pos).clamp(0, n), :, xr], torch.ones(K, dtype=P.dtype))
        p = lv * rv
        p = torch.where((own > 0)[..., None], torch.nn.functional.one_hot((own - 1).clamp_min(0), K).to(p.dtype), p)
        out = torch.full((B, Lq, self.out_dim), float("-inf"), dtype=torch.float64)
        out[..., :K] = torch.log(p / p.sum(-1, keepdim=True))
        out[..., self.mask_id] = 4.0  # SUBS must ignore what sits on [MASK]
        return out.float()

    def forward(self, input_ids, sigma=None, segment_ids=None, attention_mask=None, attn_mask=None, position_ids=None,
                cache=None, commit=True, block_mask=None, out_positions=None):
        self.calls += 1
        B, n = input_ids.shape
        if cache is not None:  # the cache holds the tokens, not keys: same contract as backbone/kv_cache.py
            if not hasattr(cache, "tokens"):
                cache.tokens = torch.full((B, cache.max_len), self.mask_id, dtype=torch.long)
            start, end = cache.length, cache.length + n
            cache.tokens[:, start:end] = input_ids
            allowed = torch.ones(1, n, end, dtype=torch.bool) if attn_mask is None else attn_mask.expand(1, n, end)
            out = self.conditionals(cache.tokens[:, :end], torch.arange(end), allowed, torch.arange(start, end))
            if commit:
                cache.length = end
            return out
        key_pos = torch.arange(n) if position_ids is None else position_ids.reshape(-1)[-n:]
        allowed = torch.ones(1, n, n, dtype=torch.bool) if attn_mask is None else attn_mask.reshape(-1, n, n)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, :]
        q = torch.arange(n) if out_positions is None else torch.arange(n)[out_positions]
        return self.conditionals(input_ids, key_pos, allowed[:, q], key_pos[q])
