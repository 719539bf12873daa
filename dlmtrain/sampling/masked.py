"""Samplers for masked (absorbing-state) diffusion: MDLM and anything exposing its interface.

What a sampler uses of the module: ``mask_id``, ``schedule`` (alpha(t), its inverse),
``time_conditioned`` (bool), and ``denoise(z, t) -> log p(x0 | z_t)`` [B, L, V] under
SUBS (-inf on [MASK], unmasked tokens copied). A module with ``denoise_at = True`` also takes
``denoise(z, t, at=mask)`` and returns only those positions, [M, V] (MDLM with
``objective.masked_head``: the output head runs only there). The loops ask only for the
positions they draw or rank (ancestral: those revealed this step; first_hitting: one per row;
confidence: the still-masked ones), so at vocabulary 50k the [B, L, V] head output, its
log-softmax and the SUBS copy are never formed; the drawn tokens are the same
(tests/sampling/test_masked_head_samplers.py). The reverse-process math is in
dlmtrain/diffusion/masked.py; the loops are here. Conditioning tokens (prompt, suffix, fixed
positions) are in z from the start, never change, and the model sees them.

What ``steps`` means, and the network evaluations (NFE) each sampler makes per batch
(``SampleResult.nfe``; with ``cfg_scale > 0`` every evaluation is a pair and counts 2):

- ``ancestral``: the exact reverse process on the uniform grid 1 = t_0 > ... > t_steps = 0.
  From t to s a masked token is revealed with probability (alpha_s - alpha_t)/(1 - alpha_t),
  its value drawn from p(x0 | z_t); at s = 0 all that is left is revealed. Uncached: one
  evaluation per step (until nothing is masked). Cached (MDLM's ddpm_cache): the network
  runs only in steps where some token of the batch is revealed, on the state left by the
  previous reveal, so NFE = number of steps with a reveal <= min(steps, masked tokens).
  Cached and uncached runs give the same tokens for the same seed (the random numbers of
  step k come from a generator keyed by k). The cache is exact only for a time-agnostic
  network; with ``time_conditioned`` it is not used.
  Exact for any source as steps -> infinity; at finite steps, tokens revealed in the same
  step are drawn independently given z_t.
- ``first_hitting``: ``steps`` is ignored. One token per evaluation, revealed at the exactly
  simulated next reveal time (diffusion.masked.first_hitting_time; a time-conditioned network
  gets that time), at a uniformly chosen masked position, its value from p(x0 | z).
  NFE = the largest number of free positions of a row (L without conditioning). Exact.
- ``confidence`` (MaskGIT / LLaDA low-confidence remasking): ``steps`` reveal rounds, one
  evaluation each, clipped to the number of free positions. Round j reveals k_j tokens of a
  row with M free positions, k_j = M // steps + (j < M % steps) (LLaDA's linear schedule, the
  remainder early), at the k_j most confident positions; ties are broken at random. The
  confidence (``max_prob`` | ``margin`` | ``neg_entropy``) is a function of the position's
  (filtered) distribution, not of a drawn token, and the value is then drawn from that
  distribution: with one token per round and exact conditionals the sampler is exact
  (an adaptive-order autoregression). LLaDA scores the drawn token instead, which with
  temperature > 0 favours frequent tokens; with temperature -> 0 the two coincide.
  A time-conditioned network gets t with 1 - alpha(t) = (masked / free) of the row.
- ``semi_ar`` (LLaDA semi-autoregressive): blocks of ``block_len`` positions, left to right;
  in each block the ``inner`` sampler reveals the block's free positions. Positions right of
  the current block stay [MASK] and the model sees them (the sequence keeps its length L,
  as in training), positions left of it are final. ``steps`` is split evenly over all
  ceil(L / block_len) blocks (the remainder to the first blocks, at least 1 each, so NFE may
  exceed ``steps`` when steps < number of blocks; a fully conditioned block is skipped and
  its share unused); each block's share means for ``inner`` what ``steps`` means above.
  Inner samplers restart their clock at t = 1 in every block.

Values are drawn from the denoiser's distribution after temperature, top-k and top-p
(dlmtrain/sampling/categorical.py), in float64 by default; reveal decisions use float64
uniforms either way.
"""

from __future__ import annotations

import torch

from dlmtrain.diffusion.masked import first_hitting_time, guided_log_probs, reveal_probability
from dlmtrain.errors import ConfigError
from dlmtrain.sampling.categorical import confidence, draw, filter_log_probs
from dlmtrain.sampling.registry import Rng, SamplerOptions


class Denoiser:
    """The module as the loops see it: guided log p(x0 | z_t), with evaluations counted."""

    def __init__(self, module, hide: torch.Tensor, opts: SamplerOptions):
        self.module, self.opts = module, opts
        self.mask_id, self.schedule = int(module.mask_id), module.schedule
        self.time_conditioned = bool(getattr(module, "time_conditioned", False))
        self.hide = hide  # conditioning positions, masked in the unconditional pass of CFG
        self.nfe = 0
        self.at = bool(getattr(module, "denoise_at", False))
        self._full = None  # the last full output of a module without ``at`` (see _eval)

    def _eval(self, z, t, at):
        self.nfe += 1
        if self.opts.on_nfe is not None:
            self.opts.on_nfe(1)
        if self.at:
            return self.module.denoise(z, t, at=at)
        full = self.module.denoise(z, t)
        # keep the [B, L, V] output alive until the next one replaces it: freeing it made the
        # CPU allocator trim and re-fault those buffers every evaluation (15-25% slower)
        self._full = full
        return full[at]

    def __call__(self, z: torch.Tensor, t, at: torch.Tensor) -> torch.Tensor:
        """Guided log p(x0 | z_t) at the positions ``at`` [B, L] bool: [M, V], row-major order."""
        t = torch.as_tensor(t, dtype=torch.float32, device=z.device).reshape(-1).expand(z.shape[0])
        logp = self._eval(z, t, at)
        if self.opts.cfg_scale > 0:
            uncond = self._eval(z.masked_fill(self.hide, self.mask_id), t, at)
            logp = guided_log_probs(logp, uncond, self.opts.cfg_scale)
        return logp


def _filtered(logp: torch.Tensor, opts: SamplerOptions) -> torch.Tensor:
    return filter_log_probs(logp, opts.temperature, opts.top_k, opts.top_p,
                            dtype=torch.float64 if opts.float64 else torch.float32)


def _draw(logp: torch.Tensor, g: torch.Generator, opts: SamplerOptions) -> torch.Tensor:
    return draw(_filtered(logp, opts), g, float64=opts.float64)


def run_ancestral(den: Denoiser, z, region, steps: int, opts: SamplerOptions, rng) -> torch.Tensor:
    """The reverse process on a uniform grid of ``steps`` (module docstring)."""
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    alpha = den.schedule.alpha(grid)
    use_cache = opts.cache and not den.time_conditioned
    for k in range(steps):
        masked = (z == den.mask_id) & region
        if not masked.any():
            break
        g = rng(k)
        u = torch.rand(z.shape, generator=g, device=z.device, dtype=torch.float64)
        p = 1.0 if k == steps - 1 else reveal_probability(alpha[k + 1], alpha[k]).item()
        reveal = masked & (u < p)
        # cache: evaluate only in steps with a reveal. z changes only by reveals, so the state
        # evaluated is the one left by the previous reveal: the output a cached network would reuse.
        any_reveal = bool(reveal.any())
        if not use_cache or any_reveal:
            logp = den(z, grid[k].item(), at=reveal)
        if any_reveal:
            z[reveal] = _draw(logp, g, opts)
    return z


def run_first_hitting(den: Denoiser, z, region, steps: int, opts: SamplerOptions, rng) -> torch.Tensor:
    """One token per evaluation at simulated reveal times; ``steps`` unused (module docstring)."""
    B = z.shape[0]
    masked = (z == den.mask_id) & region
    n = masked.sum(1)
    t = torch.ones(B, dtype=torch.float64, device=z.device)
    for i in range(int(n.max().item()) if B else 0):
        g = rng(i)
        active = n > 0
        u = torch.rand(B, generator=g, device=z.device, dtype=torch.float64)
        s = torch.where(active, first_hitting_time(den.schedule, t, n, u), t)
        # a uniformly chosen masked position per row (chosen before the evaluation, which draws
        # nothing, so that only those positions need the output head)
        r = torch.rand(z.shape, generator=g, device=z.device, dtype=torch.float64).masked_fill(~masked, -1.0)
        rows = active.nonzero().squeeze(1)
        pos = r.argmax(1)[rows]
        at = torch.zeros_like(masked)
        at[rows, pos] = True  # one per row, so row-major order is the order of rows
        z[rows, pos] = _draw(den(z, s, at=at), g, opts)
        masked[rows, pos] = False
        n = n - active.long()
        t = s
    return z


def run_confidence(den: Denoiser, z, region, steps: int, opts: SamplerOptions, rng) -> torch.Tensor:
    """Reveal the most confident positions over ``steps`` rounds (module docstring)."""
    B, L = z.shape
    masked = (z == den.mask_id) & region
    free = masked.sum(1)
    S = min(steps, int(free.max().item()) if B else 0)
    if S == 0:
        return z
    base, rem = free // S, free % S
    arange = torch.arange(L, device=z.device).expand(B, L)
    for j in range(S):
        g = rng(j)
        k = base + (j < rem).long()
        frac = masked.sum(1).double() / free.clamp_min(1).double()
        lp = _filtered(den(z, den.schedule.time_of_alpha(1.0 - frac), at=masked), opts)  # [masked positions, V]
        score = torch.full((B, L), float("-inf"), dtype=lp.dtype, device=z.device)
        score[masked] = confidence(lp, opts.confidence)
        # rank by score, ties in random order: sort a random permutation stably by score
        perm = torch.argsort(torch.rand(B, L, generator=g, device=z.device), dim=1)
        order = perm.gather(1, torch.argsort(score.gather(1, perm), dim=1, descending=True, stable=True))
        rank = torch.empty_like(order).scatter_(1, order, arange)
        reveal = masked & (rank < k[:, None])
        z[reveal] = draw(lp[reveal[masked]], g, float64=opts.float64)
        masked &= ~reveal
    return z


INNER = {"ancestral": run_ancestral, "first_hitting": run_first_hitting, "confidence": run_confidence}


def run_semi_ar(den: Denoiser, z, region, steps: int, opts: SamplerOptions, rng) -> torch.Tensor:
    """Blocks of ``opts.block_len`` left to right, ``opts.inner`` inside (module docstring)."""
    if opts.inner not in INNER:
        raise ConfigError(f"inner={opts.inner!r} cannot run inside semi_ar blocks; choose one of: {', '.join(INNER)}")
    inner = INNER[opts.inner]
    L = z.shape[1]
    starts = list(range(0, L, opts.block_len))
    for b, start in enumerate(starts):
        block = torch.zeros_like(region)
        block[:, start:start + opts.block_len] = True
        block &= region
        if not ((z == den.mask_id) & block).any():
            continue
        share = max(1, steps // len(starts) + (b < steps % len(starts)))
        z = inner(den, z, block, share, opts, lambda *keys, b=b: rng(b, *keys))
    return z


def _entry(loop):
    def sampler(module, fixed: torch.Tensor, opts: SamplerOptions, rng: Rng):
        cond = fixed >= 0
        den = Denoiser(module, cond, opts)
        z = torch.where(cond, fixed, torch.full_like(fixed, den.mask_id))
        z = loop(den, z, ~cond, opts.steps, opts, rng)
        return z, den.nfe

    sampler.__doc__ = loop.__doc__
    return sampler


MASKED_SAMPLERS = {
    "ancestral": _entry(run_ancestral),
    "first_hitting": _entry(run_first_hitting),
    "confidence": _entry(run_confidence),
    "semi_ar": _entry(run_semi_ar),
}
