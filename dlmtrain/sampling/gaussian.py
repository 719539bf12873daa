"""Samplers for the gaussian objective (dlmtrain/modules/gaussian.py): ``ddpm`` (``ancestral`` is
an alias) and ``ddim``.

What they use of the module: ``backbone.table()`` (the normalised embeddings [V, d]),
``gamma_grid(steps)`` (gamma on the uniform grid 1 = t_0 > ... > t_steps = 0) and
``denoise_logits(z, gamma, self_cond)`` (x0 logits [B, L, V]). Reverse-step math:
dlmtrain/diffusion/gaussian.py.

Each of the ``steps`` steps is one network evaluation (NFE = steps): from t_k to t_{k+1},
the x0 logits at z_{t_k} give the embedding estimate e^ (their softmax expectation over the
embeddings, after temperature / top-k / top-p, dlmtrain/sampling/categorical.py), then
- ``ddpm``: z_s ~ q(z_s | z_t, x = e^), the ancestral step (fresh noise every step);
- ``ddim``: z_s = alpha_s e^ + sigma_s (z_t - alpha_t e^) / sigma_t (deterministic given z_1).
Both start from the prior N(0, I) the bound uses and are exact as steps -> infinity (for an
exact e^); with few steps they blur towards the mean of the tokens, and the final rounding
turns that into mode-seeking rather than NaN or invalid ids.
Self-conditioning: each evaluation reads the previous step's e^ (zeros at the first).
Rounding at the end: the argmax of the decoder p(x^i | z_0) of the bound, i.e. the nearest
embedding to z_0 / alpha_0 (no extra evaluation).

``sampling.clamp`` (Diffusion-LM's clamping trick, Li et al., 2022, sec. 4.2): e^ is replaced
by the embedding of its argmax token before every step (the denoiser's mode instead of its
mean); off by default, where e^ is the mean (CDCD's score interpolation).

Conditioning (prompt, suffix, fixed positions) by replacement: before every evaluation the
noisy vector of a given token is redrawn from q(z_t | x) at the step's own noise level, so the
network sees it as in training, and its self-conditioning input is the clean embedding; the
returned ids there are the given ones. The model was trained without conditioning, so this
is approximate (the free positions see the given tokens only through their noisy vectors);
the given tokens themselves never change. cfg_scale is not supported.
"""

from __future__ import annotations

import torch

from dlmtrain.diffusion.gaussian import alpha_sigma, ddim_step, ddpm_step, loglik_logits
from dlmtrain.errors import ConfigError
from dlmtrain.sampling.categorical import filter_log_probs
from dlmtrain.sampling.registry import Rng, SamplerOptions


def _randn(shape, g: torch.Generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=g.device).to(device)


def run_gaussian(module, fixed: torch.Tensor, opts: SamplerOptions, rng: Rng, deterministic: bool):
    if opts.cfg_scale > 0:
        raise ConfigError(f"cfg_scale={opts.cfg_scale}: classifier-free guidance is not implemented for the gaussian "
                          "samplers; set cfg_scale=0")
    net = module.backbone
    table = net.table()
    B, L = fixed.shape
    dev = fixed.device
    dtype = torch.float64 if opts.float64 else torch.float32
    cond = (fixed >= 0)[..., None]
    clean = table[fixed.clamp_min(0)]
    gammas = module.gamma_grid(opts.steps)
    z = _randn((B, L, net.dim), rng(-1), dev)
    sc = torch.where(cond, clean, torch.zeros_like(clean)) if net.self_cond is not None else None
    nfe = 0
    for k in range(len(gammas) - 1):
        g_t, g_s = gammas[k].item(), gammas[k + 1].item()
        gen = rng(k)
        if bool(cond.any()):
            a, s = (float(v) for v in alpha_sigma(torch.tensor(g_t, dtype=torch.float64)))
            z = torch.where(cond, a * clean + s * _randn(z.shape, gen, dev), z)
        logits = module.denoise_logits(z, g_t, sc)
        nfe += 1
        if opts.on_nfe is not None:
            opts.on_nfe(1)
        logp = filter_log_probs(logits, opts.temperature, opts.top_k, opts.top_p, dtype=dtype)
        if opts.clamp:
            e_hat = table[logp.argmax(-1)]
        else:
            e_hat = (logp.exp() @ table.to(dtype)).float()
        if sc is not None:
            sc = torch.where(cond, clean, e_hat)
        if deterministic:
            z = ddim_step(z, e_hat, g_t, g_s)
        else:
            z = ddpm_step(z, e_hat, g_t, g_s, _randn(z.shape, gen, dev))
    ids = loglik_logits(z, table, torch.tensor(gammas[-1].item(), device=dev)).argmax(-1)
    return torch.where(fixed >= 0, fixed, ids), nfe


def run_ddpm(module, fixed, opts, rng):
    """Ancestral sampling: z_s ~ q(z_s | z_t, e^) on ``steps`` uniform time steps (module docstring)."""
    return run_gaussian(module, fixed, opts, rng, deterministic=False)


def run_ddim(module, fixed, opts, rng):
    """DDIM (eta = 0) on ``steps`` uniform time steps (module docstring)."""
    return run_gaussian(module, fixed, opts, rng, deterministic=True)


GAUSSIAN_SAMPLERS = {"ddpm": run_ddpm, "ancestral": run_ddpm, "ddim": run_ddim}
