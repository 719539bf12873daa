"""What every objective shares: optimizer, LR schedule, EMA, logging, NELBO validation.

A subclass builds ``self.backbone`` and implements:
  loss(batch) -> scalar training loss (nats per scored token)
  nelbo_draws(input_ids, attention_mask=None, num_samples=1, generator=None, segment_ids=None,
              discrete_steps=0) -> (nats [B, K], t [B, K]): K Monte Carlo draws of a per-sequence
      upper bound on -log p(x) in nats, summed over scored tokens, and each draw's time
  scored_mask(input_ids, attention_mask) -> [B, L] bool, the tokens the bound covers
An objective that sets ``prompt_conditioning = True`` also takes ``prompt_mask`` [B, L] (True on
prompt tokens; batches of prompt-conditioned data carry it) as a keyword of nelbo_draws and
scored_mask: the bound is then on -log p(rest | prompt) and the prompt is not scored.
``nelbo()`` is the mean of the draws. Validation produces the draws under the EMA weights
(``validation_step`` returns them); the ELBO callback (dlmtrain/callbacks/elbo.py) turns
them into val/* metrics. A Trainer given none gets a default one (``configure_callbacks``).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dlmtrain.diffusion.schedules import stratified_times
from dlmtrain.errors import ConfigError
from dlmtrain.modules.ema import EMA


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
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partitioned parameter's own shape is empty
        (no_decay if ndim < 2 or id(p) in no_decay_ids else decay).append(p)
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
        self.abort_validation = False  # set by the stop handler: a cut-short validation logs nothing
        # Sharding, activation checkpointing, compile: applied from outside by dlmtrain.distributed.prepare
        self.parallelize = None

    # ---- subclass API ---------------------------------------------------------------
    def loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def nelbo_draws(self, input_ids, attention_mask=None, num_samples=1, generator=None, segment_ids=None,
                    discrete_steps=0) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    discrete_bound = False  # whether nelbo_draws(discrete_steps=T > 0) is implemented
    prompt_conditioning = False  # whether nelbo_draws/scored_mask take prompt_mask (SFT data)

    def nelbo(self, input_ids, attention_mask=None, num_samples=1, generator=None, segment_ids=None, **kw):
        """Per-sequence upper bound on -log p(x) in nats: the mean of ``num_samples`` draws
        (``prompt_mask=`` where supported: on -log p(rest | prompt))."""
        return self.nelbo_draws(input_ids, attention_mask, num_samples, generator, segment_ids, **kw)[0].mean(1)

    def _prompt_kw(self, batch: dict) -> dict:
        """``{"prompt_mask": ...}`` for a batch of prompt-conditioned data, else {}."""
        if batch.get("prompt_mask") is None:
            return {}
        if not self.prompt_conditioning:
            raise ConfigError(f"the data is prompt-conditioned (prompt/answer pairs), which objective "
                              f"{self.cfg.objective.name} does not support; use objective.name=mdlm or other data")
        return {"prompt_mask": batch["prompt_mask"]}

    def scored_mask(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        return attention_mask.bool()

    def scored_tokens(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return self.scored_mask(input_ids, attention_mask).sum(-1)

    # ---- distributed context (no-ops outside a Trainer) ------------------------------
    @property
    def rank_and_world(self) -> tuple[int, int]:
        if self._trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def training_times(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One t per row, stratified over the global batch without communication (rank offset)."""
        rank, world = self.rank_and_world
        b = x0.shape[0]
        return stratified_times(b, offset=rank * b, total=world * b, antithetic=self.cfg.objective.antithetic,
                                generator=generator, device=x0.device)

    def step_generator(self, device) -> torch.Generator:
        """The training step's randomness (times, masks), a pure function of (seed, step,
        slot): a resumed run draws exactly what the uninterrupted run would have. The slot
        ``micro * world + rank`` numbers the micro-batches of a global batch the way one
        process accumulating them would (micro-batch j of 1 process = rank j of ``world``),
        so the same global batch draws the same noise under any world size."""
        if getattr(self, "_gen", None) is None or self._gen.device != torch.device(device):
            self._gen = torch.Generator(device=device)
        rank, world = self.rank_and_world
        accum = self.trainer.accumulate_grad_batches if self._trainer else 1
        slot = (getattr(self, "_batch_idx", 0) % accum) * world + rank
        self._gen.manual_seed(((self.cfg.trainer.seed * 1_000_003 + self.global_step) * 1024 + slot) * 65536)
        return self._gen

    # ---- parallelism (dlmtrain/distributed/) ----------------------------------------------
    def configure_model(self) -> None:
        """Lightning calls this in every fit/validate once the processes (and a device mesh) exist."""
        if self.parallelize is not None:
            self.parallelize(self)

    # ---- training --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if getattr(dm, "prompt_conditioned", False):
            self._prompt_kw({"prompt_mask": True})  # unsupported: fail before the first step
        if self.ema is None and self.cfg.optim.ema > 0:
            self.ema = EMA(self.backbone, self.cfg.optim.ema)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._batch_idx = batch_idx
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # a strategy that accumulates inside its engine (DeepSpeed) is called after every micro-batch
        # and says whether this call changed the weights
        if self.ema is not None and getattr(self.trainer.strategy, "weights_updated", True):
            self.ema.update(self.backbone)

    def configure_optimizers(self):
        o = self.cfg.optim
        kernel = {"fused": True} if o.get("fused", False) else {"foreach": True}
        opt = torch.optim.AdamW(
            param_groups(self.backbone, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps, **kernel
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(o.warmup_steps, self.cfg.trainer.max_steps, o.decay, o.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning's AMP plugin refuses to clip for any optimizer that unscales in its own step (fused
        # AdamW), also under bf16-mixed where there is no GradScaler and so nothing to unscale. Without a
        # scaler, clip as the base precision plugin does (clip_grad_norm_ over the optimizer's params).
        # 16-mixed with a scaler keeps Lightning's refusal (config.py rejects it up front).
        plugin = self.trainer.precision_plugin
        if (gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False)
                and getattr(plugin, "scaler", None) is None):
            from lightning.pytorch.plugins.precision import Precision
            from lightning.pytorch.utilities import GradClipAlgorithmType

            Precision.clip_gradients(plugin, optimizer, gradient_clip_val,
                                     GradClipAlgorithmType(gradient_clip_algorithm or "norm"))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- validation: NELBO draws under the EMA weights ----------------------------------
    def configure_callbacks(self):
        """A Trainer without an ELBO callback gets one (metrics only, no files), so validation
        always yields val/*; `dlmtrain train` passes its own (run directory, W&B)."""
        from dlmtrain.callbacks.elbo import ELBOEval

        if self._trainer is not None and any(isinstance(c, ELBOEval) for c in self.trainer.callbacks):
            return []
        return [ELBOEval()]

    def on_validation_epoch_start(self) -> None:
        if self.ema is not None:
            self.ema.swap_in(self.backbone)

    def elbo_batch(self, batch: dict, generator: torch.Generator, num_samples: int, discrete_steps: int = 0) -> dict:
        """The draws the ELBO accumulator needs for one batch: ``nats``/``t`` [B, K] (continuous
        time), ``scored`` [B, L], and ``nats_T`` [B, K] (the T-step bound) when discrete_steps > 0."""
        ids, am, seg = batch["input_ids"], batch.get("attention_mask"), batch.get("segment_ids")
        kw = self._prompt_kw(batch)
        nats, t = self.nelbo_draws(ids, am, num_samples, generator, seg, **kw)
        out = {"nats": nats, "t": t, "scored": self.scored_mask(ids, am, **kw)}
        if discrete_steps > 0:
            out["nats_T"] = self.nelbo_draws(ids, am, num_samples, generator, seg, discrete_steps=discrete_steps,
                                             **kw)[0]
        return out

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        from dlmtrain.eval.elbo import eval_generator

        # Same draws every validation (comparable curves), a function of (seed, rank, batch)
        # only: not of the DataLoader workers or of what earlier batches consumed.
        g = eval_generator(self.cfg.trainer.seed, self.rank_and_world[0], batch_idx, self.device)
        return self.elbo_batch(batch, g, self.cfg.eval.nelbo_samples, self.cfg.eval.discrete_steps)

    def on_validation_epoch_end(self) -> None:
        # Restore training weights here, before ModelCheckpoint saves in on_validation_end.
        # (Callbacks' on_validation_epoch_end, where the ELBO callback logs, ran before this.)
        if self.ema is not None:
            self.ema.swap_out(self.backbone)

    # ---- checkpoint extras -------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        checkpoint["dlmtrain_config"] = OmegaConf.to_yaml(self.cfg, resolve=True)
        if self._trainer is not None:
            from dlmtrain.checkpoint.compat import ACCUMULATION_KEY

            checkpoint[ACCUMULATION_KEY] = int(self.trainer.accumulate_grad_batches)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.cfg.optim.ema > 0 and "ema" in checkpoint:
            if self.ema is None:
                self.ema = EMA(self.backbone, self.cfg.optim.ema)
            self.ema.load_state_dict(checkpoint["ema"])
        self._apply_optim_config(checkpoint)
        self._apply_accumulation(checkpoint)

    def _apply_accumulation(self, checkpoint: dict) -> None:
        """Resumed with another gradient accumulation (world size or micro_batch_size changed): keep
        every optimizer step a whole global batch (dlmtrain.checkpoint.compat.rescale_micro_batches)."""
        from dlmtrain.checkpoint.compat import ACCUMULATION_KEY, rescale_micro_batches

        was = checkpoint.get(ACCUMULATION_KEY)
        if self._trainer is None or was is None:  # not resuming a fit, or a checkpoint from before this key
            return
        now = int(self.trainer.accumulate_grad_batches)
        if rescale_micro_batches(checkpoint, int(was), now) and self.trainer.is_global_zero:
            print(f"[dlmtrain] gradient accumulation {was} -> {now} on resume: micro-batch counters rescaled so "
                  "each optimizer step still sees one whole global batch", flush=True)

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
        if opts:
            groups = opts[0]["param_groups"]
        elif self._trainer is not None and self.trainer.optimizers:
            # sharded strategies (DeepSpeed, FSDP2) restored the optimizer already: patch the live one
            groups = self.trainer.optimizers[0].param_groups
        else:
            return
        step = int(scheds[0].get("last_epoch", 0)) if scheds else 0
        factor = lr_lambda(o.warmup_steps, self.cfg.trainer.max_steps, o.decay, o.min_lr_ratio)(step)
        for i, g in enumerate(groups):
            g.update(lr=o.lr * factor, initial_lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                     weight_decay=o.weight_decay if i == 0 else 0.0)
        if scheds:
            scheds[0]["base_lrs"] = [o.lr] * len(groups)
            scheds[0]["_last_lr"] = [o.lr * factor] * len(groups)
