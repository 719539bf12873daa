"""D3PM: discrete-time diffusion, absorbing or uniform transitions (math in diffusion/d3pm.py).

The backbone sees the integer step t (1..T) through adaLN, as D3PM's integer timestep
embedding. Positions that are never corrupted and never scored: padding, and EOS under
``model.document_mask`` (as in MDLM: the bound is then on -log p(x | document boundaries)).
Samplers: ``ancestral`` (dlmtrain/sampling/ancestral.py).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dlmtrain.backbone import Backbone, segment_ids_from_eos
from dlmtrain.diffusion.d3pm import absorb_step_weight, alpha_bars, corrupt_d3pm, draw_steps, prior_kl
from dlmtrain.diffusion.masked import masked_token_nll
from dlmtrain.diffusion.schedules import draw_times
from dlmtrain.diffusion.uniform import uniform_step_kl
from dlmtrain.errors import ConfigError
from dlmtrain.modules.base import DiffusionModule
from dlmtrain.sampling.ancestral import ANCESTRAL
from dlmtrain.sampling.registry import register_samplers


def fixed_positions(model_cfg, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """[B, L] bool: positions never corrupted and never scored (padding; EOS under document masking)."""
    fixed = torch.zeros_like(input_ids, dtype=torch.bool) if attention_mask is None else ~attention_mask.bool()
    if model_cfg.document_mask:
        fixed |= input_ids == model_cfg.eos_id
    return fixed


def check_document_mask(model_cfg) -> None:
    if model_cfg.document_mask and model_cfg.eos_id < 0:
        raise ConfigError("model.document_mask=true needs model.eos_id (the data's EOS id); set it or disable document_mask")


class D3PM(DiffusionModule):
    discrete_bound = False  # the bound is discrete-time already (objective.T); eval.discrete_steps does not apply

    def __init__(self, cfg: DictConfig | None = None, config: dict | None = None):
        super().__init__(cfg, config)
        m, o = self.cfg.model, self.cfg.objective
        check_document_mask(m)
        if o.hybrid_lambda < 0:
            raise ConfigError(f"objective.hybrid_lambda={o.hybrid_lambda} must be >= 0 (0: the pure VLB)")
        self.graph, self.T = str(o.graph), int(o.T)
        self.schedule_name = o.schedule if o.schedule != "auto" else ("jsd" if self.graph == "absorb" else "cosine")
        self.abar = alpha_bars(self.schedule_name, self.T)  # float64 on the CPU, not a buffer (bf16 casts buffers)
        if self.graph == "absorb":
            self.mask_id = m.mask_id if m.mask_id >= 0 else m.vocab_size
            vocab = max(m.vocab_size, self.mask_id + 1)
            self.n_tokens = vocab - 1  # the ids x0 can take: all but [MASK]
        else:
            self.mask_id, vocab = None, m.vocab_size
            self.n_tokens = vocab
        self.backbone = Backbone(m, vocab_size=vocab, use_cond=True)
        self.prior_nats = prior_kl(self.graph, self.abar[-1].item(), self.n_tokens)  # per token

    def scored_mask(self, input_ids, attention_mask=None):
        return ~fixed_positions(self.cfg.model, input_ids, attention_mask)

    def _alphas(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.abar.to(i.device)
        return abar[i - 1], abar[i]

    def _logits(self, z, i, segment_ids=None, attention_mask=None) -> torch.Tensor:
        logits = self.backbone(z, sigma=i.to(torch.float32), segment_ids=segment_ids, attention_mask=attention_mask)
        logits = logits.float()
        return logits if self.mask_id is None else logits.masked_fill(_onehot(logits, self.mask_id), float("-inf"))

    def _token_terms(self, x0, i, attention_mask=None, segment_ids=None, generator=None):
        """(vlb [B, L], ce [B, L]) at steps i [B]: one draw of T * (the step's KL) + the prior per
        scored token, and -log p~(x0 | x_t) where it carries information (masked / all positions)."""
        fixed = fixed_positions(self.cfg.model, x0, attention_mask)
        a_s, a_t = self._alphas(i)
        z = corrupt_d3pm(self.graph, x0, a_t, self.n_tokens, self.mask_id, generator, keep=fixed)
        if segment_ids is None and self.cfg.model.document_mask:
            segment_ids = segment_ids_from_eos(x0, self.cfg.model.eos_id)
        logits = self._logits(z, i, segment_ids, attention_mask)
        if self.graph == "absorb":
            ce = masked_token_nll(logits, x0, z, self.mask_id).double()  # 0 at unmasked positions: KL 0 there
            kl = absorb_step_weight(a_s, a_t)[:, None] * ce
        else:
            logp = torch.log_softmax(logits, dim=-1)
            kl = uniform_step_kl(logp, x0, z, a_s, a_t)
            ce = -logp.gather(-1, x0.unsqueeze(-1)).squeeze(-1).double()
        vlb = torch.where(fixed, 0.0, self.T * kl + self.prior_nats)
        return vlb, torch.where(fixed, 0.0, ce)

    def loss(self, batch: dict) -> torch.Tensor:
        x0, am = batch["input_ids"], batch.get("attention_mask")
        g = self.step_generator(x0.device)
        t = self.training_times(x0, g)
        vlb, ce = self._token_terms(x0, draw_steps(t, self.T), am, batch.get("segment_ids"), generator=g)
        lam = self.cfg.objective.hybrid_lambda
        total = vlb.sum() + (lam * self.T) * ce.sum() if lam > 0 else vlb.sum()
        return (total / self.scored_tokens(x0, am).sum().clamp_min(1)).float()

    def nelbo_draws(self, input_ids, attention_mask=None, num_samples=1, generator=None, segment_ids=None,
                    discrete_steps=0):
        """(nats [B, K], t [B, K]): K draws of L_vb per sequence (one step each, times stratified;
        t = i/T is the step each draw used)."""
        if discrete_steps > 0:
            raise ConfigError(f"eval.discrete_steps={discrete_steps}: D3PM is discrete-time already "
                              f"(objective.T={self.T}); set eval.discrete_steps=0")
        b, dev = input_ids.shape[0], input_ids.device
        t = draw_times(b, num_samples, antithetic=self.cfg.objective.antithetic, generator=generator, device=dev)
        steps = draw_steps(t, self.T)
        nats = torch.stack([
            self._token_terms(input_ids, steps[:, k], attention_mask, segment_ids, generator)[0].sum(-1)
            for k in range(num_samples)
        ], 1)
        return nats.float(), (steps.double() / self.T).to(t.dtype)

    # ---- what the ancestral sampler uses (dlmtrain/sampling/ancestral.py) -----------------------
    def reverse_grid(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(network inputs [S], abar [S + 1] float64) of the reverse chain: all T steps when
        steps >= T, else S = steps jumps between the integer steps round(linspace(T, 0, S + 1))
        (spacing >= 1, so distinct); a jump t -> s uses the s <- t posterior, exact for q."""
        S = min(int(steps), self.T)
        grid = torch.round(torch.linspace(self.T, 0, S + 1, dtype=torch.float64)).long()
        return grid[:-1].float(), self.abar[grid]

    def denoise(self, z, t, segment_ids=None, attention_mask=None) -> torch.Tensor:
        """log p~(x0 | x_t) [B, L, V] float32 at integer step t (scalar or [B]); -inf on [MASK]."""
        i = torch.as_tensor(t, dtype=torch.float32, device=z.device).reshape(-1).expand(z.shape[0])
        return torch.log_softmax(self._logits(z, i, segment_ids, attention_mask), dim=-1)


def _onehot(logits: torch.Tensor, idx: int) -> torch.Tensor:
    m = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    m[idx] = True
    return m


register_samplers(D3PM, ANCESTRAL)
