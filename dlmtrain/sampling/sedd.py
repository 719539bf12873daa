"""Samplers for SEDD (dlmtrain/modules/sedd.py): Euler and Tweedie tau-leaping.

What a sampler uses of the module: ``graph`` (absorb | uniform), ``schedule``, ``eps``,
``n_tokens``, ``mask_id``, ``alpha1`` and ``raw_scores(z, t)``; the per-token step math is in
dlmtrain/diffusion/score_entropy.py, the loops are here.

What ``steps`` means: the number of reverse updates on the uniform grid
1 = t_0 > t_1 > ... > t_steps = eps (``objective.eps``). Update k evaluates the network once at
t_k and moves every free position independently from t_k to t_{k+1}. Then one final denoising
evaluation at eps decodes what is still corrupted, with the decoder of the bound's
reconstruction term (absorb: every remaining [MASK] drawn from softmax(u); uniform: Tweedie's
posterior to t = 0). NFE = steps + 1; absorb skips evaluations once nothing is masked.

- ``euler`` (SEDD's Euler predictor, tau-leaping): x ~ Cat(e_z + dt R_hat(z, .)) with the reverse
  rates at t_k, R_hat(z, y) = R_t(y -> z) e^{s_y}. Absorb: a [MASK] is revealed as y with probability
  dt w(t_k) e^{u_y}; uniform: z moves to y with probability dt sigma'(t_k)/N e^{s_y}. When the moves
  exceed probability 1 (few steps, large rates) the stay mass is clamped at 0.
- ``tweedie`` (SEDD's analytic predictor, its discrete Tweedie theorem): the exact one-token reverse
  marginal from t_k to t_{k+1} when the score is exact. Absorb: revealed as y with probability
  (alpha_s - alpha_t)/(1 - alpha_t) e^{u_y} (MDLM's ancestral step when the masses sum to 1; with
  loglinear noise, alpha = 1 - t, Euler's dt w(t) = dt / t is the same number: both draw alike).
- ``ancestral``: ``tweedie`` under MDLM's name (it is the reverse process with independent per-token
  draws, what MDLM's ancestral sampler is), so configs written for MDLM (configs/demo.yaml) run.
  Both samplers are exact as steps -> infinity; at finite steps tokens moving in the same step are
  drawn independently given z_t.

Start: the free positions are drawn from the bound's prior pi (absorb: [MASK], and with geometric
noise a uniform token with probability alpha(1) = e^{-sigma_max}; uniform: Unif(N)).

Conditioning (prompt, suffix, fixed positions): the tokens are clean in z from the start and
never updated (SEDD's projection). For absorb this is exact conditioning (a clean token is what
q_t shows of an unmasked position); for the uniform graph the network was trained on sequences
noisy everywhere and reads a clean token as a noisy observation, an approximation.

``temperature``/``top_k``/``top_p`` shape the value a [MASK] is revealed as (absorb), not the
reveal probability; the uniform graph's transitions have no separate value distribution, so
there they must stay 1/0/1. ``cfg_scale`` is not supported. Values are drawn with
dlmtrain/sampling/categorical.py (float64 by default); move decisions use float64 uniforms.
"""

from __future__ import annotations

import torch

from dlmtrain.diffusion.score_entropy import (absorb_log_mass, absorb_move_scale, uniform_decoder_log_probs,
                                              uniform_euler_probs, uniform_tweedie_probs)
from dlmtrain.errors import ConfigError
from dlmtrain.sampling.categorical import draw, filter_log_probs
from dlmtrain.sampling.registry import Rng, SamplerOptions


class _Scores:
    """The module's raw scores with evaluations counted."""

    def __init__(self, module, opts: SamplerOptions):
        self.module, self.opts, self.nfe = module, opts, 0

    def __call__(self, z, t):
        self.nfe += 1
        if self.opts.on_nfe is not None:
            self.opts.on_nfe(1)
        return self.module.raw_scores(z, t)


def _check(module, opts: SamplerOptions) -> None:
    if opts.cfg_scale > 0:
        raise ConfigError(f"cfg_scale={opts.cfg_scale}: SEDD's samplers have no classifier-free guidance; "
                          "set cfg_scale=0")
    if module.graph == "uniform" and (opts.temperature != 1.0 or opts.top_k > 0 or opts.top_p < 1.0):
        raise ConfigError("temperature/top_k/top_p are not defined for SEDD's uniform graph (its transitions have no "
                          "separate value distribution); leave them at 1 / 0 / 1 or use objective.graph=absorb")


def _start(module, fixed: torch.Tensor, rng: Rng) -> torch.Tensor:
    """The free positions drawn from the prior pi, the conditioning tokens in place."""
    g = rng(2)
    shape, dev = fixed.shape, fixed.device
    if module.graph == "absorb":
        z = torch.full_like(fixed, module.mask_id)
        if module.alpha1 > 0:  # pi = (1 - a1) [MASK] + a1 Unif(tokens)
            tok = torch.randint(0, module.n_tokens, shape, generator=g, device=dev)
            tok = tok + (tok >= module.mask_id).long()  # skip the [MASK] id
            z = torch.where(torch.rand(shape, generator=g, device=dev, dtype=torch.float64) < module.alpha1, tok, z)
    else:
        z = torch.randint(0, module.n_tokens, shape, generator=g, device=dev)
    return torch.where(fixed >= 0, fixed, z)


def _draw_values(u: torch.Tensor, g, opts: SamplerOptions) -> torch.Tensor:
    dtype = torch.float64 if opts.float64 else torch.float32
    return draw(filter_log_probs(u, opts.temperature, opts.top_k, opts.top_p, dtype=dtype), g, float64=opts.float64)


def _absorb(module, z, free, grid, method, opts, rng, scores) -> torch.Tensor:
    mask_id, n = module.mask_id, module.n_tokens
    for k in range(len(grid) - 1):
        masked = (z == mask_id) & free
        if not masked.any():
            return z
        u = absorb_log_mass(scores(z, grid[k].item())[masked], mask_id, n)  # [M, S]
        c = absorb_move_scale(method, grid[k].item(), grid[k + 1].item(), module.schedule)
        p = (c * torch.logsumexp(u.double(), dim=-1).exp()).clamp(max=1.0)
        g = rng(1, k)
        reveal = torch.rand(p.shape, generator=g, device=z.device, dtype=torch.float64) < p
        if reveal.any():
            where = masked.clone()
            where[masked] = reveal
            z[where] = _draw_values(u[reveal], g, opts)
    masked = (z == mask_id) & free
    if masked.any():  # final denoising: every [MASK] left is decoded
        u = absorb_log_mass(scores(z, module.eps)[masked], mask_id, n)
        z[masked] = _draw_values(u, rng(3), opts)
    return z


def _uniform(module, z, free, grid, method, opts, rng, scores) -> torch.Tensor:
    dtype = torch.float64 if opts.float64 else torch.float32
    sched, n = module.schedule, module.n_tokens
    alpha, dsigma = sched.alpha(grid), sched.dsigma(grid)
    for k in range(len(grid) - 1):
        s_hat, zf = scores(z, grid[k].item())[free], z[free]
        if method == "euler":
            rate_dt = ((grid[k] - grid[k + 1]) * dsigma[k] / n).item()
            probs = uniform_euler_probs(s_hat, zf, rate_dt, dtype)
        else:
            probs = uniform_tweedie_probs(s_hat, zf, (alpha[k] / alpha[k + 1]).item(), dtype)
        z[free] = draw(torch.log(probs), rng(1, k), float64=opts.float64)
    logp = uniform_decoder_log_probs(scores(z, module.eps)[free], z[free], alpha[-1].item(), dtype)
    z[free] = draw(logp, rng(3), float64=opts.float64)
    return z


def _entry(method: str):
    def sampler(module, fixed: torch.Tensor, opts: SamplerOptions, rng: Rng):
        _check(module, opts)
        scores = _Scores(module, opts)
        free = fixed < 0
        z = _start(module, fixed, rng)
        if free.any():
            grid = torch.linspace(1.0, module.eps, opts.steps + 1, dtype=torch.float64)
            loop = _absorb if module.graph == "absorb" else _uniform
            z = loop(module, z, free, grid, method, opts, rng, scores)
        return z, scores.nfe

    sampler.__doc__ = f"SEDD {method} tau-leaping (module docstring of dlmtrain/sampling/sedd.py)."
    return sampler


SEDD_SAMPLERS = {"euler": _entry("euler"), "tweedie": _entry("tweedie"), "ancestral": _entry("tweedie")}
