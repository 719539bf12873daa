"""SEDD: score entropy discrete diffusion on the shared backbone (math in diffusion/score_entropy.py).

``objective.graph``: absorb (a [MASK] state appended at vocab_size unless model.mask_id is set)
or uniform (no extra state). ``objective.noise``: loglinear or geometric (sigma_min, sigma_max).
The backbone is conditioned on the noise level sigma(t) through adaLN and outputs raw log scores
[B, L, states]; ``nelbo`` is the complete bound: the DSE integral over [eps, 1], the
reconstruction at eps and the prior KL at t = 1 (see the module docstring of score_entropy.py).
Padding, and EOS under ``model.document_mask`` (absorb only), are never corrupted and not scored,
as in MDLM.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dlmtrain.backbone import Backbone, segment_ids_from_eos
from dlmtrain.diffusion.masked import corrupt
from dlmtrain.diffusion.schedules import draw_times
from dlmtrain.diffusion.score_entropy import (absorb_terms, corrupt_uniform, noise_schedule, prior_kl,
                                              uniform_decoder_log_probs, uniform_dse)
from dlmtrain.errors import ConfigError
from dlmtrain.modules.base import DiffusionModule
from dlmtrain.sampling.registry import register_samplers
from dlmtrain.sampling.sedd import SEDD_SAMPLERS


class SEDD(DiffusionModule):
    def __init__(self, cfg: DictConfig | None = None, config: dict | None = None):
        super().__init__(cfg, config)
        m, o = self.cfg.model, self.cfg.objective
        if m.document_mask and m.eos_id < 0:
            raise ConfigError("model.document_mask=true needs model.eos_id (the data's EOS id); set it or disable "
                              "document_mask")
        if m.document_mask and o.graph == "uniform":  # noise turns any token into EOS: z does not show the boundaries
            raise ConfigError("model.document_mask=true with objective.graph=uniform: uniform noise makes EOS "
                              "tokens appear anywhere, so sampling cannot know the document boundaries; disable "
                              "document_mask or use objective.graph=absorb")
        if o.noise == "geometric" and not 0 < o.sigma_min < o.sigma_max:
            raise ConfigError(f"objective.sigma_min={o.sigma_min}, sigma_max={o.sigma_max}: geometric noise needs "
                              "0 < sigma_min < sigma_max (SEDD uses 1e-4 and 20)")
        self.graph = str(o.graph)
        if self.graph == "absorb":
            self.mask_id = m.mask_id if m.mask_id >= 0 else m.vocab_size
            self.n_states = max(m.vocab_size, self.mask_id + 1)
            self.n_tokens = self.n_states - 1  # every state but [MASK]
        else:
            self.mask_id = None
            self.n_states = self.n_tokens = m.vocab_size
        self.eps = float(o.eps)
        self.schedule = noise_schedule(self.graph, o.noise, o.sigma_min, o.sigma_max)
        self.alpha1 = float(self.schedule.alpha(torch.ones((), dtype=torch.float64)))
        self.prior_nats = prior_kl(self.graph, self.alpha1, self.n_tokens)  # per scored token
        self.backbone = Backbone(m, vocab_size=self.n_states, use_cond=True)

    def _fixed(self, input_ids, attention_mask):
        """Positions never corrupted and never scored: padding, and EOS under document masking."""
        fixed = torch.zeros_like(input_ids, dtype=torch.bool) if attention_mask is None else ~attention_mask.bool()
        if self.cfg.model.document_mask:
            fixed |= input_ids == self.cfg.model.eos_id
        return fixed

    def scored_mask(self, input_ids, attention_mask=None):
        return ~self._fixed(input_ids, attention_mask)

    def raw_scores(self, z, t, segment_ids=None, attention_mask=None) -> torch.Tensor:
        """The backbone's float32 output [B, L, states] at noise level sigma(t), t scalar or [B]."""
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device).reshape(-1).expand(z.shape[0])
        sigma = self.schedule.sigma(t).float()  # loglinear: clipped at alpha >= 1e-6 near t = 1
        return self.backbone(z, sigma=sigma, segment_ids=segment_ids, attention_mask=attention_mask).float()

    def _token_nelbo(self, x0, t, attention_mask=None, segment_ids=None, generator=None):
        """One Monte Carlo draw of the per-token bound [B, L] at times t [B] ~ U[0, 1): the DSE integrand
        at t >= eps, the reconstruction at eps (/ eps) below it, plus the prior KL on every scored token."""
        eps = self.eps
        tau = t.clamp_min(eps)
        rec = t < eps
        t64 = tau.double()
        alpha = self.schedule.alpha(t64)
        fixed = self._fixed(x0, attention_mask)
        move = (1.0 - alpha).to(t.dtype)
        if self.graph == "absorb":
            z = corrupt(x0, move, self.mask_id, generator, keep=fixed)
        else:
            z = corrupt_uniform(x0, move, self.n_tokens, generator, keep=fixed)
        if segment_ids is None and self.cfg.model.document_mask:
            segment_ids = segment_ids_from_eos(x0, self.cfg.model.eos_id)
        raw = self.raw_scores(z, tau, segment_ids, attention_mask)
        if self.graph == "absorb":
            ce, excess = absorb_terms(raw, x0, z, self.mask_id, self.n_tokens)
            w = self.schedule.weight(t64).float()[:, None]
            per_tok = torch.where(rec[:, None], ce / eps, w * (ce + excess))
        else:
            per_tok = uniform_dse(raw, x0, z, alpha, self.schedule.dsigma(t64))
            rows = rec.nonzero().squeeze(1)
            if rows.numel():  # the reconstruction rows (probability eps each)
                logp = uniform_decoder_log_probs(raw[rows], z[rows], alpha[rows], dtype=torch.float32)
                nll = -logp.gather(-1, x0[rows].unsqueeze(-1)).squeeze(-1)
                per_tok = per_tok.index_put((rows,), nll / eps)
        scored = (~fixed).to(per_tok.dtype)
        return (per_tok + self.prior_nats) * scored

    def loss(self, batch: dict) -> torch.Tensor:
        x0, am = batch["input_ids"], batch.get("attention_mask")
        g = self.step_generator(x0.device)
        t = self.training_times(x0, g)
        per_tok = self._token_nelbo(x0, t, am, batch.get("segment_ids"), generator=g)
        return per_tok.sum() / self.scored_tokens(x0, am).sum().clamp_min(1)

    def nelbo_draws(self, input_ids, attention_mask=None, num_samples=1, generator=None, segment_ids=None,
                    discrete_steps=0):
        """(nats [B, K], t [B, K]): K draws per sequence of the complete bound, times stratified (draw_times)."""
        if discrete_steps:
            raise ConfigError(f"eval.discrete_steps={discrete_steps}: SEDD has no discrete-time bound; set it to 0")
        b, dev = input_ids.shape[0], input_ids.device
        t = draw_times(b, num_samples, antithetic=self.cfg.objective.antithetic, generator=generator, device=dev)
        nats = torch.stack([
            self._token_nelbo(input_ids, t[:, k], attention_mask, segment_ids, generator).sum(-1)
            for k in range(num_samples)
        ], 1)
        return nats, t


register_samplers(SEDD, SEDD_SAMPLERS)
