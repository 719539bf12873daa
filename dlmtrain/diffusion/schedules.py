"""Noise schedules alpha(t): the probability that a token is still clean at time t.

Every schedule here is exact in alpha and alpha' (no autograd, no finite
differences), decreasing, with alpha(0) = 1 and alpha(1) = 0 so the prior at t = 1
is exactly the all-noise state and the NELBO needs no prior term. The two SEDD noises
at the end (LogLinearFloor, Geometric) are the exceptions, kept out of SCHEDULES: they
stop at alpha(1) > 0 (and Geometric starts at alpha(0) < 1), so an objective using
them adds a prior and a reconstruction term (dlmtrain/diffusion/score_entropy.py).

The continuous-time masked-diffusion NELBO weighs the cross-entropy of each
masked token at time t by  -alpha'(t) / (1 - alpha(t))  (Sahoo et al., 2024,
"Simple and Effective Masked Diffusion Language Models", eq. 10; Shi et al., 2024,
MD4, eq. 5).
"""

from __future__ import annotations

import math

import torch


class Schedule:
    name = "base"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)): the NELBO weight of a masked token at time t."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise -log alpha(t), clipped at 1e-6 < alpha: the backbone's conditioning input."""
        return -torch.log(self.alpha(t).clamp_min(1e-6))

    def dsigma(self, t: torch.Tensor) -> torch.Tensor:
        """d sigma / dt = -alpha'(t) / alpha(t): the rate of the CTMC form of the forward process."""
        return -self.alpha_prime(t) / self.alpha(t)

    def time_of_alpha(self, a: torch.Tensor) -> torch.Tensor:
        """The inverse of alpha: t with alpha(t) = a, for a in [0, 1] (samplers that draw reveal
        times). Generic fallback: 60 bisection steps on the decreasing alpha (exact to float64)."""
        a = torch.as_tensor(a, dtype=torch.float64)
        lo, hi = torch.zeros_like(a), torch.ones_like(a)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = self.alpha(mid) > a  # alpha decreases: the root lies right of mid
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 0.5 * (lo + hi)


class LogLinear(Schedule):
    """alpha(t) = 1 - t  (MDLM's "loglinear": sigma(t) = -log(1 - t)); weight 1/t."""

    name = "loglinear"

    def alpha(self, t):
        return 1.0 - t

    def alpha_prime(self, t):
        return -torch.ones_like(t)

    def time_of_alpha(self, a):
        return 1.0 - torch.as_tensor(a)


class Linear(Schedule):
    """Total noise linear in t, sigma(t) = s_min + t (s_max - s_min), alpha = exp(-sigma),
    affinely rescaled so that alpha(0) = 1 and alpha(1) = 0 exactly."""

    name = "linear"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        self.s0, self.s1 = sigma_min, sigma_max
        self.a0, self.a1 = math.exp(-sigma_min), math.exp(-sigma_max)

    def _raw(self, t):
        return torch.exp(-(self.s0 + t * (self.s1 - self.s0)))

    def alpha(self, t):
        return (self._raw(t) - self.a1) / (self.a0 - self.a1)

    def alpha_prime(self, t):
        return -(self.s1 - self.s0) * self._raw(t) / (self.a0 - self.a1)

    def time_of_alpha(self, a):
        raw = torch.as_tensor(a) * (self.a0 - self.a1) + self.a1
        return ((-torch.log(raw) - self.s0) / (self.s1 - self.s0)).clamp(0.0, 1.0)


class Cosine(Schedule):
    """alpha(t) = cos(pi t / 2) (Shi et al., 2024, MD4 "cosine"); weight ~ 2/t near 0."""

    name = "cosine"

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t).clamp_min(0.0)

    def alpha_prime(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def time_of_alpha(self, a):
        return torch.arccos(torch.as_tensor(a).clamp(0.0, 1.0)) * (2.0 / math.pi)


class LogLinearFloor(Schedule):
    """alpha(t) = 1 - (1 - a1) t: SEDD's / MDLM's LogLinearNoise with eps = a1, so
    sigma(t) = -log(1 - (1 - a1) t) stays finite, sigma(1) = -log a1 (Lou et al., 2024, SEDD)."""

    name = "loglinear_floor"

    def __init__(self, alpha1: float = 1e-3):
        self.a1 = float(alpha1)

    def alpha(self, t):
        return 1.0 - (1.0 - self.a1) * t

    def alpha_prime(self, t):
        return torch.full_like(t, -(1.0 - self.a1))

    def time_of_alpha(self, a):
        return ((1.0 - torch.as_tensor(a)) / (1.0 - self.a1)).clamp(0.0, 1.0)


class Geometric(Schedule):
    """SEDD's geometric noise (Lou et al., 2024; Song & Ermon's geometric sigmas):
    sigma(t) = sigma_min^(1-t) sigma_max^t, sigma'(t) = sigma(t) log(sigma_max / sigma_min),
    alpha = exp(-sigma): alpha(0) = exp(-sigma_min) < 1 and alpha(1) = exp(-sigma_max) > 0."""

    name = "geometric"

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"geometric noise needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.s0, self.s1 = float(sigma_min), float(sigma_max)
        self.log_ratio = math.log(self.s1 / self.s0)

    def sigma(self, t):  # exact (no clipping needed: sigma <= sigma_max)
        return self.s0 * torch.exp(t * self.log_ratio)

    def dsigma(self, t):
        return self.sigma(t) * self.log_ratio

    def alpha(self, t):
        return torch.exp(-self.sigma(t))

    def alpha_prime(self, t):
        return -self.dsigma(t) * self.alpha(t)

    def weight(self, t):  # sigma' / (e^sigma - 1), stable for small sigma
        s = self.sigma(t)
        return s * self.log_ratio / torch.expm1(s)

    def time_of_alpha(self, a):
        s = -torch.log(torch.as_tensor(a, dtype=torch.float64))
        return (torch.log(s / self.s0) / self.log_ratio).clamp(0.0, 1.0)


SCHEDULES = {"loglinear": LogLinear, "linear": Linear, "cosine": Cosine}


def get_schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule '{name}'; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]()


def stratified_times(
    n: int,
    *,
    offset: int = 0,
    total: int | None = None,
    antithetic: bool = True,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """n times in [0, 1). With ``antithetic``, the n times fall in strata offset .. offset+n-1
    of ``total`` equal strata, so a global batch split over ranks (offset = rank * n,
    total = world * n) covers [0, 1) evenly without communication; otherwise i.i.d.
    The strata are dealt to rows in random order, so each row's time is marginally
    U[0, 1) and its own estimate unbiased (row 0 must not always get the smallest t)."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=gen_device)
    if antithetic:
        total = total or n
        idx = offset + torch.randperm(n, generator=generator, device=gen_device)
        u = (idx.to(u.dtype) + u) / total
    return u.to(device) if device is not None else u


def draw_times(
    n: int, k: int, *, antithetic: bool = True, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """[n, k] times in [0, 1): k Monte Carlo draws for each of n sequences.

    With ``antithetic`` the design is a Latin square over the batch: [0, 1) is cut into
    n * k fine strata grouped in k coarse ones of width 1/k; every row gets one time in
    each coarse stratum (its k draws cover [0, 1)), and every fine stratum is used by
    exactly one (row, draw), so the batch covers [0, 1) evenly too (k = 1 is
    ``stratified_times``). Coarse strata are dealt to columns in random order per row,
    so each single draw is marginally U[0, 1) and unbiased on its own. Otherwise i.i.d."""
    gen_device = generator.device if generator is not None else device
    if not antithetic:
        u = torch.rand(n, k, generator=generator, device=gen_device)
        return u.to(device) if device is not None else u
    fine = torch.argsort(torch.rand(k, n, generator=generator, device=gen_device), dim=1)  # a permutation per stratum
    fine = (fine + n * torch.arange(k, device=gen_device)[:, None]).T  # [n, k]: row b's cell in coarse stratum c
    cols = torch.argsort(torch.rand(n, k, generator=generator, device=gen_device), dim=1)
    u = torch.rand(n, k, generator=generator, device=gen_device)
    t = (fine.gather(1, cols).to(u.dtype) + u) / (n * k)
    return t.to(device) if device is not None else t
