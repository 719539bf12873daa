"""Parallelism from outside the model: the strategy factory, the checks that run before
anything starts, and what is applied to the backbone (dlmtrain/distributed/parallelize.py).

Strategies (``strategy=<name>``, configs/strategy/; the options in dlmtrain/config.py
StrategyConfig):

    ddp                      Lightning's DDP
    fsdp                     FSDP2, fully_shard per block (fsdp.py)
    deepspeed_zero1/2/3      DeepSpeed ZeRO (deepspeed.py); also on CPU
    deepspeed_zero3_offload  ZeRO-3 with optimizer and parameters on CPU (GPU only)

``strategy.name=auto`` passes ``trainer.strategy`` to Lightning as is (e.g. ``ddp_spawn``):
the low-level escape hatch; setting both is an error. Activation checkpointing and
compile (``trainer.activation_checkpointing``, ``trainer.compile``) compose with every one.
Under fsdp and deepspeed, checkpoints are directories (dlmtrain/distributed/checkpoint.py).
"""

from __future__ import annotations

from dlmtrain.errors import ConfigError


def _on_gpu(cfg) -> bool:
    import torch

    return cfg.trainer.accelerator in ("gpu", "cuda") or (cfg.trainer.accelerator == "auto" and torch.cuda.is_available())


def check(cfg, world: int, precision: str) -> None:
    """What the strategy asks of this machine and these packages; ConfigError before anything starts."""
    s, t = cfg.strategy, cfg.trainer
    if s.name == "auto" and t.strategy != "auto":
        from lightning.pytorch.strategies import StrategyRegistry

        if t.strategy not in StrategyRegistry:
            names = ", ".join(n for n in StrategyRegistry
                              if not n.startswith(("deepspeed", "fsdp")) and "find_unused" not in n
                              and "xla" not in n and "tpu" not in n)
            raise ConfigError(f"trainer.strategy={t.strategy} is not a Lightning strategy; use the strategy group "
                              f"(strategy=ddp|fsdp|deepspeed_zero1|deepspeed_zero2|deepspeed_zero3|"
                              f"deepspeed_zero3_offload) or one of Lightning's: {names}")
    if s.name == "deepspeed":
        import importlib.util
        import os

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("strategy.name=deepspeed needs the deepspeed package: pip install deepspeed")
        if not _on_gpu(cfg):  # DeepSpeed would warn that it found no GPU (inherited by the launched ranks)
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if (s.offload_optimizer or s.offload_params) and not _on_gpu(cfg):
            raise ConfigError("strategy.offload_optimizer / offload_params move GPU memory to the CPU; training on "
                              "CPU has nothing to offload: use strategy=deepspeed_zero3 (or a GPU)")
        if precision == "16-mixed" and t.compile:
            raise ConfigError("trainer.compile with DeepSpeed fp16 is not supported; use bf16-mixed")
    if s.name == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            raise ConfigError("strategy=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6)") from None
        if t.num_nodes > 1 and world % t.num_nodes:
            raise ConfigError(f"strategy=fsdp: world size {world} is not a multiple of trainer.num_nodes={t.num_nodes}")
        if precision == "16-mixed":
            raise ConfigError("strategy=fsdp with trainer.precision=16-mixed is not supported (no gradient scaler for "
                              "sharded gradients); use bf16-mixed")


def check_resume(cfg, info, world: int) -> None:
    """A checkpoint resumes only under a strategy that can read it; say what to do otherwise."""
    if info is None:
        return
    s = cfg.strategy
    here = "fsdp" if s.name == "fsdp" else "deepspeed" if s.name == "deepspeed" else "file"
    ok = here == info.strategy
    if ok and here == "deepspeed":  # ZeRO partitions (and the EMA's) are laid out per stage and world size
        ok = info.stage == s.stage and info.world_size == world
    if ok:
        return
    now = {"file": f"strategy.name={s.name}", "fsdp": "strategy=fsdp",
           "deepspeed": f"strategy=deepspeed_zero{s.stage} on {world} rank(s)"}[here]
    hint = ("; to continue its weights under another strategy, start a new run from them: "
            "dlmtrain.load_checkpoint reads any checkpoint")
    raise ConfigError(f"cannot resume {info.path}, {info.describe()}, with {now}; resume with the strategy and "
                      f"world size that wrote it, or run.resume=never{hint}")


def prepare(cfg, module, world: int, micro: int, precision: str) -> dict:
    """Install what is applied to the backbone and return the Trainer arguments the strategy sets:
    ``strategy``, ``gradient_clip_val``, ``inference_mode``."""
    from dlmtrain.distributed.parallelize import Parallelize

    s, t = cfg.strategy, cfg.trainer
    clip = cfg.optim.grad_clip or None
    module.parallelize = Parallelize(
        activation_checkpointing=bool(t.activation_checkpointing), compile=bool(t.compile), fsdp=s.name == "fsdp",
        reshard_after_forward=bool(s.reshard_after_forward), bf16=bool(s.mixed_precision) and precision == "bf16-mixed",
    )
    if s.name == "auto":
        return {"strategy": t.strategy, "gradient_clip_val": clip}
    if s.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return {"strategy": DDPStrategy(find_unused_parameters=bool(s.find_unused_parameters)), "gradient_clip_val": clip}
    # sharded: evaluation runs under no_grad, not inference_mode (gathered parameters must stay usable for training)
    if s.name == "fsdp":
        from dlmtrain.distributed.fsdp import FSDP2Strategy

        outside = [n for n, _ in module.named_parameters() if not n.startswith("backbone.")]
        if outside:  # known before the Trainer starts (no objective has any today)
            raise ConfigError(f"strategy=fsdp shards the backbone only, but {type(module).__name__} has parameters "
                              f"outside it ({', '.join(outside[:3])}); use a deepspeed strategy or ddp")

        return {"strategy": FSDP2Strategy(world), "gradient_clip_val": clip, "inference_mode": False}
    from dlmtrain.distributed.deepspeed import DeepSpeedStrategy, deepspeed_config

    gpu = _on_gpu(cfg)
    # DeepSpeed clips inside its optimizer step (gradient_clipping in its config); Lightning must not
    return {"strategy": DeepSpeedStrategy(deepspeed_config(cfg, micro, gpu), on_cpu=not gpu),
            "gradient_clip_val": None, "inference_mode": False}
