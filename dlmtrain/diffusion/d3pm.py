"""D3PM: discrete-time discrete diffusion (Austin et al., 2021, "Structured Denoising
Diffusion Models in Discrete State-Spaces").

Transitions, T steps, [Q_t]_ij = q(x_t = j | x_{t-1} = i), with abar_t = prod_{s<=t} (1 - beta_s):
- absorbing: Q_t = (1 - beta_t) I + beta_t 1 e_m^T,   Qbar_t = abar_t I + (1 - abar_t) 1 e_m^T
- uniform:   Q_t = (1 - beta_t) I + beta_t 11^T / N,  Qbar_t = abar_t I + (1 - abar_t) 11^T / N
Both have closed forms, so nothing here builds an N x N matrix (N up to 50k and more).

Schedules (``alpha_bars``), abar_0 = 1:
- ``jsd``: beta_t = 1 / (T - t + 1), so abar_t = 1 - t/T and abar_T = 0 (D3PM's choice for absorbing).
- ``cosine``: abar(t) = cos((t/T + 0.008)/1.008 pi/2), beta_t = 1 - abar(t)/abar(t-1) clipped at
  0.999 (D3PM's uniform choice, after Nichol & Dhariwal 2021); abar_T ~ 1e-3 abar_{T-1} > 0.
- ``linear``: beta_t linear from 1e-4 to 0.02 at T = 1000 (Ho et al., 2020), rescaled by 1000/T
  so that abar_T ~ e^-10 for any T; clipped at 0.999.

Variational bound, per sequence (D3PM's L_vb), with x0-parameterization
p(x_{t-1} | x_t) ∝ sum_x0 q(x_{t-1}, x_t | x0) p~(x0 | x_t):

    L = KL(q(x_T | x0) || p(x_T))  +  sum_{t=2}^T E KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
        + E[-log p(x0 | x_1)]

All terms factorise over positions. The middle sum and the reconstruction are estimated by
one step t ~ U{1..T} per draw, times T (the t = 1 term is the reconstruction: the step KL
formulas at abar_0 = 1 reduce to it); the prior is exact. Per token:
- absorbing, masked x_t: the posterior puts (abar_{t-1} - abar_t)/(1 - abar_t) on x0 and the rest
  on [MASK], the model the same weight times p~ on the tokens, so the KL is
  (abar_{t-1} - abar_t)/(1 - abar_t) * -log p~(x0 | x_t); an unmasked x_t is x0 under both (KL 0).
  With the jsd schedule this is MDLM's discrete bound (diffusion/masked.py ``discrete_weights``).
- uniform: ``uniform_step_kl`` (diffusion/uniform.py; the optimal p~ there is the posterior of
  x0^i given the other noisy tokens, not given all of x_t: see that module).
Prior p(x_T) = q(x_T | x0 uniform): all-[MASK] mixed with abar_T Unif over the tokens (absorbing),
Unif(N) (uniform). KL per token: abar_T log N (absorbing), ``uniform_prior_kl`` (uniform); both 0
at abar_T = 0.

Hybrid loss (D3PM): L_lambda = L_vb + lambda E_t[-log p~(x0 | x_t)] with the auxiliary term
added at the same drawn step as the L_vb term; in our units (L_vb estimated by T times one step)
it enters as T * lambda * CE. Training only: ``nelbo`` is always L_vb.
"""

from __future__ import annotations

import math

import torch

from dlmtrain.diffusion.masked import corrupt
from dlmtrain.diffusion.uniform import corrupt_uniform, uniform_prior_kl, uniform_step_kl

GRAPHS = ("absorb", "uniform")
SCHEDULES = ("jsd", "cosine", "linear")


def alpha_bars(schedule: str, T: int) -> torch.Tensor:
    """abar_t for t = 0..T, float64 [T + 1] (module docstring); abar_0 = 1, decreasing."""
    t = torch.arange(T + 1, dtype=torch.float64)
    if schedule == "jsd":
        return 1.0 - t / T
    if schedule == "cosine":
        f = torch.cos((t / T + 0.008) / 1.008 * math.pi / 2)
        betas = (1.0 - f[1:] / f[:-1]).clamp(max=0.999)
    elif schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64) * (1000.0 / T)
        betas = betas.clamp(max=0.999)
    else:
        raise ValueError(f"unknown D3PM schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, 0)])


def draw_steps(t: torch.Tensor, T: int) -> torch.Tensor:
    """Steps i = floor(t T) + 1 in 1..T (long) from times t in [0, 1): uniform on {1..T} when t is."""
    return (t.double() * T).floor().clamp(0, T - 1).long() + 1


def corrupt_d3pm(graph: str, x0: torch.Tensor, abar: torch.Tensor, n_states: int, mask_id: int | None,
                 generator=None, keep=None) -> torch.Tensor:
    """x_t ~ q(x_t | x0) = x0 Qbar_t with abar [B] (float64): absorbing masks with probability
    1 - abar, uniform resamples uniformly over n_states ids with probability 1 - abar."""
    if graph == "absorb":
        return corrupt(x0, 1.0 - abar, mask_id, generator, keep=keep)
    return corrupt_uniform(x0, abar, n_states, generator, keep=keep)


def absorb_step_weight(abar_s: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """(abar_s - abar_t) / (1 - abar_t): the KL weight of a masked token's cross-entropy for the
    reverse step t -> s (s = t - 1, or any s < t); 1 at abar_s = 1 (reconstruction)."""
    return (abar_s - abar_t) / (1.0 - abar_t)


def step_kl(graph: str, logp: torch.Tensor, x0: torch.Tensor, z: torch.Tensor, abar_s, abar_t,
            mask_id: int | None = None) -> torch.Tensor:
    """KL(q(x_s | x_t, x0) || p(x_s | x_t)) per token [B, L] (float64), x0-parameterization.

    logp [B, L, N]: log p~(x0 | x_t), with -inf on [MASK] for absorbing; abar_s > abar_t ([B])."""
    if graph == "absorb":
        w = absorb_step_weight(torch.as_tensor(abar_s, dtype=torch.float64, device=z.device),
                               torch.as_tensor(abar_t, dtype=torch.float64, device=z.device))
        nll = -_gather(logp, x0).double()
        return torch.where(z == mask_id, w.reshape(-1, 1) * nll, torch.zeros_like(nll))
    return uniform_step_kl(logp, x0, z, abar_s, abar_t)


def prior_kl(graph: str, abar_T: float, n_tokens: int) -> float:
    """KL(q(x_T | x0) || p(x_T)) per token in nats (module docstring); n_tokens: the ids x0 can take
    (absorbing: all but [MASK]; uniform: all N)."""
    if graph == "absorb":
        return float(abar_T) * math.log(n_tokens)
    return float(uniform_prior_kl(abar_T, n_tokens))


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
