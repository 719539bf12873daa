"""What every objective shares: optimizer, LR schedule, EMA, logging, NELBO validation.

A subclass builds ``self.backbone`` and implements two methods:
  loss(batch) -> scalar training loss (nats per scored token)
  nelbo(input_ids, attention_mask=None, num_samples=1, generator=None, segment_ids=None)
      -> per-sequence upper bound on -log p(x) in nats, summed over scored tokens
and ``scored_tokens(input_ids, attention_mask)`` -> per-sequence count of the tokens
the bound covers. Validation metrics derive from nelbo() alone.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dlmtrain.modules.ema import EMA

LN2 = math.log(2.0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices only; never norms, biases or embeddings."""
    no_decay_ids = set()
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            no_decay_ids.update(id(p) for p in mod.parameters(recurse=False))
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or id(p) in no_decay_ids else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_lambda(warmup_steps: int, max_steps: int, decay: str, min_ratio: float):
    """Linear warmup to 1, then constant, cosine or linear decay to ``min_ratio`` at max_steps."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        span = max(1, max_steps - warmup_steps)
        frac = min(1.0, (step - warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if decay == "cosine" else 1.0 - frac
        return min_ratio + (1.0 - min_ratio) * shape

    return f


class DiffusionModule(L.LightningModule):
    backbone: nn.Module

    def __init__(self, cfg: DictConfig | None = None, config: dict | None = None):
        super().__init__()
        if cfg is None:  # Lightning's load_from_checkpoint passes the saved hyperparameters
            from dlmtrain.config import config_from_resolved

            cfg = config_from_resolved(config)
        self.cfg = cfg
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        self.ema: EMA | None = None
        self._val = None
        self.abort_validation = False  # set by the stop handler: a cut-short validation logs nothing

    # ---- subclass API ---------------------------------------------------------------
    def loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def nelbo(self, input_ids, attention_mask=None, num_samples=1, generator=None, segment_ids=None):
        raise NotImplementedError

    def scored_tokens(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        if attention_mask is None:
            return torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
        return attention_mask.sum(-1)

    # ---- distributed context (no-ops outside a Trainer) ------------------------------
    @property
    def rank_and_world(self) -> tuple[int, int]:
        if self._trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def step_generator(self, device) -> torch.Generator:
        """The training step's randomness (times, masks), a pure function of (seed, step,
        micro-batch, rank): a resumed run draws exactly what the uninterrupted run would have."""
        if getattr(self, "_gen", None) is None or self._gen.device != torch.device(device):
            self._gen = torch.Generator(device=device)
        rank, _ = self.rank_and_world
        accum = self.trainer.accumulate_grad_batches if self._trainer else 1
        micro = getattr(self, "_batch_idx", 0) % accum
        self._gen.manual_seed(((self.cfg.trainer.seed * 1_000_003 + self.global_step) * 1024 + micro) * 65536 + rank)
        return self._gen

    # ---- training --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.ema is None and self.cfg.optim.ema > 0:
            self.ema = EMA(self.backbone, self.cfg.optim.ema)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._batch_idx = batch_idx
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.backbone)

    def configure_optimizers(self):
        o = self.cfg.optim
        # foreach, not fused: Lightning refuses gradient clipping with fused AdamW under AMP
        opt = torch.optim.AdamW(
            param_groups(self.backbone, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=True
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(o.warmup_steps, self.cfg.trainer.max_steps, o.decay, o.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- validation: NELBO under the EMA weights -------------------------------------
    def on_validation_epoch_start(self) -> None:
        if self.ema is not None:
            self.ema.swap_in(self.backbone)
        self._val = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, tokens, sequences
        # Same draws every validation: the same weights always give the same val/nelbo.
        self._val_gen = torch.Generator(device=self.device)
        self._val_gen.manual_seed(self.cfg.trainer.seed + 7919 * (1 + self.rank_and_world[0]))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ids, am = batch["input_ids"], batch.get("attention_mask")
        nel = self.nelbo(ids, am, num_samples=self.cfg.eval.nelbo_samples, generator=self._val_gen,
                         segment_ids=batch.get("segment_ids"))
        ntok = self.scored_tokens(ids, am)
        rows = ntok > 0
        self._val += torch.stack([nel[rows].sum().double(), ntok.sum().double(), rows.sum().double()])

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val, reduce_op="sum") if self._trainer else self._val
        nats, tokens, seqs = sums.tolist()
        if tokens > 0 and not self.abort_validation:
            self._last_val_step = self.global_step
            per_tok = nats / tokens
            self.log_dict(
                {
                    "val/nelbo": per_tok,
                    "val/ppl_bound": math.exp(min(per_tok, 50.0)),
                    "val/bpt": per_tok / LN2,
                    "val/tokens": tokens,
                },
                sync_dist=False,
                rank_zero_only=False,
            )
        # Restore training weights here, before ModelCheckpoint saves in on_validation_end.
        if self.ema is not None:
            self.ema.swap_out(self.backbone)

    # ---- checkpoint extras -------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        checkpoint["dlmtrain_config"] = OmegaConf.to_yaml(self.cfg, resolve=True)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.cfg.optim.ema > 0 and "ema" in checkpoint:
            if self.ema is None:
                self.ema = EMA(self.backbone, self.cfg.optim.ema)
            self.ema.load_state_dict(checkpoint["ema"])
        self._apply_optim_config(checkpoint)

    def _apply_optim_config(self, checkpoint: dict) -> None:
        """Make a resumed run use *this* config's optimizer settings, not the checkpoint's.

        Lightning restores the optimizer's param groups (lr, betas, eps, weight decay) and
        LambdaLR's base_lrs from the checkpoint; the schedule's shape (warmup, decay,
        max_steps) comes from the new config because the lambda is rebuilt. Patching the
        checkpoint here, before Lightning restores from it, is what lets a changed
        ``optim.lr`` (e.g. after the non-finite guard fired) take effect.
        """
        o = self.cfg.optim
        scheds, opts = checkpoint.get("lr_schedulers") or [], checkpoint.get("optimizer_states") or []
        if not opts:
            return
        step = int(scheds[0].get("last_epoch", 0)) if scheds else 0
        factor = lr_lambda(o.warmup_steps, self.cfg.trainer.max_steps, o.decay, o.min_lr_ratio)(step)
        groups = opts[0]["param_groups"]
        for i, g in enumerate(groups):
            g.update(lr=o.lr * factor, initial_lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                     weight_decay=o.weight_decay if i == 0 else 0.0)
        if scheds:
            scheds[0]["base_lrs"] = [o.lr] * len(groups)
            scheds[0]["_last_lr"] = [o.lr * factor] * len(groups)
