"""Ancestral sampling over a grid of noise levels: D3PM (absorbing or uniform) and UDLM.

What the sampler uses of the module: ``graph`` ("absorb" | "uniform"), ``mask_id`` (absorbing),
``n_tokens`` (the ids x0 can take), ``reverse_grid(steps) -> (times [S], alpha [S + 1] float64)``
(alpha decreasing towards the data: alpha[0] at the prior end, alpha[S] = 1) and
``denoise(z, time) -> log p~(x0 | z)`` [B, L, V]. What ``steps`` means is the module's
(``reverse_grid``): D3PM runs all T steps when steps >= T, else ``steps`` jumps between
integer steps; UDLM the uniform grid of ``steps`` intervals on [0, 1].

The chain starts from the prior the bound uses: absorbing all [MASK] except, with
probability alpha[0] (0 for the jsd schedule), a uniform token; uniform Unif over the
vocabulary. Each step from level alpha_t to alpha_s draws every free position from the
x0-parameterized reverse step p(z_s | z_t) ∝ sum_x0 q(z_s, z_t | x0) p~(x0 | z_t):
- absorbing: a masked token is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t),
  its value drawn from p~ (all that is left at the last step, alpha_s = 1). The reveal
  decisions do not depend on the network, so it is evaluated only in steps that reveal
  something: NFE <= min(steps, free positions of the batch).
- uniform: ``diffusion.uniform.uniform_posterior_log_probs``; one evaluation per step.
The last step (alpha_s = 1) draws the data from p(x0 | z_{t_1}), not an argmax. Temperature,
top-k and top-p reshape p~ before it enters the step (dlmtrain/sampling/categorical.py);
draws are float64 by default. Conditioning tokens (prompt, suffix, fixed) are in z from
the start, never change, and the model sees them (for uniform-state models as tokens that
might have been noised). Exact as steps -> infinity; at finite steps, positions move
independently given z_t within a step. A uniform-state model trained with
``model.document_mask`` samples each row as one document (its boundaries cannot be read off
noisy tokens).
"""

from __future__ import annotations

import torch

from dlmtrain.diffusion.d3pm import absorb_step_weight
from dlmtrain.diffusion.uniform import uniform_posterior_log_probs
from dlmtrain.errors import ConfigError
from dlmtrain.sampling.categorical import draw, filter_log_probs
from dlmtrain.sampling.registry import Rng, SamplerOptions


def _prior(module, shape, free: torch.Tensor, alpha_1: float, g: torch.Generator) -> torch.Tensor:
    """A draw of z_1 from the prior at the free positions (module docstring)."""
    dev = free.device
    tok = torch.randint(0, module.n_tokens, shape, generator=g, device=dev)
    if module.graph == "uniform":
        return tok
    tok = tok + (tok >= module.mask_id).long()  # a uniform id other than [MASK]
    u = torch.rand(shape, generator=g, device=dev, dtype=torch.float64)
    return torch.where(u < alpha_1, tok, torch.full_like(tok, module.mask_id))


def run_ancestral(module, fixed: torch.Tensor, opts: SamplerOptions, rng: Rng):
    if opts.cfg_scale > 0:
        raise ConfigError(f"cfg_scale={opts.cfg_scale}: classifier-free guidance is not implemented for "
                          f"{type(module).__name__}'s ancestral sampler; set cfg_scale=0")
    dtype = torch.float64 if opts.float64 else torch.float32
    # Under model.document_mask the backbone reads boundaries off the EOS tokens of its input,
    # which uniform noise puts anywhere (training passed the true ones): one document per row.
    seg = torch.zeros_like(fixed) if module.graph == "uniform" and module.cfg.model.document_mask else None
    free = fixed < 0
    times, alpha = module.reverse_grid(opts.steps)
    z = torch.where(free, _prior(module, fixed.shape, free, alpha[0].item(), rng(-1)), fixed)
    nfe = 0

    def evaluate(k):
        nonlocal nfe
        nfe += 1
        if opts.on_nfe is not None:
            opts.on_nfe(1)
        logp = module.denoise(z, times[k].item(), segment_ids=seg)
        return filter_log_probs(logp, opts.temperature, opts.top_k, opts.top_p, dtype=dtype)

    for k in range(len(times)):
        g = rng(k)
        a_t, a_s = alpha[k].item(), alpha[k + 1].item()
        if module.graph == "absorb":
            masked = (z == module.mask_id) & free
            if not masked.any():
                break
            u = torch.rand(z.shape, generator=g, device=z.device, dtype=torch.float64)
            p = 1.0 if a_s >= 1.0 else absorb_step_weight(a_s, a_t)
            reveal = masked & (u < p)
            if reveal.any():
                z[reveal] = draw(evaluate(k)[reveal], g, float64=opts.float64)
        else:
            post = uniform_posterior_log_probs(evaluate(k)[free], z[free], a_s, a_t)
            z[free] = draw(post, g, float64=opts.float64)
    return z, nfe


ANCESTRAL = {"ancestral": run_ancestral}
