"""`dlmtrain train`: data + module + callbacks + Trainer from one config.

The run directory is a pure function of the config (run.dir, else runs/<run.name>),
so a requeued job lands in the same place and resumes from its last.ckpt.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dlmtrain.config import batch_split, to_yaml
from dlmtrain.errors import ConfigError


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run.dir) if cfg.run.dir else Path("runs") / cfg.run.name


def world_size(cfg: DictConfig) -> int:
    """Processes the Trainer will start, known before it starts them."""
    t = cfg.trainer
    devices = t.devices
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        n = len(devices)
    elif isinstance(devices, int) and devices > 0:
        n = devices
    elif devices in ("auto", -1, "-1"):
        on_gpu = t.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        n = torch.cuda.device_count() if on_gpu else 1
    else:
        raise ConfigError(f"trainer.devices={devices!r}: use a positive number, a list of ids, or auto")
    return n * t.num_nodes


def precision(cfg: DictConfig) -> str:
    p = cfg.trainer.precision
    if p != "auto":
        return p
    on_gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu else "32-true"


def resume_path(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    r = cfg.run.resume
    if r == "never":
        return None
    if r == "auto":
        last = ckpt_dir / "last.ckpt"
        return str(last) if last.exists() else None
    if not Path(r).exists():
        raise ConfigError(f"run.resume={r}: no such checkpoint; use auto, never, or a path to a .ckpt")
    return r


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def fill_from_data(cfg: DictConfig, dm) -> None:
    """Token-space facts the data knows: vocabulary and special ids (unless set by hand)."""
    m = cfg.model
    if m.vocab_size <= 0:
        m.vocab_size = dm.vocab_size
    elif m.vocab_size < dm.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the data's vocabulary ({dm.vocab_size})")
    if m.eos_id < 0 and dm.eos_id is not None:
        m.eos_id = dm.eos_id
    if m.mask_id < 0 and getattr(dm, "mask_id", None) is not None:
        m.mask_id = dm.mask_id


def wandb_logger(cfg: DictConfig, out: Path):
    w = cfg.logger.wandb
    try:
        from lightning.pytorch.loggers import WandbLogger
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("logger.wandb.enabled=true needs wandb: pip install wandb") from None
    mode = os.environ.get("WANDB_MODE") or w.mode
    if mode == "auto":
        has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _netrc()
        mode = "online" if has_key else "offline"
        if not has_key:
            print(f"[dlmtrain] no W&B API key configured: logging offline to {out / 'wandb'} (wandb sync to upload)")
    run_id = "dlm-" + hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]  # requeues continue the run
    return WandbLogger(
        project=w.project, entity=w.entity or None, name=cfg.run.name, save_dir=str(out), id=run_id,
        resume="allow", mode=mode, tags=list(w.tags),
    )


def _netrc() -> str:
    p = Path.home() / ".netrc"
    return p.read_text() if p.exists() else ""


def train(cfg: DictConfig, extra_callbacks: list | None = None) -> dict:
    """Train per ``cfg``; returns the final metrics (floats) and paths."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from dlmtrain.backbone import count_params
    from dlmtrain.callbacks.checkpoint_io import AtomicCheckpointIO
    from dlmtrain.callbacks.guards import GracefulStop, NonFiniteLossGuard
    from dlmtrain.callbacks.throughput import Throughput
    from dlmtrain.data import DataMetrics, build_datamodule
    from dlmtrain.modules import build_module

    t = cfg.trainer
    out = run_dir(cfg)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = resume_path(cfg, ckpt_dir)  # fail fast on a bad path, before data and model are built
    world = world_size(cfg)
    micro, accum = batch_split(t.global_batch_size, t.micro_batch_size, world)
    L.seed_everything(t.seed, workers=True, verbose=False)
    # The float32 logits head runs ~1.5x faster on TF32 tensor cores (measured on H100).
    torch.set_float32_matmul_precision("high")

    dm = build_datamodule(cfg, micro)
    fill_from_data(cfg, dm)
    module = build_module(cfg)
    write_atomic(out / "config.yaml", to_yaml(cfg))

    n_all, n_body = count_params(module.backbone), count_params(module.backbone, non_embedding=True)
    print(
        f"[dlmtrain] {cfg.objective.name} / model={cfg.model.name}: {n_all / 1e6:.2f}M parameters "
        f"({n_body / 1e6:.2f}M non-embedding); vocab {cfg.model.vocab_size}, seq_len {dm.seq_len}; "
        f"global batch {t.global_batch_size} = {micro} x {world} device(s) x {accum} accumulation; run dir {out}",
        flush=True,
    )

    loggers = [CSVLogger(save_dir=str(out), name="logs")]
    if cfg.logger.wandb.enabled:
        loggers.append(wandb_logger(cfg, out))

    stop = GracefulStop(ckpt_dir / "last.ckpt")
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True, every_n_train_steps=t.ckpt_every_n_steps),
        Throughput(),
        NonFiniteLossGuard(ckpt_dir),
        stop,
        LearningRateMonitor(logging_interval="step"),
        DataMetrics(),
        *(extra_callbacks or []),
    ]
    if t.save_top_k > 0:
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir, filename="best-step{step}", monitor="val/nelbo", mode="min",
                save_top_k=t.save_top_k, auto_insert_metric_name=False,
            )
        )
    if t.compile:
        module.backbone.compile()  # in place: parameter names (checkpoints, EMA) stay unprefixed

    trainer = L.Trainer(
        default_root_dir=str(out),
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision(cfg),
        accumulate_grad_batches=accum,
        gradient_clip_val=cfg.optim.grad_clip or None,
        val_check_interval=t.val_every_n_steps * accum,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches or 1.0,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the DataModule splits shards by rank itself
    )
    for lg in loggers:
        lg.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True)})

    result: dict = {"run_dir": str(out)}
    if ckpt is None and t.val_before_training:
        before = trainer.validate(module, datamodule=dm, verbose=False)
        result["val_nelbo_before"] = before[0]["val/nelbo"] if before else None
        if trainer.is_global_zero and before:
            print(f"[dlmtrain] before training: val/nelbo {before[0]['val/nelbo']:.4f} nats/token", flush=True)
    elif ckpt is not None:
        print(f"[dlmtrain] resuming from {ckpt}", flush=True)

    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)

    stopped_early = stop.requested
    if not stopped_early and trainer.global_step > 0:
        last_val_step = getattr(module, "_last_val_step", -1)
        if last_val_step != trainer.global_step:
            trainer.validate(module, datamodule=dm, verbose=False)
        trainer.save_checkpoint(ckpt_dir / "last.ckpt")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    result.update(metrics, step=trainer.global_step, stopped_early=stopped_early)
    if trainer.is_global_zero:
        if stopped_early:
            print(f"[dlmtrain] stopped at step {trainer.global_step}; run the same command to resume", flush=True)
        elif "val/nelbo" in metrics:
            print(
                f"[dlmtrain] step {trainer.global_step}: val/nelbo {metrics['val/nelbo']:.4f} nats/token, "
                f"ppl <= {metrics['val/ppl_bound']:.2f}, {metrics['val/bpt']:.4f} bits/token; checkpoints in {ckpt_dir}",
                flush=True,
            )
    return result
