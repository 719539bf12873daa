"""Semi-autoregressive samplers for block diffusion (dlmtrain/modules/bd3lm.py).

Blocks of ``module.block_size`` positions are drawn left to right. Inside block b one of the
masked-diffusion loops of masked.py runs (``ancestral``, ``first_hitting``, ``confidence``;
what each does there, and how ``steps`` is read, is in masked.py), with a denoiser bound
to the clean prefix x^{<b}: exactly what the model was trained on (the x_t copy of block b
sees itself and the clean blocks before it, diffusion/block.py).

- ``cache=True`` (default): each finished block is run once through the backbone and its
  keys/values kept in a KVCache (backbone/kv_cache.py); every denoising pass is then a pass
  over the L' positions of the current block against the cache (``commit=False``). Several
  given blocks in a row (a long prompt) are committed in one pass. ``cache=False`` runs the
  whole prefix with the current block in every pass (block-causal mask; O(L^2) work; the
  reference). The random numbers depend only on (seed, batch, block, step), so both give the
  same tokens for the same seed. ``cache`` also switches ancestral's reuse of unchanged
  outputs (masked.py), which does not change the tokens either.
- ``steps``: per block (each block's inner sampler gets all of them), so NFE does not grow
  with ``steps`` beyond the tokens of a block for the cached ancestral sampler.
- NFE counts every backbone call: denoising passes plus (cached) one commit pass per run of
  finished blocks (the last block is never committed).
- Length: any ``seq_len``, also beyond the training length (the sequence grows block by
  block). Rotary positions are relative, but attention spans longer than the training
  length were never trained: quality there is the model's to show.
- Conditioning: a prompt (``prompt_ids``, or ``fixed`` tokens): every fixed token must lie
  in or before the block of the row's first free position, since a block never sees later
  blocks (fixed tokens inside that block are seen by its denoiser; the given positions of a
  block are never changed). ``suffix_ids`` or tokens fixed further right are refused, as is
  ``cfg_scale`` (the cached prefix cannot be hidden for an unconditional pass).
- ``stop_at_eos``: a row is done once it has drawn EOS (``model.eos_id``) at a free position;
  sampling stops after the block in which the last row got done, and every position after a
  row's first drawn EOS is set to EOS. Rows keep their length L.

Values are drawn in float64 by default (categorical.py).
"""

from __future__ import annotations

import torch

from dlmtrain.backbone import KVCache
from dlmtrain.diffusion.block import block_causal_mask, block_index
from dlmtrain.diffusion.masked import subs_logits
from dlmtrain.errors import ConfigError
from dlmtrain.sampling.masked import Denoiser, run_ancestral, run_confidence, run_first_hitting
from dlmtrain.sampling.registry import Rng, SamplerOptions


class BlockDenoiser:
    """The module's denoiser for one block given its clean prefix (what masked.py's Denoiser
    wraps): ``denoise(z_block, t) -> log p(x0 | z_block, prefix)`` under SUBS."""

    def __init__(self, module, prefix: torch.Tensor, cache: KVCache | None):
        self.module, self.prefix, self.cache = module, prefix, cache
        self.mask_id, self.schedule = module.mask_id, module.schedule
        self.time_conditioned = module.time_conditioned

    def denoise(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = self.module
        sigma = self.schedule.sigma(t.float()) if self.time_conditioned else None
        if self.cache is not None:
            logits = m.backbone(z, sigma=sigma, cache=self.cache, commit=False)
        else:
            start, end = self.prefix.shape[1], self.prefix.shape[1] + z.shape[1]
            if sigma is not None:  # the clean prefix is at t = 0
                sigma = torch.cat([self.schedule.sigma(torch.zeros_like(self.prefix, dtype=torch.float32)),
                                   sigma[:, None].expand(-1, z.shape[1])], 1)
            logits = m.backbone(torch.cat([self.prefix, z], 1), sigma=sigma,
                                attn_mask=block_causal_mask(0, end, m.block_size, z.device),
                                out_positions=slice(start, end))
        return subs_logits(logits.float(), z, self.mask_id)


def commit(module, cache: KVCache, x: torch.Tensor, end: int) -> int:
    """Run the clean positions cache.length..end-1 of x through the backbone into the cache
    (block-causal among themselves); returns the number of backbone calls (0 or 1)."""
    start = cache.length
    if end <= start:
        return 0
    sigma = None
    if module.time_conditioned:
        sigma = module.schedule.sigma(torch.zeros(x.shape[0], device=x.device))
    module.backbone(x[:, start:end], sigma=sigma, cache=cache,
                    attn_mask=block_causal_mask(start, end, module.block_size, x.device))
    return 1


def _check(module, cond: torch.Tensor, opts: SamplerOptions) -> None:
    if opts.cfg_scale > 0:
        raise ConfigError("cfg_scale > 0 is not supported by objective bd3lm (the cached prefix has no "
                          "unconditional version); set sampling.cfg_scale=0")
    L = cond.shape[1]
    blk = block_index(L, module.block_size, cond.device).expand_as(cond)
    first_free = torch.where(~cond, blk, L).min(1).values  # block of each row's first free position
    late = cond & (blk > first_free[:, None])
    if late.any():
        r, c = late.nonzero()[0].tolist()
        raise ConfigError(f"objective bd3lm samples blocks left to right and cannot condition on later blocks "
                          f"(sample {r} fixes position {c}, a block after its first free position); give a "
                          "prompt: prompt_ids or fixed tokens up to the first free block, no suffix_ids")
    if opts.stop_at_eos and module.eos_id < 0:
        raise ConfigError("stop_at_eos needs model.eos_id (the data's EOS id); set it or stop_at_eos=false")


def _blocks(loop):
    def sampler(module, fixed: torch.Tensor, opts: SamplerOptions, rng: Rng):
        cond = fixed >= 0
        _check(module, cond, opts)
        B, L = fixed.shape
        bs = module.block_size
        z = torch.where(cond, fixed, torch.full_like(fixed, module.mask_id))
        cache = KVCache(L) if opts.cache else None
        nfe = 0
        for b, start in enumerate(range(0, L, bs)):
            end = min(L, start + bs)
            free = ~cond[:, start:end]
            if not free.any():
                continue  # given block: committed with the prefix of the next one
            if cache is not None:
                calls = commit(module, cache, z, start)
                nfe += calls
                if calls and opts.on_nfe is not None:
                    opts.on_nfe(calls)
            den = Denoiser(BlockDenoiser(module, z[:, :start], cache), cond[:, start:end], opts)
            zb = loop(den, z[:, start:end].clone(), free, opts.steps, opts, lambda *keys, b=b: rng(b, *keys))
            z[:, start:end] = zb
            nfe += den.nfe
            if opts.stop_at_eos and ((z[:, :end] == module.eos_id) & ~cond[:, :end]).any(1).all():
                break
        if opts.stop_at_eos:
            drawn = (z == module.eos_id) & ~cond
            after = (drawn.long().cumsum(1) - drawn.long()) > 0  # strictly after the first drawn EOS
            z = z.masked_fill(after & ~cond, module.eos_id)
        return z, nfe

    sampler.__doc__ = loop.__doc__
    sampler.stops_at_eos = True
    return sampler


BLOCK_SAMPLERS = {
    "ancestral": _blocks(run_ancestral),
    "first_hitting": _blocks(run_first_hitting),
    "confidence": _blocks(run_confidence),
}
