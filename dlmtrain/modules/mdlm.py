"""MDLM: masked diffusion with SUBS on the shared backbone (math in diffusion/masked.py).

With ``model.document_mask`` the backbone is told the document boundaries of the
clean sequence. The boundaries then reveal where every EOS is, so EOS tokens are
never masked and not scored: the bound is on -log p(x | document boundaries), over
the non-EOS tokens. Without document masking it is the plain bound on -log p(x).

LLaDA's options (Nie et al., 2025):
- ``objective.random_length_fraction``: in training only, that share of the rows is cut to a
  length drawn uniformly from {1..L}; the rest of the row is padding (see
  ``random_length_mask``). Drawn from the step generator, so a resumed run cuts the same rows.
  It applies to prompt-conditioned rows too: a row cut inside its prompt scores nothing.
- Prompt-conditioned data (SFT) is automatic: a batch with ``prompt_mask`` (True on prompt
  tokens; data_prep --prompt-field) never masks or scores the prompt, the training loss is
  the mean over answer tokens (all answer tokens of the batch together, not LLaDA's
  per-sequence mean), and ``nelbo`` bounds -log p(answers | prompts), so val/nelbo and
  val/bpb are per answer token and per answer byte.

``objective.masked_head`` (default on): the output norm, head and cross-entropy run only at the
masked positions (SUBS gives every other position exactly zero loss), chunked over
``objective.ce_chunk_size`` rows in float32 (backbone/chunked_ce.py). Loss, NELBO and gradients
equal the full-logits path to float rounding (tests/modules/test_mdlm_masked_head.py).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dlmtrain.backbone import Backbone, segment_ids_from_eos
from dlmtrain.diffusion.masked import (
    corrupt, discrete_weights, masked_token_nll, random_length_mask, subs_logits, time_weights,
)
from dlmtrain.diffusion.schedules import draw_times, get_schedule
from dlmtrain.errors import ConfigError
from dlmtrain.modules.base import DiffusionModule
from dlmtrain.sampling.masked import MASKED_SAMPLERS
from dlmtrain.sampling.registry import register_samplers


class MDLM(DiffusionModule):
    discrete_bound = True
    prompt_conditioning = True
    denoise_at = True  # denoise(z, t, at=positions): the samplers' masked-only head (sampling/masked.py)

    def __init__(self, cfg: DictConfig | None = None, config: dict | None = None):
        super().__init__(cfg, config)
        m, o = self.cfg.model, self.cfg.objective
        if m.document_mask and m.eos_id < 0:
            raise ConfigError("model.document_mask=true needs model.eos_id (the data's EOS id); set it or disable document_mask")
        self.mask_id = m.mask_id if m.mask_id >= 0 else m.vocab_size
        self.schedule = get_schedule(o.schedule)
        self.backbone = Backbone(m, vocab_size=max(m.vocab_size, self.mask_id + 1), use_cond=o.time_conditioning)

    def _fixed(self, input_ids, attention_mask, prompt_mask=None):
        """Positions never corrupted and never scored: padding, prompt tokens, and EOS under document masking."""
        fixed = torch.zeros_like(input_ids, dtype=torch.bool) if attention_mask is None else ~attention_mask.bool()
        if prompt_mask is not None:
            fixed |= prompt_mask.bool()
        if self.cfg.model.document_mask:
            fixed |= input_ids == self.cfg.model.eos_id
        return fixed

    def scored_mask(self, input_ids, attention_mask=None, prompt_mask=None):
        return ~self._fixed(input_ids, attention_mask, prompt_mask)

    def _token_nelbo(self, x0, t, attention_mask=None, segment_ids=None, generator=None, discrete_steps=0,
                     prompt_mask=None):
        """One Monte Carlo draw of the per-token NELBO contributions [B, L] at times t [B]
        (continuous time, or the T-step discrete bound when discrete_steps = T > 0)."""
        o = self.cfg.objective
        if discrete_steps > 0:
            tau, w = discrete_weights(t, discrete_steps, self.schedule)
        else:
            tau, w = time_weights(t, self.schedule, o.eps)
        z = corrupt(x0, 1.0 - self.schedule.alpha(tau), self.mask_id, generator, keep=self._fixed(x0, attention_mask, prompt_mask))
        # Document boundaries come from the clean sequence: they reveal where every EOS is, so
        # the backbone may see them only under document masking (where EOS is fixed and unscored).
        # Otherwise the batch's segment_ids are ignored and the bound is on -log p(x) itself.
        if not self.cfg.model.document_mask:
            segment_ids = None
        elif segment_ids is None:
            segment_ids = segment_ids_from_eos(x0, self.cfg.model.eos_id)
        sigma = self.schedule.sigma(tau) if o.time_conditioning else None
        if o.get("masked_head", False) and isinstance(self.backbone, Backbone):
            # SUBS: unmasked positions cost exactly 0, so only masked ones need the head (chunked CE).
            # A stand-in network (tests' exact oracles) returns full logits: the path below.
            masked = z == self.mask_id
            nll = self.backbone(z, sigma=sigma, segment_ids=segment_ids, attention_mask=attention_mask,
                                out_mask=masked, targets=x0[masked], exclude=self.mask_id,
                                chunk_size=int(o.get("ce_chunk_size", 0)))
            out = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
            out[masked] = nll
            return out * w[:, None]
        logits = self.backbone(z, sigma=sigma, segment_ids=segment_ids, attention_mask=attention_mask)
        return masked_token_nll(logits, x0, z, self.mask_id) * w[:, None]

    def loss(self, batch: dict) -> torch.Tensor:
        x0, am, pm = batch["input_ids"], batch.get("attention_mask"), batch.get("prompt_mask")
        o = self.cfg.objective
        g = self.step_generator(x0.device)
        t = self.training_times(x0, g)
        if o.random_length_fraction > 0:
            keep = random_length_mask(x0.shape, o.random_length_fraction, g, x0.device)
            am = keep if am is None else am.bool() & keep
        per_tok = self._token_nelbo(x0, t, am, batch.get("segment_ids"), generator=g, prompt_mask=pm)
        return per_tok.sum() / self.scored_mask(x0, am, pm).sum().clamp_min(1)

    def nelbo_draws(self, input_ids, attention_mask=None, num_samples=1, generator=None, segment_ids=None,
                    discrete_steps=0, prompt_mask=None):
        """(nats [B, K], t [B, K]): K draws per sequence, times stratified (see draw_times). With
        ``prompt_mask`` the bound is on -log p(the other tokens | the prompt tokens)."""
        b, dev = input_ids.shape[0], input_ids.device
        t = draw_times(b, num_samples, antithetic=self.cfg.objective.antithetic, generator=generator, device=dev)
        nats = torch.stack([
            self._token_nelbo(input_ids, t[:, k], attention_mask, segment_ids, generator, discrete_steps,
                              prompt_mask).sum(-1)
            for k in range(num_samples)
        ], 1)
        if discrete_steps > 0:
            t = discrete_weights(t, discrete_steps, self.schedule)[0]  # the grid time i/T each draw used
        return nats, t

    # ---- what the samplers use (dlmtrain/sampling/masked.py) ---------------------------------
    @property
    def time_conditioned(self) -> bool:
        return bool(self.cfg.objective.time_conditioning)

    def denoise(self, z, t, segment_ids=None, attention_mask=None, at=None) -> torch.Tensor:
        """log p(x0 | z_t) under SUBS, float32 [B, L, V]; t [B] is used only with time conditioning.
        Under document masking the backbone derives the boundaries from the EOS tokens in z.

        ``at`` [B, L] bool: only these positions, [M, V] in row-major order (``full[at]``). With
        ``objective.masked_head`` the output norm and head then run at those positions only (the
        samplers ask for still-masked ones); otherwise the full output is computed and indexed."""
        sigma = None
        if self.time_conditioned:
            t = torch.as_tensor(t, dtype=torch.float32, device=z.device).reshape(-1).expand(z.shape[0])
            sigma = self.schedule.sigma(t)
        if at is None:
            logits = self.backbone(z, sigma=sigma, segment_ids=segment_ids, attention_mask=attention_mask)
            return subs_logits(logits.float(), z, self.mask_id)
        if not (self.cfg.objective.get("masked_head", False) and isinstance(self.backbone, Backbone)):
            return self.denoise(z, t, segment_ids, attention_mask)[at]  # also a stand-in network's path
        logits = self.backbone(z, sigma=sigma, segment_ids=segment_ids, attention_mask=attention_mask, out_mask=at)
        return subs_logits(logits.float(), z[at], self.mask_id)

register_samplers(MDLM, MASKED_SAMPLERS)
