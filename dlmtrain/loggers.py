"""Loggers of a run (CSV always, W&B when enabled) and silencing of messages no user can act on."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import warnings
from pathlib import Path

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers import CSVLogger

from dlmtrain.errors import ConfigError

# Lightning's info lines that say nothing actionable (the device summary is printed by dlmtrain).
_NOISE = ("GPU available", "TPU available", "HPU available", "💡 Tip", "`Trainer(limit_val_batches",
          "`weights_only` was not set", "You are using a CUDA device", "`Trainer.fit` stopped",
          "initializing deepspeed distributed")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_NOISE)


def quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.trainer.connectors.checkpoint_connector", "lightning.pytorch.strategies.deepspeed"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*tensorboardX.*")
    warnings.filterwarnings("ignore", message=r".*exists and is not empty.*")
    # the ELBO callback logs values it already reduced over ranks (dlmtrain/callbacks/elbo.py)
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/")
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")  # DeepSpeed's calls


class _ContinuingWriter(_ExperimentWriter):
    """Appends to an existing metrics.csv (one file for the whole run), keeping its columns."""

    def __init__(self, log_dir: str, resume_step: int | None):
        self.metrics, self.metrics_keys = [], []
        self._fs = None
        from lightning.fabric.utilities.cloud_io import get_filesystem

        self._fs = get_filesystem(log_dir)
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        os.makedirs(log_dir, exist_ok=True)
        path = Path(self.metrics_file_path)
        if path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.metrics_keys = list(reader.fieldnames or [])
                rows = list(reader)
            # rows logged after the checkpoint we resume from belong to an abandoned trajectory
            keep = [r for r in rows if resume_step is not None and r.get("step", "").isdigit() and int(r["step"]) < resume_step]
            if len(keep) != len(rows) or resume_step is None:
                tmp = path.with_name(path.name + ".tmp")
                with open(tmp, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=self.metrics_keys)
                    w.writeheader()
                    w.writerows(keep)
                os.replace(tmp, path)

    def log_hparams(self, params) -> None:  # the resolved config is RUN/config.yaml already
        pass


class RunCSVLogger(CSVLogger):
    """``RUN/logs/metrics.csv``: one file across resumes (rows past the resumed step are dropped)."""

    def __init__(self, save_dir: str | Path, resume_step: int | None):
        super().__init__(save_dir=str(save_dir), name="logs", version="")
        self._resume_step = resume_step

    @property
    def experiment(self):
        if self._experiment is None:
            self._experiment = _ContinuingWriter(self.log_dir, self._resume_step)
        return self._experiment


def wandb_logger(cfg, out: Path):
    w = cfg.logger.wandb
    try:
        import wandb
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:
        raise ConfigError("logger.wandb.enabled=true needs wandb: pip install wandb") from None
    mode = os.environ.get("WANDB_MODE") or w.mode
    if mode == "auto":
        has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _netrc()
        mode = "online" if has_key else "offline"
        if not has_key:
            print(f"[dlmtrain] no W&B API key configured: logging offline to {out / 'wandb'} (wandb sync to upload)")
    run_id = "dlm-" + hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]  # requeues continue the run
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        run_id = os.environ["WANDB_RUN_ID"]  # a W&B sweep agent's run: the agent waits for this id
    # silent: wandb's own banner, a deprecation warning about a setting Lightning passes, and
    # colour codes written to log files at exit; dlmtrain prints the one line that matters
    logger = _guarded(WandbLogger)(
        project=w.project, entity=w.entity or None, name=cfg.run.name, save_dir=str(out), id=run_id,
        resume="allow", mode=mode, tags=list(w.tags), settings=wandb.Settings(silent=True),
    )
    logger._wandb_init.pop("anonymous", None)  # Lightning passes None; wandb warns that it is deprecated
    if mode == "online":
        url = getattr(logger.experiment, "url", None)
        if url:
            print(f"[dlmtrain] W&B run: {url}")
    return logger


def _guarded(base):
    """``base`` (WandbLogger) whose logging calls never stop training: when W&B fails (its service
    process killed with the job step by a preemption's TERM, a network error) the first failure is
    reported in one line and W&B logging stops; RUN/logs/metrics.csv keeps every metric."""

    class GuardedWandbLogger(base):
        _broken = False

        def _call(self, name, *args, **kwargs):
            if self._broken:
                return None
            try:
                return getattr(super(), name)(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a logger must not end a run
                self._broken = True
                print(f"[dlmtrain] WARNING: W&B logging failed ({type(e).__name__}: {e}); continuing without W&B "
                      "(metrics.csv has everything; a resumed run continues the same W&B run)", flush=True)
                return None

        def log_metrics(self, *a, **k):
            return self._call("log_metrics", *a, **k)

        def log_hyperparams(self, *a, **k):
            return self._call("log_hyperparams", *a, **k)

        def log_text(self, *a, **k):
            return self._call("log_text", *a, **k)

        def log_table(self, *a, **k):
            return self._call("log_table", *a, **k)

        def after_save_checkpoint(self, *a, **k):
            return self._call("after_save_checkpoint", *a, **k)

        def finalize(self, *a, **k):
            return self._call("finalize", *a, **k)

    return GuardedWandbLogger


def _netrc() -> str:
    p = Path.home() / ".netrc"
    return p.read_text() if p.exists() else ""
