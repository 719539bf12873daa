"""Block diffusion: BD3-LM (Arriola et al., 2025, "Block Diffusion: Interpolating Between
Autoregressive and Diffusion Language Models", arXiv:2503.09573).

A sequence of L tokens is cut into blocks of L' tokens (the last one shorter when L' does not
divide L). Blocks are autoregressive, tokens inside a block are masked diffusion:

    log p(x) = sum_b log p(x^b | x^{<b}),

and each conditional gets the masked-diffusion bound of its block given the clean prefix
(MDLM's continuous-time bound, diffusion/masked.py, applied to the L' tokens of block b):

    -log p(x) <= L_BD = sum_b  int_0^1 w(t) E_{z^b_t} sum_{i in b: z^i = MASK} -log p(x^i | z^b_t, x^{<b}) dt,
    w(t) = -alpha'(t) / (1 - alpha(t))   (1/t for alpha = 1 - t: the paper's L_BD).

Terms, all of them kept (nelbo is a strict bound):
- the diffusion integral of every block over [eps, 1];
- below eps each block's reconstruction term: decode the tokens of the block still masked at
  eps from p(. | z^b_eps, x^{<b}), estimated as in masked.py (t < eps: weight 1/eps at eps);
- the prior: every schedule has alpha(1) = 0, so z^b_1 is all [MASK], the prior itself (0).
Each block has its own time t_b (the blocks' terms are separate integrals; independent times
estimate their sum without bias), stratified over batch x blocks (``block_times``).

L' = L is one block: MDLM's bound. L' = 1: a block is one token, whose bound is exactly its
conditional -log p(x^b | x^{<b}) in expectation (masked with probability 1 - alpha(t), weight
-alpha'/(1 - alpha): the integral telescopes to 1), so the zero-variance estimator "always
masked, weight 1" (``exact_single``) is the exact AR likelihood of the model (the paper's
t = 1 evaluation for L' = 1).

Training may draw t_b from [clip_min, clip_max] instead of [0, 1] (the paper's "clipped" noise
schedules, beta and omega, chosen to lower the variance of the gradient): that loss is the
bound's integrand averaged over the clipped range, not a bound; ``nelbo`` never clips.

Vectorised training (the paper's two-pass trick done in one): the backbone reads the 2L
tokens [x_t ; x] (noisy copy first, then the clean one), both copies with rotary positions
0..L-1, under the mask ``attention_mask`` below, so the x_t copy of block b sees itself and
the clean blocks before it: exactly what the sampler's KV cache holds when it denoises block
b. Logits are read from the x_t copy only.
"""

from __future__ import annotations

import torch

from dlmtrain.diffusion.schedules import draw_times, stratified_times


def num_blocks(L: int, block_size: int) -> int:
    return -(-L // block_size)


def block_index(L: int, block_size: int, device=None) -> torch.Tensor:
    """[L] long: the block of each position."""
    return torch.arange(L, device=device) // block_size


def attention_mask(L: int, block_size: int, device=None) -> torch.Tensor:
    """[2L, 2L] bool (True = may attend) over [x_t ; x0], queries in rows.

    Three parts (the paper's M_BD, M_OBC, M_BC), with b(i) the block of position i mod L:
      x_t query -> x_t key: b(q) == b(k)   block diagonal: a noisy block sees itself;
      x_t query -> x0 key : b(k) <  b(q)   offset block-causal: and the clean blocks before it;
      x0 query  -> x0 key : b(k) <= b(q)   block-causal: the clean copy is the KV cache;
      x0 query  -> x_t key: never.
    """
    b = block_index(L, block_size, device)
    q, k = b[:, None], b[None, :]
    m = torch.zeros(2 * L, 2 * L, dtype=torch.bool, device=device)
    m[:L, :L] = q == k
    m[:L, L:] = k < q
    m[L:, L:] = k <= q
    return m


def mask_mod(L: int, block_size: int):
    """``attention_mask`` as a flex_attention mask_mod(b, h, q_idx, kv_idx) -> bool."""

    def mod(b, h, q_idx, kv_idx):
        q_clean, k_clean = q_idx >= L, kv_idx >= L
        bq = (q_idx - q_clean * L) // block_size
        bk = (kv_idx - k_clean * L) // block_size
        noisy_noisy = ~q_clean & ~k_clean & (bq == bk)
        noisy_clean = ~q_clean & k_clean & (bk < bq)
        clean_clean = q_clean & k_clean & (bk <= bq)
        return noisy_noisy | noisy_clean | clean_clean

    return mod


def block_causal_mask(start: int, end: int, block_size: int, device=None) -> torch.Tensor:
    """[end - start, end] bool: positions start..end-1 (queries) over keys 0..end-1 of one clean
    sequence, key block <= query block. The x0 part of ``attention_mask``, and, for a last
    block still noisy, its x_t part too (it sees itself and every clean block before it)."""
    b = block_index(end, block_size, device)
    return b[None, :] <= b[start:end, None]


def block_times(batch: int, blocks: int, *, lo: float = 0.0, hi: float = 1.0, offset: int = 0,
                total: int | None = None, antithetic: bool = True, generator=None, device=None) -> torch.Tensor:
    """[batch, blocks] times in [lo, hi): one per (sequence, block), stratified over all
    batch x blocks of the global batch (``stratified_times`` with offset/total counted in
    rows: a rank holding rows offset..offset+batch-1 of ``total`` uses its share of strata)."""
    n = batch * blocks
    t = stratified_times(n, offset=offset * blocks, total=(total or batch) * blocks, antithetic=antithetic,
                         generator=generator, device=device)
    return (lo + (hi - lo) * t).view(batch, blocks)


def block_draw_times(batch: int, blocks: int, k: int, *, antithetic: bool = True, generator=None,
                     device=None) -> torch.Tensor:
    """[batch, blocks, k]: k Monte Carlo times per (sequence, block), the Latin square of
    ``draw_times`` over batch x blocks (with one block: draw_times(batch, k) exactly)."""
    return draw_times(batch * blocks, k, antithetic=antithetic, generator=generator, device=device).view(batch, blocks, k)


def per_position(values: torch.Tensor, L: int, block_size: int) -> torch.Tensor:
    """[B, blocks] -> [B, L]: each block's value at its positions."""
    return values[:, block_index(L, block_size, values.device)]
