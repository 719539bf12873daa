"""BD3-LM: block diffusion on the shared backbone (math in diffusion/block.py).

The backbone reads [x_t ; x0] (2L tokens, rotary positions 0..L-1 twice) under the block
diffusion mask; the logits of the x_t copy score the masked tokens of every block at once.
On CUDA the mask also goes to the backbone as a flex_attention BlockMask (the compiled fast
path of backbone/attention.py); on CPU, with padding, or if flex fails, SDPA takes the
boolean mask. SUBS as in MDLM: [MASK] gets no mass and clean tokens are copied.

``nelbo`` is the block bound L_BD over the full time range [0, 1] (every term: the
diffusion integral and the reconstruction below eps of each block; the prior is 0). The
training loss draws each block's time from [objective.clip_min, objective.clip_max] (the
paper's clipped schedules; [0, 1] by default, where the loss is the bound per token).
Per-block times mean a draw has no single time: ``has_time = False`` (no t-binned picture);
the t reported with each draw is the mean of its blocks' times. With block_size = 1 (and no
time conditioning) the bound is computed exactly: every token masked, weight 1, i.e. the
model's autoregressive -log p(x) (no Monte Carlo noise), in training too.

``objective.masked_head`` (default on), as in MDLM: the output norm, head and chunked float32
cross-entropy run only at the masked positions of the x_t copy (SUBS gives the others zero loss);
loss, bound and gradients equal the full-logits path to float rounding
(tests/modules/test_bd3lm.py::test_masked_head_equals_full_logits).

Prompt-conditioned data (SFT): prompt tokens are never masked or scored (as in mdlm.py);
padding likewise. Not supported: ``model.document_mask`` (the cached sampler has no
document boundaries), ``model.causal``, the flash backend (it takes no mask), discrete-time
bounds. Samplers: dlmtrain/sampling/block.py (ancestral, first_hitting, confidence inside
blocks, KV cache of the clean prefix).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dlmtrain.backbone import Backbone
from dlmtrain.diffusion.block import (
    attention_mask, block_draw_times, block_times, mask_mod, num_blocks, per_position,
)
from dlmtrain.diffusion.masked import corrupt, masked_token_nll, time_weights
from dlmtrain.diffusion.schedules import get_schedule
from dlmtrain.errors import ConfigError
from dlmtrain.modules.base import DiffusionModule
from dlmtrain.sampling.block import BLOCK_SAMPLERS
from dlmtrain.sampling.registry import register_samplers


class BD3LM(DiffusionModule):
    prompt_conditioning = True
    has_time = False

    def __init__(self, cfg: DictConfig | None = None, config: dict | None = None):
        super().__init__(cfg, config)
        m, o = self.cfg.model, self.cfg.objective
        if m.document_mask:
            raise ConfigError("objective bd3lm does not support model.document_mask (its cached sampler knows no "
                              "document boundaries); set model.document_mask=false")
        if m.causal:
            raise ConfigError("objective bd3lm brings its own block-causal mask; set model.causal=false")
        if m.attn_backend == "flash":
            raise ConfigError("objective bd3lm needs an attention mask, which flash-attn cannot take; "
                              "set model.attn_backend=auto (SDPA, flex_attention on CUDA) or sdpa")
        self.mask_id = m.mask_id if m.mask_id >= 0 else m.vocab_size
        self.schedule = get_schedule(o.schedule)
        self.block_size = int(o.block_size)
        self.eos_id = int(m.eos_id)
        # one token per block, time-agnostic: the bound's expectation in closed form (diffusion/block.py)
        self.exact_single = self.block_size == 1 and not o.time_conditioning
        self.backbone = Backbone(m, vocab_size=max(m.vocab_size, self.mask_id + 1), use_cond=o.time_conditioning)
        self._structure: dict = {}

    @property
    def time_conditioned(self) -> bool:
        return bool(self.cfg.objective.time_conditioning)

    def structure(self, L: int, device) -> tuple[torch.Tensor, object]:
        """(the [2L, 2L] boolean mask, its flex BlockMask on CUDA or None), built once per (L, device)
        as ordinary tensors, also when first asked for under inference mode (validation), so that
        training may save them for backward."""
        key = (L, str(device))
        if key not in self._structure:
            with torch.inference_mode(False):
                block = None
                if torch.device(device).type == "cuda":
                    try:
                        from torch.nn.attention.flex_attention import create_block_mask

                        block = create_block_mask(mask_mod(L, self.block_size), None, None, 2 * L, 2 * L,
                                                  device=device)
                    except Exception:  # noqa: BLE001 - no flex here: SDPA with the boolean mask
                        block = None
                self._structure[key] = (attention_mask(L, self.block_size, device), block)
        return self._structure[key]

    def logits(self, z, x0, tau=None, attention_mask=None, **head) -> torch.Tensor:
        """Logits [B, L, V] of the x_t copy for z = x_t, x0 [B, L]; tau [B, L] each position's
        time (used with time conditioning; the clean copy gets t = 0). ``head``: out_mask [B, 2L]
        (and targets, exclude, chunk_size) instead, passed to the backbone (its forward)."""
        L = x0.shape[1]
        mask, block = self.structure(L, x0.device)
        sigma = None
        if self.time_conditioned:
            sigma = self.schedule.sigma(torch.cat([tau, torch.zeros_like(tau)], 1).float())
        am = None if attention_mask is None else attention_mask.bool().repeat(1, 2)
        pos = torch.arange(L, device=x0.device).repeat(2)
        out = {"out_positions": slice(0, L)} if not head else head
        return self.backbone(torch.cat([z, x0], 1), sigma=sigma, attention_mask=am, attn_mask=mask, block_mask=block,
                             position_ids=pos, **out)

    def _fixed(self, input_ids, attention_mask, prompt_mask=None):
        """Positions never corrupted and never scored: padding and prompt tokens."""
        fixed = torch.zeros_like(input_ids, dtype=torch.bool) if attention_mask is None else ~attention_mask.bool()
        if prompt_mask is not None:
            fixed |= prompt_mask.bool()
        return fixed

    def scored_mask(self, input_ids, attention_mask=None, prompt_mask=None):
        return ~self._fixed(input_ids, attention_mask, prompt_mask)

    def _token_nelbo(self, x0, t, attention_mask=None, generator=None, prompt_mask=None):
        """One draw of the per-token bound [B, L] at block times t [B, blocks] (None: exact_single)."""
        L = x0.shape[1]
        fixed = self._fixed(x0, attention_mask, prompt_mask)
        if t is None:  # block_size 1: every free token masked, weight 1
            tau, w = torch.ones(x0.shape, device=x0.device), torch.ones(x0.shape, device=x0.device)
            z = x0.masked_fill(~fixed, self.mask_id)
        else:
            tau_b, w_b = time_weights(t, self.schedule, self.cfg.objective.eps)
            tau, w = per_position(tau_b, L, self.block_size), per_position(w_b, L, self.block_size)
            z = corrupt(x0, 1.0 - self.schedule.alpha(tau), self.mask_id, generator, keep=fixed)
        o = self.cfg.objective
        if o.get("masked_head", False) and isinstance(self.backbone, Backbone):
            masked = z == self.mask_id  # SUBS: only these cost anything; the clean copy never does
            nll = self.logits(z, x0, tau, attention_mask, out_mask=torch.cat([masked, torch.zeros_like(masked)], 1),
                              targets=x0[masked], exclude=self.mask_id, chunk_size=int(o.get("ce_chunk_size", 0)))
            out = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
            out[masked] = nll
            return out * w
        logits = self.logits(z, x0, tau, attention_mask)
        return masked_token_nll(logits, x0, z, self.mask_id) * w

    def loss(self, batch: dict) -> torch.Tensor:
        x0, am, pm = batch["input_ids"], batch.get("attention_mask"), batch.get("prompt_mask")
        o = self.cfg.objective
        rank, world = self.rank_and_world
        b, L = x0.shape
        g = self.step_generator(x0.device)
        t = None
        if not self.exact_single:
            t = block_times(b, num_blocks(L, self.block_size), lo=o.clip_min, hi=o.clip_max, offset=rank * b,
                            total=world * b, antithetic=o.antithetic, generator=g, device=x0.device)
        per_tok = self._token_nelbo(x0, t, am, g, pm)
        return per_tok.sum() / self.scored_mask(x0, am, pm).sum().clamp_min(1)

    def nelbo_draws(self, input_ids, attention_mask=None, num_samples=1, generator=None, segment_ids=None,
                    discrete_steps=0, prompt_mask=None):
        """(nats [B, K], t [B, K]): K draws of L_BD per sequence over the full range of t (never
        clipped); t is the mean of each draw's block times. ``segment_ids`` are not used."""
        if discrete_steps > 0:
            raise ConfigError(f"eval.discrete_steps={discrete_steps}: objective bd3lm has no discrete-time bound; "
                              "set eval.discrete_steps=0")
        b, L = input_ids.shape
        if self.exact_single:
            nats = self._token_nelbo(input_ids, None, attention_mask, prompt_mask=prompt_mask).sum(-1)
            return nats[:, None].expand(-1, num_samples).clone(), torch.ones(b, num_samples, device=input_ids.device)
        t = block_draw_times(b, num_blocks(L, self.block_size), num_samples, antithetic=self.cfg.objective.antithetic,
                             generator=generator, device=input_ids.device)
        nats = torch.stack([
            self._token_nelbo(input_ids, t[:, :, k], attention_mask, generator, prompt_mask).sum(-1)
            for k in range(num_samples)
        ], 1)
        return nats, t.mean(1)


register_samplers(BD3LM, BLOCK_SAMPLERS)
