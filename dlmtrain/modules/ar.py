"""AR: the autoregressive baseline on the shared backbone, causal (math in diffusion/autoregressive.py).

The backbone is always causal: loading a config with ``objective.name=ar`` sets
``model.causal=true`` (dlmtrain/config.py), and a hand-built non-causal one is refused.
It reads one extra input id, the start token ``start_id = model.vocab_size``, and predicts
the ``vocab_size`` data ids (so ``model.tie_weights`` has no effect). ``nelbo`` is the exact
-log p(x), every token scored, the first one from the start token; under
``model.document_mask`` each document is scored as a sequence of its own, EOS included
(see diffusion/autoregressive.py). Its ``nelbo_draws`` are K equal columns at t = 0: no
Monte Carlo noise (val/nelbo_se_mc = 0) and no diffusion time (``has_time = False``: the
ELBO callback draws no t-binned picture). Samplers: dlmtrain/sampling/autoregressive.py.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from dlmtrain.backbone import Backbone, segment_ids_from_eos
from dlmtrain.diffusion.autoregressive import shift_right, token_nll
from dlmtrain.errors import ConfigError
from dlmtrain.modules.base import DiffusionModule
from dlmtrain.sampling.autoregressive import AR_SAMPLERS
from dlmtrain.sampling.registry import register_samplers


class AR(DiffusionModule):
    has_time = False

    def __init__(self, cfg: DictConfig | None = None, config: dict | None = None):
        super().__init__(cfg, config)
        m = self.cfg.model
        if not m.causal:
            raise ConfigError("objective ar needs a causal backbone: set model.causal=true "
                              "(dlmtrain.load_config does so for objective ar)")
        if m.document_mask and m.eos_id < 0:
            raise ConfigError("model.document_mask=true needs model.eos_id (the data's EOS id); set it or disable document_mask")
        self.start_id = int(m.vocab_size)
        self.document_mask, self.eos_id = bool(m.document_mask), int(m.eos_id)
        self.backbone = Backbone(m, vocab_size=self.start_id + 1, out_dim=self.start_id)

    def segments(self, x: torch.Tensor, segment_ids=None) -> torch.Tensor | None:
        """Document index per position under document masking (the batch's, else from EOS); else None."""
        if not self.document_mask:
            return None
        return segment_ids if segment_ids is not None else segment_ids_from_eos(x, self.eos_id)

    def logits(self, x: torch.Tensor, attention_mask=None, segment_ids=None) -> torch.Tensor:
        """[B, L, V] float32: row i scores x_i given x_<i (x_i itself is not read)."""
        seg = self.segments(x, segment_ids)
        am = None if attention_mask is None else attention_mask.bool()
        return self.backbone(shift_right(x, self.start_id, seg), segment_ids=seg, attention_mask=am)

    def token_nll(self, x, attention_mask=None, segment_ids=None) -> torch.Tensor:
        """-log p(x_i | x_<i) [B, L]; 0 on padding."""
        return token_nll(self.logits(x, attention_mask, segment_ids), x, self.scored_mask(x, attention_mask))

    def loss(self, batch: dict) -> torch.Tensor:
        x, am = batch["input_ids"], batch.get("attention_mask")
        return self.token_nll(x, am, batch.get("segment_ids")).sum() / self.scored_tokens(x, am).sum().clamp_min(1)

    def nelbo_draws(self, input_ids, attention_mask=None, num_samples=1, generator=None, segment_ids=None,
                    discrete_steps=0):
        """(nats [B, K], t [B, K]): the exact -log p(x) in every column, t = 0."""
        if discrete_steps > 0:
            raise ConfigError(f"eval.discrete_steps={discrete_steps}: objective ar has no discrete-time bound "
                              "(its nelbo is exact); set eval.discrete_steps=0")
        nats = self.token_nll(input_ids, attention_mask, segment_ids).sum(-1)
        return nats[:, None].expand(-1, num_samples).clone(), torch.zeros_like(nats)[:, None].expand(-1, num_samples)


register_samplers(AR, AR_SAMPLERS)
