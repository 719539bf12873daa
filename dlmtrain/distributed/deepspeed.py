"""DeepSpeed ZeRO through Lightning, its config generated from dlmtrain's, on GPU and on CPU.

``deepspeed_config`` maps the config onto DeepSpeed's: micro-batch (``trainer``), ZeRO stage,
offload, overlap, bucket sizes (``strategy``), gradient clipping (``optim.grad_clip``).
Lightning adds ``gradient_accumulation_steps`` (from the accumulation dlmtrain derives) and
the bf16/fp16 section (from ``trainer.precision``) itself; it refuses a config that sets them.

:class:`DeepSpeedStrategy` is Lightning's, plus:
- CPU (gloo): Lightning refuses non-CUDA accelerators; DeepSpeed itself runs on CPU when the
  CUDA-only steps are skipped and the engine is told its device rank (``args.device_rank``).
- checkpoints are directories written beside their name and swapped in (DirectoryCheckpoints);
- the EMA keeps this rank's ZeRO-3 partitions (dlmtrain/modules/ema.py) and is saved in each
  rank's client state, i.e. with its shard;
- ``strategy.offload_optimizer`` runs DeepSpeedCPUAdam (same hyperparameters and groups as
  the module's AdamW): DeepSpeed's fast CPU Adam instead of torch's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeed
from lightning.pytorch.strategies.deepspeed import remove_module_hooks

from dlmtrain.distributed.checkpoint import DS_TAG, DirectoryCheckpoints


def deepspeed_config(cfg, micro_batch_size: int, on_gpu: bool) -> dict:
    """DeepSpeed's JSON config for this dlmtrain config (without accumulation and precision: see module doc)."""
    s = cfg.strategy
    zero = {
        "stage": int(s.stage),
        "overlap_comm": bool(s.overlap_comm),
        "contiguous_gradients": bool(s.contiguous_gradients),
        "reduce_bucket_size": int(s.reduce_bucket_size),
    }
    if s.stage in (1, 2):
        zero["allgather_bucket_size"] = int(s.allgather_bucket_size)
    else:
        zero["stage3_prefetch_bucket_size"] = int(s.prefetch_bucket_size)
        zero["stage3_param_persistence_threshold"] = int(s.param_persistence_threshold)
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW
        "steps_per_print": 2**31 - 1,  # dlmtrain logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }


class DeepSpeedStrategy(DirectoryCheckpoints, _LightningDeepSpeed):
    dlm_strategy = "deepspeed"

    def __init__(self, config: dict, on_cpu: bool, **kwargs):
        super().__init__(config=config, **kwargs)
        self.on_cpu = on_cpu
        self.dlm_stage = int(config["zero_optimization"]["stage"])
        self.offload_optimizer = "offload_optimizer" in config["zero_optimization"]

    @property
    def shards_parameters(self) -> bool:
        """Whether a forward needs every rank (ZeRO-3 gathers parameters from all of them)."""
        return self.dlm_stage == 3

    # ---- CPU: skip Lightning's CUDA-only steps ------------------------------------------
    def setup_environment(self) -> None:
        if not self.on_cpu:
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # the accelerator's device setup, then our setup_distributed

    def setup_distributed(self) -> None:
        if not self.on_cpu:
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _init_deepspeed_distributed(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints that it built its CPU comm op
            super()._init_deepspeed_distributed()

    def _device_args(self) -> argparse.Namespace:
        return argparse.Namespace(device_rank=self.local_rank if self.on_cpu else self.root_device.index)

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        remove_module_hooks(model)  # those of an engine built for a validation before fit
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=self._device_args(), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False,
        )
        return engine, ds_optimizer

    def _initialize_deepspeed_inference(self, model) -> None:
        import deepspeed

        if getattr(self, "_train_engine", None) is not None and self._train_engine.module is model:
            self.model = self._train_engine  # after fit: the training engine serves validation as it is
            return
        # as Lightning's, with the device rank that CPU needs
        conf = {"train_micro_batch_size_per_gpu": 1, **{k: self.config[k] for k in ("fp16", "bf16") if k in self.config}}
        if self.zero_stage_3:
            conf.update(zero_allow_untested_optimizer=True, zero_optimization=self.config["zero_optimization"])
        remove_module_hooks(model)
        self.model, _, _, _ = deepspeed.initialize(args=self._device_args(), config=conf, model=model,
                                                   optimizer=None, lr_scheduler=None, model_parameters=[],
                                                   dist_init_required=False)

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        # Lightning's closure already divides the loss by the accumulation, for every strategy;
        # DeepSpeed's engine.backward would divide it again (scale_wrt_gas): gradients 1/accum too
        # small, which clipping and Adam's eps then treat differently from an unsharded run.
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        # DeepSpeed accumulates inside its engine, so Lightning calls this after every micro-batch;
        # the module updates its EMA only after a step that changed the weights (base.optimizer_step)
        self.weights_updated = bool(self.deepspeed_engine.was_step_applied())
        return out

    def _initialize_deepspeed_train(self, model) -> None:
        super()._initialize_deepspeed_train(model)
        self._train_engine = self.model

    def _init_optimizers(self):
        optimizer, scheduler = super()._init_optimizers()
        if self.offload_optimizer:
            optimizer = _to_cpu_adam(optimizer, scheduler)
        return optimizer, scheduler

    def setup(self, trainer) -> None:
        super().setup(trainer)
        ema = getattr(self.lightning_module, "ema", None)
        if ema is not None:
            ema.rebind(self.lightning_module.backbone)  # ZeRO-3: keep only this rank's partitions

    # ---- checkpoints: a directory, swapped in --------------------------------------------
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        self._save_directory(checkpoint, filepath)

    def _write_shards(self, checkpoint: dict, path: Path) -> None:
        client = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        self.deepspeed_engine.save_checkpoint(str(path), client_state=client, tag=DS_TAG)


def _to_cpu_adam(optimizer, scheduler):
    """DeepSpeedCPUAdam with the groups and hyperparameters of the module's AdamW; the LR
    scheduler is moved onto it."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    groups = [{k: v for k, v in g.items() if k not in ("foreach", "fused", "capturable", "differentiable", "maximize")}
              for g in optimizer.param_groups]
    d = optimizer.defaults
    cpu = DeepSpeedCPUAdam(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"],
                           adamw_mode=True)
    if scheduler is not None:
        scheduler.scheduler.optimizer = cpu
    return cpu
