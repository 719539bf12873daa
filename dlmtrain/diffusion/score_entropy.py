"""Score entropy discrete diffusion (SEDD): the bound and the reverse-process steps.

Lou, Meng & Ermon, 2024, "Discrete Diffusion Modeling by Estimating the Ratios of the Data
Distribution" (ICML; arXiv:2310.16834). Notation: N tokens, alpha(t) = e^{-sigma(t)}.

Forward process, per token, a CTMC dp_t/dt = sigma'(t) Q p_t (SEDD sec. 2), so
q_t(. | x) = exp(sigma(t) Q) e_x:

- ``absorb``: the N tokens and [MASK] (m); Q = e_m 1^T - I. A token turns into [MASK] at
  rate sigma'; q_t(x | x) = alpha, q_t(m | x) = 1 - alpha.
- ``uniform``: the N tokens; Q = 1 1^T / N - I. At rate sigma' a token is redrawn uniformly
  (possibly itself); q_t(y | x) = alpha [y = x] + (1 - alpha) / N.

The network outputs log score ratios  s_hat(z)^i_y ~ log q_t(z with z^i := y) / q_t(z)  for
y != z^i (the ratio at the current state is 1: s_hat := 0 there).

The bound (SEDD sec. 3: the likelihood bound by the diffusion-weighted denoising score entropy), per x:

    -log p(x) <= int_0^1 E_{z ~ q_t(.|x)} sum_i sum_{y != z^i} R_t(y -> z^i) [e^{s_y} - r_y s_y + K(r_y)] dt
                 + KL(q_1(. | x) || pi),

with s = s_hat(z)^i, R_t(y -> z) the forward rate from y into z, r_y = q_t(y | x^i) / q_t(z^i | x^i)
and K(a) = a (log a - 1) (kept: without it the loss is the bound only up to a constant).
Each bracket equals  r_y phi(s_y - log r_y)  with  phi(u) = e^u - 1 - u >= 0  (and e^{s_y} when
r_y = 0; our rewriting, not the paper's): a Bregman divergence, zero iff e^{s_y} = r_y, and
numerically stable where the three terms of the original nearly cancel.

Per token i with z = z^i (``absorb_terms``, ``uniform_dse``):

- absorb: only z = m contributes, the rate into m from every token is sigma'; r_x = 1/(e^sigma - 1),
  r_y = 0 for y != x. SEDD's scale-by-sigma parameterisation (absorb only, as in its code)
  s_hat_y = raw_y - log(e^sigma - 1) - log N, i.e. s_hat = u + log r_x with u = raw - log N, gives
      sigma' r_x [sum_{y != x} e^{u_y} + phi(u_x)] = w(t) [-log softmax(u)_x + phi(log Z)],
  Z = sum_y e^{u_y}, w = sigma'/(e^sigma - 1) = -alpha'/(1 - alpha): MDLM's integrand for the
  denoiser softmax(u) plus w phi(log Z) >= 0, which vanishes when the predicted masses sum to 1
  (our derivation). So with exact conditionals SEDD-absorb and MDLM give the same bound.
- uniform: the rate into z from every y != z is sigma'/N. With r = (1 - alpha)/(1 - alpha + N alpha)
  = (e^sigma - 1)/(e^sigma - 1 + N): if z = x, r_y = r for all y != z; if z != x, r_y = 1 for
  y not in {x, z} and r_x = 1/r.  Integrand  (sigma'/N) sum_{y != z} r_y phi(s_y - log r_y).

The complete bound adds what the integral over [eps, 1] leaves out; nothing is dropped:

- t < eps (``recon``): the generative process runs the reverse CTMC down to eps and then decodes
  every token from z_eps with the denoiser the score implies (absorb: softmax(u) at [MASK],
  unmasked tokens are copied; uniform: ``uniform_decoder_log_probs``). A decoder is a valid
  last step, so  int_eps^1 (integrand) dt + E[-log p(x | z_eps)]  bounds -log p(x). Estimated as
  MDLM does (dlmtrain/diffusion/masked.py): t ~ U[0, 1); t >= eps uses the integrand at t, t < eps
  the reconstruction at eps divided by eps. For geometric noise z_0 is already perturbed
  (sigma(0) = sigma_min > 0); decoding at eps is what makes the bound one on the clean x.
  With exact scores the factorised decoder misses the joint posterior only where two nearby
  tokens are both corrupted at eps: O(eps^2) per token.
- the prior at t = 1, per token (``prior_kl``):
  absorb + loglinear: alpha(t) = 1 - t (MDLM's LogLinear, not SEDD's 1 - (1 - 1e-3) t), so
  alpha(1) = 0, q_1 = [MASK] = pi and the KL is 0 (SEDD's alpha(1) = 1e-3 would make the KL
  against all-[MASK] infinite). absorb + geometric: alpha(1) = e^{-sigma_max} > 0 and
  pi = (1 - a1) [MASK] + a1 Unif(N), the form of the q_1 marginal: KL = a1 log N
  (2.2e-8 nats/token at sigma_max = 20, N = 50257). uniform: pi = Unif(N),
  KL = (a1 + (1 - a1)/N) log(1 + (N - 1) a1) + (1 - 1/N)(1 - a1) log(1 - a1);
  uniform + loglinear keeps SEDD's a1 = 1e-3 (``LogLinearFloor``: the Euler and Tweedie steps at
  t = 1 need a finite sigma(1)): 0.00302 nats/token at N = 50258; geometric: ~1e-13.

With exact scores the expectation is -log p(x) up to the O(eps^2) decoder gap and, where pi is
not exactly the q_1 marginal (all but absorb + loglinear), a difference of at most the prior KL:
the bound is on -log p_theta(x), and p_theta differs from the data's p as pi does from q_1
(largest for uniform + loglinear: 1e-6 nats/token at N = 3 in the tests).

Reverse steps for the samplers (dlmtrain/sampling/sedd.py), per token, t -> s < t:
- Euler / tau-leaping (SEDD sec. 4): Cat(e_z + dt R_hat(z, .)), R_hat(z, y) = R_t(y -> z) e^{s_y}.
- Tweedie tau-leaping (SEDD sec. 4, its discrete Tweedie theorem): p(y) ~ [exp(-dsigma Q) s]_y
  exp(dsigma Q)(z | y), dsigma = sigma(t) - sigma(s), s_z = 1: the exact one-token reverse marginal
  when the score is exact. For absorb with alpha = 1 - t the Euler step coincides with it.
"""

from __future__ import annotations

import math

import torch

from dlmtrain.diffusion.schedules import Geometric, LogLinear, LogLinearFloor, Schedule

UNIFORM_LOGLINEAR_ALPHA1 = 1e-3  # SEDD's LogLinearNoise eps: alpha(1) of the uniform graph's log-linear noise
DECODER_FLOOR = 1e-6  # share of Unif(N) in the uniform graph's decoder (see uniform_decoder_log_probs)


def noise_schedule(graph: str, noise: str, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> Schedule:
    """The noise of a (graph, noise) pair; see the module docstring for why loglinear differs by graph."""
    if noise == "geometric":
        return Geometric(sigma_min, sigma_max)
    if noise == "loglinear":
        return LogLinear() if graph == "absorb" else LogLinearFloor(UNIFORM_LOGLINEAR_ALPHA1)
    raise ValueError(f"unknown noise {noise!r}; choose loglinear or geometric")


def prior_kl(graph: str, alpha1: float, n_tokens: int) -> float:
    """KL(q_1(. | x) || pi) in nats per token (module docstring), in float64."""
    a, n = float(alpha1), float(n_tokens)
    if a <= 0.0:
        return 0.0
    if graph == "absorb":  # q_1 = (1 - a) m + a x  vs  pi = (1 - a) m + a Unif(N): only the x entry differs
        return a * math.log(n)
    return (a + (1.0 - a) / n) * math.log1p((n - 1.0) * a) + (1.0 - 1.0 / n) * (1.0 - a) * math.log1p(-a)


def phi(u: torch.Tensor) -> torch.Tensor:
    """e^u - 1 - u (>= 0), accurate near 0 where expm1(u) - u cancels (Taylor series for |u| < 0.1)."""
    v = u.clamp(-0.1, 0.1)  # the series' input stays bounded (no inf in the unused branch's gradient)
    series = v * v * (0.5 + v * (1 / 6 + v * (1 / 24 + v * (1 / 120 + v / 720))))
    return torch.where(u.abs() < 0.1, series, torch.expm1(u) - u)


# ---- corruption -----------------------------------------------------------------------------


def corrupt_uniform(x0: torch.Tensor, move_prob: torch.Tensor, n_tokens: int, generator=None,
                    keep=None) -> torch.Tensor:
    """z ~ q_t(. | x0) for the uniform graph: with probability move_prob [B] (= 1 - alpha) a token is
    redrawn uniformly from the N tokens (itself included). ``keep`` [B, L]: never touched."""
    dev = generator.device if generator is not None else x0.device
    u = torch.rand(x0.shape, generator=generator, device=dev).to(x0.device)
    new = torch.randint(0, n_tokens, x0.shape, generator=generator, device=dev).to(x0.device)
    moved = u < move_prob[:, None]
    if keep is not None:
        moved &= ~keep
    return torch.where(moved, new, x0)


# ---- the bound's terms ----------------------------------------------------------------------


def absorb_log_mass(raw: torch.Tensor, mask_id: int, n_tokens: int) -> torch.Tensor:
    """u = raw - log N with -inf on [MASK]: e^{u_y} estimates p(x^i = y | z) at a masked position
    (the score is s_hat = u + log r, r = 1/(e^sigma - 1)). float32 [..., S]."""
    u = raw.float() - math.log(n_tokens)
    u[..., mask_id] = float("-inf")
    return u


def absorb_terms(raw: torch.Tensor, x0: torch.Tensor, z: torch.Tensor, mask_id: int,
                 n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce, excess) [B, L], nonzero only at masked positions: ce = -log softmax(u)_x (the decoder's
    cost, the reconstruction term) and excess = phi(log Z). The DSE integrand is w(t) (ce + excess)."""
    masked = z == mask_id
    ce = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
    excess = torch.zeros_like(ce)
    u = absorb_log_mass(raw[masked], mask_id, n_tokens)  # [M, S]
    lse = torch.logsumexp(u, dim=-1)
    ce[masked] = lse - u.gather(-1, x0[masked].unsqueeze(-1)).squeeze(-1)
    excess[masked] = phi(lse)
    return ce, excess


def uniform_log_ratio(alpha: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """log r = log((1 - alpha) / (1 - alpha + N alpha)): r_y at a clean position (float64 in, out)."""
    return torch.log1p(-alpha) - torch.log1p(-alpha + n_tokens * alpha)


_CHUNK_ELEMENTS = 1 << 24  # elements of [.., N] processed at once: 64 MB per float32 temporary


class _BregmanSum(torch.autograd.Function):
    """sum_{y != z} r phi(s_y - log r) over the last axis ([..., N] -> [...]), r = e^{log_r} per position.

    Memory: at vocabulary size the [B, L, N] terms would be several copies of the logits; here they
    are formed chunk by chunk and only s is kept for backward. d/ds_y = r expm1(s_y - log r)
    (= e^{s_y} - r), and 0 at y = z; log r gets no gradient (a constant of the noise)."""

    @staticmethod
    def forward(ctx, s, z, log_r):
        ctx.save_for_backward(s, z, log_r)
        n = s.shape[-1]
        sf, zf, lf = s.reshape(-1, n), z.reshape(-1, 1), log_r.reshape(-1, 1).to(s.dtype)
        out = torch.empty(sf.shape[0], dtype=s.dtype, device=s.device)
        step = max(1, _CHUNK_ELEMENTS // n)
        for i in range(0, sf.shape[0], step):
            sl = slice(i, i + step)
            terms = torch.exp(lf[sl]) * phi(sf[sl] - lf[sl])
            out[sl] = terms.scatter_(-1, zf[sl], 0.0).sum(-1)
        return out.view(s.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        s, z, log_r = ctx.saved_tensors
        n = s.shape[-1]
        sf, zf, lf = s.reshape(-1, n), z.reshape(-1, 1), log_r.reshape(-1, 1).to(s.dtype)
        gf = grad_out.reshape(-1, 1).to(s.dtype)
        grad = torch.empty_like(sf)
        step = max(1, _CHUNK_ELEMENTS // n)
        for i in range(0, sf.shape[0], step):
            sl = slice(i, i + step)
            grad[sl] = (gf[sl] * torch.exp(lf[sl])) * torch.expm1(sf[sl] - lf[sl])
            grad[sl].scatter_(-1, zf[sl], 0.0)
        return grad.view(s.shape), None, None


def uniform_dse(s_hat: torch.Tensor, x0: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor,
                dsigma: torch.Tensor) -> torch.Tensor:
    """The uniform graph's DSE integrand [B, L]: (sigma'/N) sum_{y != z} r_y phi(s_y - log r_y).
    s_hat [B, L, N] log scores (the entry at z is ignored); alpha, dsigma [B] (float64 preferred)."""
    n = s_hat.shape[-1]
    log_r = uniform_log_ratio(alpha.double(), n).to(s_hat.dtype)[:, None]  # [B, 1]
    clean = z == x0
    lr = torch.where(clean, log_r, torch.zeros_like(log_r))  # [B, L]: log r_y for every y != x
    total = _BregmanSum.apply(s_hat, z, lr)
    # a corrupted position's y = x term has r_x = 1/r: swap phi(s_x) for phi(s_x + log r) / r
    s_x = s_hat.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    fix = torch.exp(-log_r) * phi(s_x + log_r) - phi(s_x)
    total = total + torch.where(clean, torch.zeros_like(fix), fix)
    return total * (dsigma.to(s_hat.dtype) / n)[:, None]


def uniform_probs_from_scores(s_hat: torch.Tensor, z: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """softmax of the log scores with s_hat_z := 0: the score's estimate of q_t(z^i = . | z^{-i})."""
    s = s_hat.to(dtype).scatter(-1, z.unsqueeze(-1), 0.0)
    return torch.softmax(s, dim=-1)


def uniform_tweedie_probs(s_hat: torch.Tensor, z: torch.Tensor, rho: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Tweedie step of the uniform graph from t to s, rho = alpha_t / alpha_s = e^{-dsigma} ([..] or scalar):
    p(y) ~ max(0, [exp(-dsigma Q) s]_y) exp(dsigma Q)(z | y). With q the score's marginal estimate,
    exp(-dsigma Q) q = (q - (1 - rho)/N) / rho and exp(dsigma Q)(z | y) = rho [y = z] + (1 - rho)/N.
    The clamp at 0 only acts on inexact scores. Returns normalised probabilities [..., N]."""
    n = s_hat.shape[-1]
    rho = torch.as_tensor(rho, dtype=dtype, device=s_hat.device)
    if rho.dim():
        rho = rho.reshape(*rho.shape, *([1] * (s_hat.dim() - rho.dim())))
    q = uniform_probs_from_scores(s_hat, z, dtype)
    prev = (q - (1.0 - rho) / n).clamp_min(0.0)  # x rho: constant factors cancel in the normalisation
    trans = torch.full_like(q, 1.0) * ((1.0 - rho) / n)
    trans = trans + rho * torch.nn.functional.one_hot(z, n).to(dtype)
    p = prev * trans
    return p / p.sum(-1, keepdim=True)


def uniform_decoder_log_probs(s_hat: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, dtype=torch.float64,
                              floor: float = DECODER_FLOOR) -> torch.Tensor:
    """log p(x^i = . | z_t) of the uniform graph's decoder: Tweedie's posterior from t to 0
    (rho = alpha_t), mixed with ``floor`` of Unif(N). With an exact score the posterior is exact; an
    inexact one can leave the true token at 0 after the clamp, and the floor keeps -log p finite
    at a cost of at most -log(1 - floor) ~ 1e-6 nats per token."""
    n = s_hat.shape[-1]
    p = uniform_tweedie_probs(s_hat, z, alpha, dtype)
    return torch.log((1.0 - floor) * p + floor / n)


# ---- reverse steps (absorb; the uniform graph's are above) ------------------------------------


def absorb_move_scale(method: str, t: float, s: float, schedule: Schedule) -> float:
    """c such that a [MASK] at time t is revealed as y with probability c e^{u_y} on the way to s:
    Euler c = (t - s) sigma'(t) r_t = (t - s) w(t); Tweedie c = (e^{dsigma} - 1) r_t
    = (alpha_s - alpha_t)/(1 - alpha_t) (which with exact scores is MDLM's reveal probability)."""
    tt = torch.tensor([t, s], dtype=torch.float64)
    if method == "euler":
        return float((t - s) * schedule.weight(tt[:1]).item())
    a = schedule.alpha(tt)
    return float(((a[1] - a[0]) / (1.0 - a[0])).item())


def uniform_euler_probs(s_hat: torch.Tensor, z: torch.Tensor, rate_dt: float, dtype=torch.float64) -> torch.Tensor:
    """Euler step of the uniform graph: p(y) = rate_dt e^{s_y} for y != z (rate_dt = dt sigma'(t) / N), the
    rest stays at z; when the moves exceed 1 the stay mass is clamped at 0 and the moves renormalised."""
    s = torch.exp(s_hat.to(dtype)) * rate_dt
    s = s.scatter(-1, z.unsqueeze(-1), 0.0)
    stay = (1.0 - s.sum(-1, keepdim=True)).clamp_min(0.0)
    p = s.scatter(-1, z.unsqueeze(-1), stay)
    return p / p.sum(-1, keepdim=True)
