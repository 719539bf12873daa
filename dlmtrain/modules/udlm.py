"""UDLM: uniform-state continuous-time diffusion (math in diffusion/uniform.py).

Schiff et al., 2025 ("Simple Guidance Mechanisms for Discrete Diffusion Models"); the same
bound as DUO (Sahoo et al., 2025). With ``objective.time_conditioning`` the backbone sees
sigma(t) = -log alpha(t) through adaLN (as UDLM/DUO do).

The NELBO per sequence, every term kept:
    int_eps^1 E sum_i l_i(t) dt  +  E sum_i -log p(x^i | z_eps)  +  L KL(q(z_1 | x) || Unif)
The middle term replaces the integral below eps by a one-shot decoder from z_eps: the
generative process runs the reverse chain down to eps, then draws every token from the
x0-parameterized step to the data, p(z_0 = x | z_eps) ∝ (alpha_eps [x = z_eps] + (1 - alpha_eps)/N)
p~(x | z_eps) (``uniform_step_kl`` at alpha_s = 1; not p~ alone, see diffusion/uniform.py on
what p~ learns). It is a valid bound on its own, estimated as in MDLM without an extra pass
(draw t ~ U[0, 1); t >= eps: the integrand at t; t < eps, probability eps: the decoder's NLL
at eps over eps). The integrand stays bounded as t -> 0 in expectation but a changed token
weighs ~1/t, so the cut keeps the variance finite. The prior term is 0 for every schedule
here (alpha(1) = 0: z_1 is uniform whatever x), and computed anyway. With the optimal
denoiser the expectation is -log p(x) up to the decoder's factorisation at eps (second
order in eps).
With ``eval.discrete_steps = T`` the T-step bound of the same process (the uniform D3PM on
the grid i/T: ``uniform_step_kl``, its reconstruction at i = 1 included) is reported too.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dlmtrain.backbone import Backbone, segment_ids_from_eos
from dlmtrain.diffusion.d3pm import draw_steps
from dlmtrain.diffusion.schedules import draw_times, get_schedule
from dlmtrain.diffusion.uniform import corrupt_uniform, uniform_integrand, uniform_prior_kl, uniform_step_kl
from dlmtrain.modules.base import DiffusionModule
from dlmtrain.modules.d3pm import check_document_mask, fixed_positions
from dlmtrain.sampling.ancestral import ANCESTRAL
from dlmtrain.sampling.registry import register_samplers


class UDLM(DiffusionModule):
    discrete_bound = True
    graph = "uniform"  # for the ancestral sampler
    mask_id = None

    def __init__(self, cfg: DictConfig | None = None, config: dict | None = None):
        super().__init__(cfg, config)
        m, o = self.cfg.model, self.cfg.objective
        check_document_mask(m)
        self.schedule = get_schedule(o.schedule)
        self.n_tokens = m.vocab_size
        self.backbone = Backbone(m, vocab_size=m.vocab_size, use_cond=o.time_conditioning)
        one = torch.ones((), dtype=torch.float64)
        self.prior_nats = float(uniform_prior_kl(self.schedule.alpha(one), self.n_tokens))  # per token; 0 here

    def scored_mask(self, input_ids, attention_mask=None):
        return ~fixed_positions(self.cfg.model, input_ids, attention_mask)

    @property
    def time_conditioned(self) -> bool:
        return bool(self.cfg.objective.time_conditioning)

    def _log_probs(self, z, t, segment_ids=None, attention_mask=None) -> torch.Tensor:
        sigma = self.schedule.sigma(t.double()).float() if self.time_conditioned else None
        logits = self.backbone(z, sigma=sigma, segment_ids=segment_ids, attention_mask=attention_mask)
        return torch.log_softmax(logits.float(), dim=-1)

    def _token_nelbo(self, x0, t, attention_mask=None, segment_ids=None, generator=None, discrete_steps=0):
        """One draw of the per-token NELBO [B, L] (float64) at times t [B]: continuous time, or the
        T-step discrete bound when discrete_steps = T > 0 (module docstring)."""
        fixed = fixed_positions(self.cfg.model, x0, attention_mask)
        if segment_ids is None and self.cfg.model.document_mask:
            segment_ids = segment_ids_from_eos(x0, self.cfg.model.eos_id)
        if discrete_steps > 0:
            i = draw_steps(t, discrete_steps).double()
            tau, a_s = i / discrete_steps, self.schedule.alpha((i - 1) / discrete_steps)
        else:
            tau = t.double().clamp_min(self.cfg.objective.eps)
        a_t = self.schedule.alpha(tau)
        z = corrupt_uniform(x0, a_t, self.n_tokens, generator, keep=fixed)
        logp = self._log_probs(z, tau, segment_ids, attention_mask)
        if discrete_steps > 0:
            per_tok = discrete_steps * uniform_step_kl(logp, x0, z, a_s, a_t)
        else:
            cont = uniform_integrand(logp, x0, z, a_t, self.schedule.alpha_prime(tau))
            recon = uniform_step_kl(logp, x0, z, 1.0, a_t) / self.cfg.objective.eps  # -log p(x | z_eps)
            per_tok = torch.where((t >= self.cfg.objective.eps)[:, None], cont, recon)
        return torch.where(fixed, 0.0, per_tok + self.prior_nats)

    def loss(self, batch: dict) -> torch.Tensor:
        x0, am = batch["input_ids"], batch.get("attention_mask")
        g = self.step_generator(x0.device)
        t = self.training_times(x0, g)
        per_tok = self._token_nelbo(x0, t, am, batch.get("segment_ids"), generator=g)
        return (per_tok.sum() / self.scored_tokens(x0, am).sum().clamp_min(1)).float()

    def nelbo_draws(self, input_ids, attention_mask=None, num_samples=1, generator=None, segment_ids=None,
                    discrete_steps=0):
        """(nats [B, K], t [B, K]): K draws per sequence, times stratified (see draw_times)."""
        b, dev = input_ids.shape[0], input_ids.device
        t = draw_times(b, num_samples, antithetic=self.cfg.objective.antithetic, generator=generator, device=dev)
        nats = torch.stack([
            self._token_nelbo(input_ids, t[:, k], attention_mask, segment_ids, generator, discrete_steps).sum(-1)
            for k in range(num_samples)
        ], 1)
        if discrete_steps > 0:
            t = (draw_steps(t, discrete_steps).double() / discrete_steps).to(t.dtype)  # the grid time of each draw
        return nats.float(), t

    # ---- what the ancestral sampler uses (dlmtrain/sampling/ancestral.py) -----------------------
    def reverse_grid(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(times [S], alpha [S + 1] float64) on the uniform grid 1 = t_0 > ... > t_S = 0."""
        grid = torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64)
        return grid[:-1], self.schedule.alpha(grid)

    def denoise(self, z, t, segment_ids=None, attention_mask=None) -> torch.Tensor:
        """log p~(x0 | z_t) [B, L, V] float32; t (scalar or [B]) is used only with time conditioning."""
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device).reshape(-1).expand(z.shape[0])
        return self._log_probs(z, t, segment_ids, attention_mask)


register_samplers(UDLM, ANCESTRAL)
