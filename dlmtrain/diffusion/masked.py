"""Absorbing-state (masked) diffusion: MDLM with the SUBS parameterization.

Sahoo et al., 2024, "Simple and Effective Masked Diffusion Language Models" (MDLM).
Forward process: each token independently stays clean with probability alpha(t)
and becomes [MASK] otherwise. SUBS (MDLM sec. 3.2.3): the denoiser puts zero mass
on [MASK] and copies unmasked tokens through, so only masked positions carry loss.

Continuous-time NELBO (MDLM eq. 10), per sequence:
    int_0^1  -alpha'(t)/(1-alpha(t)) * E_{z_t} sum_{i: z_t^i = MASK} -log p(x^i | z_t)  dt

Clipping at t = eps. The integrand's variance blows up as t -> 0 (weight ~ 1/t), so
the part of the integral below eps is replaced by a one-shot reconstruction term:
decode every token still masked at z_eps from p(. | z_eps). This is a valid bound on
its own (a generative process that runs the diffusion down to eps and then decodes),
and we estimate it without an extra forward pass: draw t ~ U[0, 1]; when t >= eps use
the diffusion integrand at t, when t < eps (probability eps) use the reconstruction
term at eps divided by eps. Both cases corrupt at tau = max(t, eps), and the per-token
weight is  w(t) = -alpha'(t)/(1-alpha(t))  for t >= eps  and  1/eps  below it. The
estimator is unbiased for   int_eps^1 (diffusion) dt + (reconstruction at eps), and
its variance stays bounded. With exact conditionals the bound is tight: its
expectation is -log p(x) (tests/diffusion/test_masked.py checks this on Markov sources).

Conditioning (LLaDA's SFT, Nie et al., 2025, sec. 2.3): positions given to ``corrupt`` as
``keep`` (a prompt) are never masked and carry no loss. The forward process then acts on the
other positions only, and the same derivation bounds -log p(x_rest | x_keep): with exact
conditionals p(x^i | z_t) (which see the kept tokens) the bound is tight again.

Discrete time with T steps (Austin et al., 2021, D3PM eq. 1; MDLM sec. 3.2, eq. 8), on the
grid t_i = i/T, s = t_{i-1}:
    L_T = sum_{i=1}^T E_{z_{t_i}} KL(q(z_s | z_t, x) || p(z_s | z_t))  +  KL(q(z_1 | x) || p(z_1))
For absorbing noise with SUBS each step's KL is, per masked token, the posterior's mass on
x times its cross-entropy:  (alpha_s - alpha_t) / (1 - alpha_t) * -log p(x^i | z_t).  At
i = 1 (s = 0, alpha_0 = 1) the weight is 1 and the term is the one-shot reconstruction
-log p(x | z_{t_1}). The prior term is 0: every schedule has alpha(1) = 0, so z_1 is all
[MASK] and equals the prior (``discrete_weights`` checks alpha(1)). Estimated by drawing
i ~ U{1..T} and scaling by T; L_T >= L_{2T} >= ... -> the continuous-time bound.
"""

from __future__ import annotations

import torch

from dlmtrain.diffusion.schedules import Schedule


def corrupt(x0: torch.Tensor, move_prob: torch.Tensor, mask_id: int, generator=None, keep=None) -> torch.Tensor:
    """Replace each token of x0 [B, L] by mask_id with probability move_prob [B] (or [B, L]).
    Positions where ``keep`` [B, L] is True are never masked (padding, known boundaries)."""
    p = move_prob if move_prob.dim() == 2 else move_prob[:, None]
    u = torch.rand(x0.shape, generator=generator, device=generator.device if generator is not None else x0.device)
    u = u.to(x0.device)
    masked = u < p
    if keep is not None:
        masked &= ~keep
    return torch.where(masked, torch.full_like(x0, mask_id), x0)


def random_length_mask(shape: tuple[int, int], fraction: float, generator=None, device=None) -> torch.Tensor:
    """[B, L] bool, True on the positions a training row keeps. LLaDA (Nie et al., 2025, sec. 2.2) cuts 1% of its pretraining data to a length drawn uniformly from {1..L}, so
    the model also sees short sequences. Here each row independently, with probability
    ``fraction``, keeps its first n ~ U{1..L} positions; the rest becomes padding (never
    corrupted, scored or attended to). Draws from ``generator``: a pure function of its state."""
    b, L = shape
    gdev = generator.device if generator is not None else device
    cut = torch.rand(b, generator=generator, device=gdev) < fraction
    n = torch.randint(1, L + 1, (b,), generator=generator, device=gdev)
    n = torch.where(cut, n, torch.full_like(n, L))
    keep = torch.arange(L, device=gdev)[None, :] < n[:, None]
    return keep.to(device) if device is not None else keep


def time_weights(t: torch.Tensor, schedule: Schedule, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau, weight) for times t ~ U[0, 1): tau = max(t, eps) is where to corrupt;
    weight multiplies each masked token's cross-entropy (see module docstring)."""
    tau = t.clamp_min(eps)
    w = torch.where(t >= eps, schedule.weight(tau), torch.full_like(tau, 1.0 / eps))
    return tau, w


def subs_logits(logits: torch.Tensor, z_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS: log-probabilities with -inf on [MASK] and unmasked tokens copied through.
    logits [B, L, V] float32 -> log p(x0 | z_t) [B, L, V]."""
    logits = logits.clone()
    logits[..., mask_id] = float("-inf")
    logp = torch.log_softmax(logits, dim=-1)
    carry = z_t != mask_id
    onehot = torch.full_like(logp, float("-inf"))
    onehot.scatter_(-1, z_t.unsqueeze(-1), 0.0)
    return torch.where(carry.unsqueeze(-1), onehot, logp)


def masked_token_nll(logits: torch.Tensor, x0: torch.Tensor, z_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """-log p(x0^i | z_t) under SUBS at masked positions, 0 elsewhere: [B, L].

    Computed only where z_t is masked (unmasked positions cost exactly 0 under SUBS),
    without materialising the full SUBS distribution."""
    masked = z_t == mask_id
    out = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
    sel = logits[masked].float()  # [M, V], a copy; M = 0 works too (no host sync to check)
    sel[:, mask_id] = float("-inf")
    out[masked] = torch.logsumexp(sel, dim=-1) - sel.gather(-1, x0[masked].unsqueeze(-1)).squeeze(-1)
    return out


def discrete_weights(t: torch.Tensor, steps: int, schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_i, weight) for the T-step discrete bound from times t ~ U[0, 1): step i = floor(t T) + 1,
    t_i = i / T, weight = T (alpha_{t_i - 1/T} - alpha_{t_i}) / (1 - alpha_{t_i}) per masked token
    (T because one step i ~ U{1..T} stands for the sum over all T). Computed in float64: for
    large T the cosine schedule's 1 - alpha(1/T) ~ 1/T^2 vanishes in float32."""
    a1 = schedule.alpha(torch.ones((), dtype=torch.float64)).item()
    if a1 > 1e-9:  # alpha(1) > 0 would leave clean tokens at t = 1: the prior KL against all-[MASK] is infinite
        raise ValueError(f"schedule {schedule.name} has alpha(1) = {a1:g} > 0: the discrete bound needs alpha(1) = 0")
    i = (t.double() * steps).floor().clamp(0, steps - 1) + 1
    ti, si = i / steps, (i - 1) / steps
    at, as_ = schedule.alpha(ti), schedule.alpha(si)
    w = torch.where(i == 1, torch.ones_like(at), (as_ - at) / (1.0 - at))  # i = 1: reconstruction, weight 1
    return ti.to(t.dtype), (steps * w).to(t.dtype)


# ---- the reverse process (samplers in dlmtrain/sampling/masked.py) ----------------------


def reveal_probability(alpha_s: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """P(a token masked at time t is clean at time s < t) under the true reverse process.

    MDLM (Sahoo et al., 2024), the absorbing-state posterior for z_t = [MASK]:
        q(z_s | z_t = m, x) = Cat(z_s; [(1 - alpha_s) m + (alpha_s - alpha_t) x] / (1 - alpha_t)),
    so the token is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t), and its
    value is drawn from the denoiser p(x | z_t) (SUBS). At s = 0 (alpha_s = 1) it is 1."""
    return ((alpha_s - alpha_t) / (1.0 - alpha_t)).clamp(0.0, 1.0)


def first_hitting_time(schedule: Schedule, t: torch.Tensor, n: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The time s < t of the next reveal when n tokens are masked at time t (u ~ U(0, 1)).

    Zheng et al., 2024, "Masked diffusion models are secretly time-agnostic masked models"
    (first-hitting sampler). Under the reverse process each masked token's reveal time
    tau is independent with  P(tau <= s | masked at t) = (1 - alpha(s)) / (1 - alpha(t))
    (the product of the per-step survival probabilities of reveal_probability telescopes
    to this). The next reveal is the largest of n such times:
        P(max <= s) = ((1 - alpha(s)) / (1 - alpha(t)))^n = u
        =>  alpha(s) = 1 - (1 - alpha(t)) u^(1/n),   s = alpha^{-1}(...).
    t, n, u broadcast; n >= 1 (rows with n = 0 get s = 0)."""
    t, u = t.double(), u.double()
    n = n.double().clamp_min(1.0)
    a_s = 1.0 - (1.0 - schedule.alpha(t)) * u.pow(1.0 / n)
    return schedule.time_of_alpha(a_s).clamp(0.0, 1.0)


def guided_log_probs(logp_cond: torch.Tensor, logp_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Unsupervised classifier-free guidance (Nie et al., 2024, "Scaling up masked diffusion
    models on text" (SMDM), arXiv:2410.18514; the same rule in LLaDA's generate.py):
        log p_w(x0 | z) = (1 + w) log p(x0 | z) - w log p(x0 | z_uncond)  + const,
    renormalised; z_uncond is z with the conditioning tokens masked. On log-probabilities
    this equals guidance on logits (the per-position normalisers only shift the result).
    Entries that are -inf in the conditional stay -inf ([MASK], SUBS one-hots); [B, L, V]."""
    dead = torch.isinf(logp_cond) | torch.isinf(logp_uncond)
    mixed = (1.0 + scale) * logp_cond.masked_fill(dead, 0.0) - scale * logp_uncond.masked_fill(dead, 0.0)
    mixed = mixed.masked_fill(torch.isinf(logp_cond), float("-inf"))
    return torch.log_softmax(mixed, dim=-1)
