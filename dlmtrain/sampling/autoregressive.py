"""Left-to-right samplers for the autoregressive baseline (dlmtrain/modules/ar.py).

What a sampler uses of the module: ``start_id``, ``backbone`` (called with a KVCache),
``logits(x)`` (row i scores x_i given x_<i; the uncached path) and ``segments(x)``.

- ``ancestral``: x_i ~ p(x_i | x_<i) for i = P .. L-1 after the prompt: exact ancestral
  sampling of the model. With ``cache=True`` (default) the prompt is one forward pass
  (prefill) and every later token a pass over one position, its keys and values kept in a
  KVCache (dlmtrain/backbone/kv_cache.py); with ``cache=False`` every token is a full pass
  over its prefix (O(L^2) work; a reference). The draw for position i uses a generator
  keyed by i, so both give the same tokens for the same seed.
- ``greedy``: ``ancestral`` with top_k = 1: the most likely token (ties broken at random).

``steps`` is ignored: one network evaluation per generated position, NFE = L - P with P
the shortest prompt in the batch (L without a prompt: the first token is drawn from the
start token's prediction). Values are drawn after temperature, top-k and top-p, in float64
by default (dlmtrain/sampling/categorical.py).

Conditioning is a prompt only: ``prompt_ids``, or ``fixed`` tokens forming a prefix of each
row (rows may have prompts of different lengths: their tokens are kept while the batch
decodes from the shortest). An autoregressive model cannot condition on later tokens, so
``suffix_ids`` and fixed positions after a free one are refused (ConfigError) rather than
forced in unannounced; so is ``cfg_scale``. Under ``model.document_mask`` a drawn EOS ends
the document: the next position reads the start token and sees only its own document, as
in training.
"""

from __future__ import annotations

import dataclasses

import torch

from dlmtrain.backbone import KVCache
from dlmtrain.diffusion.autoregressive import shift_right
from dlmtrain.errors import ConfigError
from dlmtrain.sampling.categorical import draw, filter_log_probs
from dlmtrain.sampling.registry import Rng, SamplerOptions


def _check_prefix(cond: torch.Tensor, opts: SamplerOptions) -> None:
    late = cond & (torch.cumsum((~cond).long(), 1) > 0)  # fixed after a free position
    if late.any():
        r, c = late.nonzero()[0].tolist()
        raise ConfigError(f"objective ar samples left to right and cannot condition on later tokens (sample {r} fixes "
                          f"position {c} after a free one); give a prompt only: prompt_ids or a fixed prefix, no suffix_ids")
    if opts.cfg_scale > 0:
        raise ConfigError("cfg_scale > 0 is not supported by objective ar; set sampling.cfg_scale=0")


def run_ancestral(module, fixed: torch.Tensor, opts: SamplerOptions, rng: Rng):
    """x_i ~ p(x_i | x_<i) left to right after the prompt (module docstring)."""
    cond = fixed >= 0
    _check_prefix(cond, opts)
    B, L = fixed.shape
    x = fixed.clamp_min(0)  # free positions hold a placeholder until drawn (row i never reads x_i)
    start = int(cond.sum(1).min()) if B else L
    cache = KVCache(L) if opts.cache else None
    nfe = 0
    for i in range(start, L):
        if cache is None:
            logits = module.logits(x[:, :i + 1])[:, i]
        else:  # the positions not yet in the cache: the prompt at first, then one
            a = cache.length
            seg = module.segments(x[:, :i + 1])
            inp = shift_right(x[:, :i + 1], module.start_id, seg)[:, a:]
            mask = None if seg is None else seg[:, None, a:, None] == seg[:, None, None, :]  # same document
            logits = module.backbone(inp, cache=cache, attn_mask=mask)[:, -1]
        nfe += 1
        if opts.on_nfe is not None:
            opts.on_nfe(1)
        lp = filter_log_probs(logits, opts.temperature, opts.top_k, opts.top_p,
                              dtype=torch.float64 if opts.float64 else torch.float32)
        tok = draw(lp, rng(i), float64=opts.float64)
        x[:, i] = torch.where(cond[:, i], x[:, i], tok)
    return x, nfe


def run_greedy(module, fixed, opts: SamplerOptions, rng: Rng):
    """``ancestral`` with top_k = 1 (module docstring)."""
    return run_ancestral(module, fixed, dataclasses.replace(opts, top_k=1), rng)


AR_SAMPLERS = {"ancestral": run_ancestral, "greedy": run_greedy}
