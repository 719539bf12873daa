"""Uniform-state diffusion: each token is replaced by a uniformly drawn one (no [MASK]).

Forward process (Austin et al., 2021, D3PM "uniform"; Schiff et al., 2025, UDLM; Sahoo et
al., 2025, DUO), over N token ids, with alpha(t) the probability that a token is untouched:

    q(z_t | x) = Cat(z_t; alpha_t e_x + (1 - alpha_t) / N * 1)

and from a level s to a later level t the process is itself uniform with retention
alpha_t / alpha_s, so everything below takes a pair (alpha_s, alpha_t) with alpha_s > alpha_t:
one D3PM step (alpha_s = abar_{t-1}, alpha_t = abar_t), a subsampled one, or a
continuous-time step.

Posterior (D3PM: q(x_{t-1} | x_t, x0) ∝ x_t Q_t^T ⊙ x0 Qbar_{t-1}), with b = 1 - alpha_t/alpha_s,
u = 1/N, c = (1 - alpha_s) u:

    q(z_s = j | z_t = z, x) ∝ f_j g_j,   f_j = (1 - b) [j = z] + b u,   g_j = alpha_s [j = x] + c.

x0-parameterization (D3PM: p(x_{t-1} | x_t) ∝ sum_x0 q(x_{t-1}, x_t | x0) p~(x0 | x_t); UDLM and
DUO plug xhat into the posterior's numerator and denominator, the same thing): with the
denoiser's distribution xhat = p~(x0 | z_t), g~_j = alpha_s xhat_j + c and
p(z_s = j | z_t) ∝ f_j g~_j. Both distributions are over N ids per position, built from
[B, L, N] log-probabilities without any N x N matrix (the V x V transition matrices of
D3PM have this closed form).

What the denoiser should output (derived here). The true reverse step of position i is
q(z_s^i | z_t) ∝ sum_x q(z_s^i, z_t^i | x) p(x^i = x | z_t) / q(z_t^i | x): the weights carry
1 / q(z_t^i | x), which the form above leaves out. So the form is exact, and the bound tight
(-log p(x) as T -> infinity), when xhat_x ∝ p(x^i = x | z_t) / q(z_t^i | x) ∝ p(x^i = x | z_t
without position i): the posterior given the *other* noisy tokens. The optimum of the
training loss is that leave-one-out posterior, not p(x^i | z_t); the model's own belief about
x^i given all of z_t is p(z_0 = x | z_t), the reverse step to the data (alpha_s = 1), which
multiplies the own-token likelihood back in. For absorbing noise the two coincide (a
[MASK] says nothing about its token), which is why the masked models can output p(x^i | z_t).

Continuous time (T -> infinity). Writing s = t - dt, b = -alpha'/alpha dt + O(dt^2), q puts
mass 1 - O(dt) on z, and expanding the KL to first order in dt (derived here; it agrees with
OBJECTIVES.md sec. 4(b), UDLM's and DUO's closed form) gives, per token, with
xbar = N alpha e_x + (1 - alpha) 1 and xbar_th = N alpha xhat + (1 - alpha) 1:

    l(t) = alpha'/(N alpha) [ N/xbar_z - N/xbar_th,z - sum_j (xbar_j/xbar_z) log(xbar_th,z xbar_j / (xbar_th,j xbar_z)) ]

(>= 0, and 0 iff xhat = e_x). The NELBO is  int_0^1 E l(t) dt + KL(q(z_1|x) || Unif)
(the prior term is 0 when alpha(1) = 0). ``tests/diffusion/test_uniform.py`` checks that
T * KL(one D3PM step) -> l(t) numerically.

Numerics: with r = N alpha/(1 - alpha) every quantity is written through
rho_j = log(1 + r xhat_j) = softplus(log r + log xhat_j), which is accurate in relative terms
for small r (near pure noise the bracket is O(r^2) and naive forms lose it) and needs one
reduction over the vocabulary; the rest is per position in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def corrupt_uniform(x0: torch.Tensor, alpha: torch.Tensor, vocab: int, generator=None, keep=None) -> torch.Tensor:
    """z ~ q(z_t | x): each token of x0 [B, L] is kept with probability alpha ([B] or [B, L]) and
    otherwise replaced by a uniform draw over ``vocab`` ids (which may be the token itself).
    Positions where ``keep`` is True never change (padding, known boundaries)."""
    a = alpha if alpha.dim() == 2 else alpha[:, None]
    dev = generator.device if generator is not None else x0.device
    u = torch.rand(x0.shape, generator=generator, device=dev, dtype=torch.float64).to(x0.device)
    r = torch.randint(0, vocab, x0.shape, generator=generator, device=dev).to(x0.device)
    move = u >= a.to(torch.float64)
    if keep is not None:
        move &= ~keep
    return torch.where(move, r, x0)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def _col(a, logp: torch.Tensor, dims: int | None = None) -> torch.Tensor:
    """alpha (a scalar, or one per row [B]) as float64 shaped to broadcast against a tensor of
    ``dims`` dimensions (default: logp's without the vocabulary axis) whose first axis is B."""
    a = torch.as_tensor(a, dtype=torch.float64, device=logp.device)
    dims = logp.dim() - 1 if dims is None else dims
    return a if a.dim() == 0 else a.reshape(-1, *([1] * (dims - 1)))


def uniform_integrand(logp: torch.Tensor, x0: torch.Tensor, z: torch.Tensor, alpha, dalpha) -> torch.Tensor:
    """The continuous-time NELBO integrand l(t) per token [B, L] (float64), module docstring.

    logp [B, L, N]: log xhat = log p(x0 | z_t); x0, z [B, L]; alpha, dalpha: alpha(t), alpha'(t)
    per row ([B]) with 0 < alpha < 1."""
    N = logp.shape[-1]
    a, da = _col(alpha, logp), _col(dalpha, logp)
    log_r = math.log(N) + torch.log(a) - torch.log1p(-a)  # r = N a / (1 - a)
    rho_sum = F.softplus(logp + log_r.to(logp.dtype)[..., None]).sum(-1).double()  # sum_j log(1 + r xhat_j)
    rho_x = F.softplus(_gather(logp, x0).double() + log_r)
    rho_z = F.softplus(_gather(logp, z).double() + log_r)
    r, k = torch.exp(log_r), 1.0 - a
    log1p_r = torch.log1p(r)
    S = rho_sum - N * rho_z  # sum_j log(xbar_th,j / xbar_th,z)
    same = z == x0
    # sum_j (xbar_j/xbar_z) log(xbar_th,z xbar_j / (xbar_th,j xbar_z)), the two cases of z
    J_same = -(S + (N - 1) * log1p_r) / (1.0 + r)
    J_diff = -S - r * (rho_x - rho_z) + (1.0 + r) * log1p_r
    # N/xbar_z - N/xbar_th,z, with xbar_z = k (1 + r [z = x]) and xbar_th,z = k exp(rho_z)
    inv = (N / k) * (torch.where(same, 1.0 / (1.0 + r), torch.ones_like(r)) - torch.exp(-rho_z))
    return da / (N * a) * (inv - torch.where(same, J_same, J_diff))


def uniform_step_kl(logp: torch.Tensor, x0: torch.Tensor, z: torch.Tensor, alpha_s, alpha_t) -> torch.Tensor:
    """KL(q(z_s | z_t, x) || p(z_s | z_t)) per token [B, L] (float64) for one reverse step from
    level alpha_t to alpha_s > alpha_t ([B] or scalars) under the x0-parameterization.

    Closed form (derived here from the module docstring's f, g, g~; Z_q = sum f g, Z_p = sum f g~):
        KL = [ b u sum_j g_j log(g_j / g~_j) + (1 - b) g_z log(g_z / g~_z) ] / Z_q + log(Z_p / Z_q),
        sum_j g_j log(g_j / g~_j) = -c sum_j rho_j + c rho_x + (c + alpha_s)(log(c + alpha_s) - log g~_x),
        rho_j = log(g~_j / c) = softplus(log(alpha_s / c) + log xhat_j),
        Z_q = (1 - b) g_z + b u,   Z_p = (1 - b) g~_z + b u.
    With alpha_s = 1 (the last step to the data, c = 0) this is the reconstruction term
    -log p(x0 | z_t) = -log(f_x xhat_x / Z_p)."""
    N = logp.shape[-1]
    a_s, a_t = _col(alpha_s, logp), _col(alpha_t, logp)
    u = 1.0 / N
    b = 1.0 - a_t / a_s
    c = (1.0 - a_s) * u
    live = c > 0
    log_c = torch.log(torch.where(live, c, torch.ones_like(c)))
    log_ratio = torch.where(live, torch.log(a_s) - log_c, torch.zeros_like(c))  # log(alpha_s / c)
    rho_sum = F.softplus(logp + log_ratio.to(logp.dtype)[..., None]).sum(-1).double()
    lp_x, lp_z = _gather(logp, x0).double(), _gather(logp, z).double()
    rho_x = F.softplus(lp_x + log_ratio)
    lg_x = torch.logaddexp(torch.log(a_s) + lp_x, torch.where(live, log_c, torch.full_like(c, -math.inf)))
    lg_z = torch.logaddexp(torch.log(a_s) + lp_z, torch.where(live, log_c, torch.full_like(c, -math.inf)))
    G = torch.log(c + a_s)
    same = z == x0
    sum_g = torch.where(live, c * (rho_x - rho_sum), torch.zeros_like(c)) + (c + a_s) * (G - lg_x)
    g_z = torch.where(same, c + a_s, c.expand_as(lp_z))
    log_gz = torch.where(same, G, log_c.expand_as(lp_z))
    zterm = torch.where(g_z > 0, g_z * (log_gz - lg_z), torch.zeros_like(g_z))
    Zq = (1.0 - b) * g_z + b * u
    Zp = (1.0 - b) * torch.exp(lg_z) + b * u
    return (b * u * sum_g + (1.0 - b) * zterm) / Zq + torch.log(Zp) - torch.log(Zq)


def uniform_posterior_log_probs(logp: torch.Tensor, z: torch.Tensor, alpha_s, alpha_t) -> torch.Tensor:
    """log p(z_s | z_t) [B, L, N] in logp's dtype: the x0-parameterized reverse step
    ∝ f_j (alpha_s xhat_j + c) (module docstring); alpha_s = 1 gives the final step to the data."""
    N = logp.shape[-1]
    a_s, a_t = _col(alpha_s, logp, logp.dim()), _col(alpha_t, logp, logp.dim())
    u = 1.0 / N
    b = 1.0 - a_t / a_s
    c = (1.0 - a_s) * u
    log_g = torch.logaddexp(logp + torch.log(a_s).to(logp.dtype), torch.log(c).to(logp.dtype))
    log_f = torch.log(b * u).to(logp.dtype).expand_as(logp).clone()
    log_f.scatter_(-1, z.unsqueeze(-1), torch.log(1.0 - b + b * u).to(logp.dtype).expand(*z.shape, 1))
    return torch.log_softmax(log_f + log_g, dim=-1)


def uniform_prior_kl(alpha_1, N: int) -> torch.Tensor:
    """KL(q(z_1 | x) || Unif(N)) per token: (alpha + (1 - alpha)/N) log(N alpha + 1 - alpha)
    + (1 - 1/N)(1 - alpha) log(1 - alpha); 0 at alpha(1) = 0, log N at alpha = 1."""
    a = torch.as_tensor(alpha_1, dtype=torch.float64)
    return (a + (1 - a) / N) * torch.log(N * a + 1 - a) + (1 - 1 / N) * torch.special.xlogy(1 - a, 1 - a)
