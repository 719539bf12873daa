"""Gaussian diffusion of token embeddings, with the continuous-time VLB in VDM form.

Papers: Kingma et al., 2021, "Variational Diffusion Models" (VDM); Li et al., 2022,
Diffusion-LM; Dieleman et al., 2022, CDCD; Gulrajani & Hashimoto, 2023, Plaid.

Embeddings. Each token v has a learned embedding row, normalised to unit norm
(``normalize_embeddings``, as Plaid), so every token has the same norm and SNR(t) is the
signal-to-noise ratio of a whole token: tokens become distinguishable around gamma = 0,
where the cosine schedule spends most of its time, whatever d. (With norm sqrt(d) that
point would move to gamma ~ log d.) The network reads z_t rescaled to unit variance per
dimension, z_t / sqrt(alpha_t^2 / d + sigma_t^2) (``input_scale``).

Forward process (VDM eq. 1-3), gamma(t) = -log SNR(t) increasing in t:
    q(z_t | x) = N(alpha_t e(x), sigma_t^2 I),  alpha_t^2 = sigmoid(-gamma_t),  sigma_t^2 = sigmoid(gamma_t)
(variance preserving: alpha^2 + sigma^2 = 1), independently per position.

Denoiser. x0 is predicted as a distribution over the vocabulary, p~(x^i | z_t), and the
embedding estimate is its expectation  e^(z_t) = sum_v p~(v) e_v  (CDCD's score
interpolation). Its logits are a network's context logits plus the exact log-likelihood of
the position's own noisy vector under each token (as Plaid's readout). Why: by Bayes,
p(x^i | z) = p(z^i | x^i) p(x^i | z^{-i}) / Z (the noise is independent per position), and
log p(z^i | x^i = v) is, up to a term free of v,

    loglik_v(z^i) = (alpha z^i . e_v - alpha^2 ||e_v||^2 / 2) / sigma^2.

So the network only has to model p(x^i | the other positions), and at low noise the
estimate is exact by construction.

The bound (VDM eq. 11, 17), per position, every term kept (nats):

    -log p(x) <=  E_{q(z_0|x)} -log p(x | z_0)                           reconstruction
               +  1/2 int_0^1 gamma'(t) exp(-gamma(t)) E ||e(x) - e^(z_t, t)||^2 dt   diffusion
               +  KL(q(z_1 | x) || N(0, I))                               prior

- diffusion: -1/2 SNR'(t) ||e - e^||^2 with SNR = exp(-gamma), so the weight is
  1/2 gamma'(t) exp(-gamma(t)) (``diffusion_weight``). gamma(0) = gamma_min is finite, so the
  integral is over all of [0, 1] and nothing is cut; it is estimated at one t per draw
  (stratified over the batch). With a fixed e^ = c it equals 1/2 (SNR(0) - SNR(1)) ||e - c||^2.
- reconstruction: VDM's decoder p(x^i = v | z_0) = softmax_v loglik_v(z_0^i): the posterior
  of the token given its own vector at the smallest noise, uniform prior over tokens.
- prior: closed form, 1/2 [alpha_1^2 ||e||^2 + d (sigma_1^2 - 1 - log sigma_1^2)]
  = 1/2 [alpha_1^2 (||e||^2 - d) + d softplus(-gamma_1)] (``prior_kl``), ~ exp(-gamma_1) / 2
  for unit-norm e.
With the exact posterior mean e^ = E[e | z_t] the expectation over x of the sum is
H(x) + KL(q(z_1) || N(0, I)) + E KL(q(x | z_0) || p(x | z_0)) (I-MMSE; Guo et al., 2005):
tight up to the two endpoint gaps, which gamma_max and gamma_min control.

Discrete time, T steps (VDM eq. 13): the diffusion term becomes
    T/2 E_{i ~ U{1..T}} (SNR(s) - SNR(t)) ||e - e^(z_t, t)||^2,  s = (i-1)/T, t = i/T,
which is >= the continuous one (VDM: more steps never loosen the bound); reconstruction and
prior are unchanged.

Schedules of gamma(t) (exact gamma and gamma'): ``LinearGamma`` (linear in log-SNR),
``CosineGamma`` (alpha = cos, sigma = sin of an angle linear in t, truncated to
[gamma_min, gamma_max]: gamma = 2 log tan(a t + b)), ``LearnedGamma`` (VDM / Plaid:
learned endpoints and a monotone network between them).

Reverse steps for samplers, from t to s < t (VDM appendix A.4; derived: with
c = 1 - SNR(t)/SNR(s) = -expm1(gamma_s - gamma_t) the posterior q(z_s | z_t, x) is
N((1 - c) (alpha_s/alpha_t) z_t + c alpha_s e, c sigma_s^2 I)):
``ddpm_step`` plugs e^ in for e; ``ddim_step`` (Song et al., 2021, eta = 0) moves along
z_s = alpha_s e^ + sigma_s eps^ with eps^ = (z_t - alpha_t e^) / sigma_t.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def normalize_embeddings(weight: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm [V, d] (float32)."""
    w = weight.float()
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def input_scale(gamma: torch.Tensor, d: int) -> torch.Tensor:
    """1 / sqrt(alpha^2 / d + sigma^2): z_t times it has unit variance per dimension (unit-norm e)."""
    return torch.rsqrt(torch.sigmoid(-gamma) / d + torch.sigmoid(gamma))


def alpha_sigma(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) with alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma) (VDM eq. 3)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def _col(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A per-row value [B] (or a scalar) shaped to broadcast against ref [B, ...]."""
    x = torch.as_tensor(x, device=ref.device)
    return x.reshape(-1, *([1] * (ref.dim() - 1))) if x.dim() else x


def diffuse(e: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_t = alpha_t e + sigma_t noise; e, noise [B, L, d], gamma [B] or scalar."""
    a, s = alpha_sigma(_col(gamma, e).to(e.dtype))
    return a * e + s * noise


def loglik_logits(z: torch.Tensor, table: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """log N(z^i; alpha e_v, sigma^2 I) up to a term free of v [B, L, V] (float32, also under
    autocast): the own-position log-likelihood of each token (module docstring)."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        g = _col(gamma, z).float()
        a, s = alpha_sigma(g)
        sq = (table.float() ** 2).sum(-1)  # ||e_v||^2 [V]
        return (a * (z.float() @ table.float().T) - 0.5 * a * a * sq) / (s * s)


def x0_embedding(logits: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """e^ = sum_v softmax(logits)_v e_v [B, L, d] (float32, also under autocast: the diffusion
    term weighs its error by up to exp(-gamma_min) / 2 per unit)."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return torch.softmax(logits.float(), dim=-1) @ table.float()


def diffusion_weight(gamma: torch.Tensor, dgamma: torch.Tensor) -> torch.Tensor:
    """1/2 gamma'(t) exp(-gamma(t)) = -1/2 SNR'(t) (VDM eq. 17)."""
    return 0.5 * dgamma * torch.exp(-gamma)


def diffusion_term(e: torch.Tensor, e_hat: torch.Tensor, gamma: torch.Tensor, dgamma: torch.Tensor) -> torch.Tensor:
    """The continuous-time integrand per position [B, L]: 1/2 gamma' exp(-gamma) ||e - e^||^2."""
    w = diffusion_weight(gamma, dgamma)
    return _col(w, e[..., 0]) * ((e - e_hat) ** 2).sum(-1)


def discrete_diffusion_term(e: torch.Tensor, e_hat: torch.Tensor, gamma_s: torch.Tensor, gamma_t: torch.Tensor,
                            T: int) -> torch.Tensor:
    """T/2 (SNR(s) - SNR(t)) ||e - e^||^2 per position [B, L] (VDM eq. 13), one drawn step of T."""
    w = -0.5 * T * torch.exp(-gamma_s) * torch.expm1(gamma_s - gamma_t)  # exp(-g_s) - exp(-g_t), stably
    return _col(w, e[..., 0]) * ((e - e_hat) ** 2).sum(-1)


def reconstruction_nll(z0: torch.Tensor, x: torch.Tensor, table: torch.Tensor, gamma0: torch.Tensor) -> torch.Tensor:
    """-log p(x^i | z_0^i) [B, L] under VDM's decoder softmax_v loglik_v(z_0^i)."""
    logp = torch.log_softmax(loglik_logits(z0, table, gamma0), dim=-1)
    return -logp.gather(-1, x.unsqueeze(-1)).squeeze(-1)


def prior_kl(e: torch.Tensor, gamma1: torch.Tensor) -> torch.Tensor:
    """KL(N(alpha_1 e, sigma_1^2 I) || N(0, I)) per position [B, L] (module docstring)."""
    g = _col(gamma1, e[..., 0]).float()
    d = e.shape[-1]
    a2 = torch.sigmoid(-g)
    return 0.5 * (a2 * ((e.float() ** 2).sum(-1) - d) + d * F.softplus(-g))


# ---- schedules gamma(t) --------------------------------------------------------------------------


class LinearGamma:
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t: linear in log-SNR (VDM's fixed schedule)."""

    learned = False

    def __init__(self, gamma_min: float, gamma_max: float):
        self.g0, self.g1 = float(gamma_min), float(gamma_max)

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma(t), gamma'(t)), each shaped like t."""
        return self.g0 + (self.g1 - self.g0) * t, torch.full_like(t, self.g1 - self.g0)


class CosineGamma:
    """alpha = cos(u), sigma = sin(u) with u = a t + b (the cosine schedule, Nichol & Dhariwal 2021,
    truncated as in Hoogeboom et al. 2023): gamma = 2 log tan u, tan b = exp(gamma_min / 2),
    tan(a + b) = exp(gamma_max / 2); gamma' = 4 a / sin(2u)."""

    learned = False

    def __init__(self, gamma_min: float, gamma_max: float):
        self.g0, self.g1 = float(gamma_min), float(gamma_max)
        self.b = math.atan(math.exp(0.5 * gamma_min))
        self.a = math.atan(math.exp(0.5 * gamma_max)) - self.b

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.a * t + self.b
        return 2.0 * torch.log(torch.tan(u)), 4.0 * self.a / torch.sin(2.0 * u)


class LearnedGamma(nn.Module):
    """gamma(t) = gamma_0 + (gamma_1 - gamma_0) g(t) (VDM appendix; Plaid): learned endpoints,
    gamma_1 = gamma_0 + softplus(delta) > gamma_0, and a monotone g with g(0) = 0, g(1) = 1:

        f(t) = softplus(w) t + sum_k softplus(a_k) sigmoid(softplus(b_k) (t - c_k)),
        g(t) = (f(t) - f(0)) / (f(1) - f(0)),  g'(t) = f'(t) / (f(1) - f(0)),

    every coefficient of f positive, so f and g increase (f' in closed form, no autograd).
    Initialised near gamma linear in t from (gamma_min, gamma_max). The bound depends only
    on the endpoints in expectation (VDM's invariance of the continuous-time loss); the interior
    shapes the variance, which the module minimises by rescaling the interior's gradient
    (``forward``'s ``grad_scale``)."""

    learned = True

    def __init__(self, gamma_min: float, gamma_max: float, hidden: int = 32):
        super().__init__()
        self.gamma_0 = nn.Parameter(torch.tensor(float(gamma_min)))
        gap = float(gamma_max) - float(gamma_min)
        self.delta = nn.Parameter(torch.tensor(gap + math.log(-math.expm1(-gap))))  # softplus^-1(gap)
        self.w = nn.Parameter(torch.tensor(1.0))
        self.a = nn.Parameter(torch.full((hidden,), -4.0))  # softplus(-4) ~ 0.018: f ~ linear at init
        self.b = nn.Parameter(torch.full((hidden,), 1.5))
        self.c = nn.Parameter(torch.linspace(0.0, 1.0, hidden))
        self._hook_scale: torch.Tensor | None = None

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gamma_0, self.gamma_0 + F.softplus(self.delta)

    def _f(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ak, bk = F.softplus(self.a), F.softplus(self.b)
        s = torch.sigmoid(bk * (t[..., None] - self.c))
        f = F.softplus(self.w) * t + (ak * s).sum(-1)
        df = F.softplus(self.w) + (ak * bk * s * (1 - s)).sum(-1)
        return f, df

    def interior(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g(t), g'(t)) shaped like t."""
        dtype = self.w.dtype  # the parameters' (float32; float64 after .double(), for exact checks)
        f, df = self._f(t.to(dtype))
        ends, _ = self._f(torch.tensor([0.0, 1.0], dtype=dtype, device=t.device))
        span = ends[1] - ends[0]
        return (f - ends[0]) / span, df / span

    def forward(self, t: torch.Tensor, grad_scale: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma(t), gamma'(t)). ``grad_scale``: a list the caller fills with one tensor (per row of
        t) before backward; the gradient reaching the interior's parameters is multiplied by it."""
        g, dg = self.interior(t)
        if grad_scale is not None and torch.is_grad_enabled():
            for x in (g, dg):
                if x.requires_grad:
                    x.register_hook(lambda grad: grad * grad_scale[0])
        g0, g1 = self.endpoints()
        return g0 + (g1 - g0) * g, (g1 - g0) * dg


def make_gamma(name: str, gamma_min: float, gamma_max: float):
    if name == "linear":
        return LinearGamma(gamma_min, gamma_max)
    if name == "cosine":
        return CosineGamma(gamma_min, gamma_max)
    if name == "learned":
        return LearnedGamma(gamma_min, gamma_max)
    raise ValueError(f"unknown gamma schedule {name!r}; choose one of linear, cosine, learned")


# ---- reverse steps (samplers: dlmtrain/sampling/gaussian.py) --------------------------------------


def ddpm_step(z_t: torch.Tensor, e_hat: torch.Tensor, gamma_t, gamma_s, noise: torch.Tensor) -> torch.Tensor:
    """One ancestral step t -> s < t: a draw of q(z_s | z_t, x = e^) (module docstring)."""
    g_t, g_s = torch.as_tensor(gamma_t, dtype=torch.float64), torch.as_tensor(gamma_s, dtype=torch.float64)
    c = -torch.expm1(g_s - g_t)
    a_t, _ = alpha_sigma(g_t)
    a_s, s_s = alpha_sigma(g_s)
    mean = float((1 - c) * a_s / a_t) * z_t + float(c * a_s) * e_hat
    return mean + float(torch.sqrt(c) * s_s) * noise


def ddim_step(z_t: torch.Tensor, e_hat: torch.Tensor, gamma_t, gamma_s) -> torch.Tensor:
    """One deterministic DDIM step t -> s: z_s = alpha_s e^ + sigma_s (z_t - alpha_t e^) / sigma_t."""
    a_t, s_t = alpha_sigma(torch.as_tensor(gamma_t, dtype=torch.float64))
    a_s, s_s = alpha_sigma(torch.as_tensor(gamma_s, dtype=torch.float64))
    r = float(s_s / s_t)
    return r * z_t + float(a_s - r * a_t) * e_hat
