"""`dlmtrain bench train CONFIG [overrides]`: steady-state throughput of the real training step.

Runs ``dlmtrain train`` on the config (data loading, the objective's loss, the strategy,
precision, activation checkpointing, compile: everything the config sets) for
``--warmup + --steps`` optimizer steps into a scratch run directory (no validation until
the end, one batch then; no checkpoints but the final last.ckpt; no samples), and times the
``--steps`` optimizer steps after the warm-up, e.g.::

    dlmtrain bench train configs/demo.yaml trainer.devices=2 strategy=fsdp --steps 10
    dlmtrain bench train configs/demo.yaml model=small data.seq_len=1024 trainer=gpu strategy=deepspeed_zero2 --json

Reported (JSON with ``--json`` / ``--out``, else a table):

- ``step_time_s``: median wall time of one optimizer step (all micro-batches of the
  global batch, every rank); ``step_time_s_mean`` beside it;
- ``tokens_per_s``: global batch tokens / mean step time (all ranks together);
- ``peak_memory_bytes``: CUDA ``max_memory_allocated`` after the warm-up, the largest over
  ranks; on CPU ``peak_rss_bytes`` (the process's peak resident set, largest over ranks;
  includes the Python runtime and is not comparable to GPU memory);
- ``mfu``: model FLOPs utilisation = ``flops_per_token * tokens_per_s / (world * peak)``,
  ``flops_per_token`` from :func:`dlmtrain.backbone.flops_per_token` (6 N_matmul +
  12 n_layers hidden seq_len, PaLM appendix B; the FLOPs of the model, so activation
  recomputation does not count), ``peak`` the dense bf16 datasheet TFLOP/s of the device
  (:data:`dlmtrain.bench.model.PEAK_BF16_TFLOPS`) or ``--peak-tflops``. Only under a bf16
  precision on a known GPU (or with ``--peak-tflops``); on CPU it is reported as null (n/a).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import torch

from dlmtrain.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a run config, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. strategy=fsdp trainer.devices=2")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (default: %(default)s)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="per-device peak TFLOP/s for MFU (default: the bf16 datasheet figure of a known GPU)")
    parser.add_argument("--run-dir", default=None, help="where the scratch run goes (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--out", metavar="FILE.json", help="also write the figures as JSON")


def step_timer(warmup: int):
    """A Lightning callback timing optimizer steps (Lightning is imported only when benchmarking)."""
    import lightning as L

    class StepTimer(L.Callback):
        """Wall time between optimizer-step boundaries after ``warmup`` steps (device synchronised)."""

        def __init__(self, warmup: int):
            self.warmup = warmup
            self.times: list[float] = []
            self._last: float | None = None
            self.peak_memory: int | None = None
            self.peak_rss: int | None = None
            self.seq_len: int | None = None

        def _sync(self, pl_module):
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seq_len = int(batch["input_ids"].shape[1])
            if (batch_idx + 1) % trainer.accumulate_grad_batches:
                return  # inside an accumulated step
            self._sync(pl_module)
            now = time.perf_counter()
            step = trainer.global_step  # optimizer steps completed
            if step == self.warmup and pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            if step > self.warmup and self._last is not None:
                self.times.append(now - self._last)
            self._last = now

        def on_train_end(self, trainer, pl_module):
            dev = pl_module.device
            mem = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            both = trainer.strategy.reduce(torch.tensor([float(mem), float(rss)], device=dev), reduce_op="max") \
                if trainer.world_size > 1 else torch.tensor([float(mem), float(rss)])
            self.peak_memory, self.peak_rss = int(both[0]), int(both[1])

    return StepTimer(warmup)


def _peak_tflops(device_name: str, precision: str, given: float | None) -> float | None:
    from dlmtrain.bench.model import PEAK_BF16_TFLOPS

    if given is not None:
        return given
    if "bf16" not in precision:
        return None
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def run(args: argparse.Namespace) -> int:
    from dlmtrain import load_config
    from dlmtrain.backbone import flops_per_token
    from dlmtrain.config import batch_split
    from dlmtrain.train import _is_launch_rank_zero, precision, train, world_size

    if args.steps < 2 or args.warmup < 1:
        raise ConfigError("bench train: --steps must be >= 2 and --warmup >= 1 (the first steps include startup)")
    # Lightning relaunches this command for the other ranks with this environment: one scratch dir for all
    run_dir = args.run_dir or os.environ.get("DLMTRAIN_BENCH_RUN_DIR") or tempfile.mkdtemp(prefix="dlmtrain-bench-")
    os.environ["DLMTRAIN_BENCH_RUN_DIR"] = run_dir
    total = args.warmup + args.steps
    cfg = load_config(args.config, [*args.overrides, f"run.dir={run_dir}", "run.resume=never",
                                    f"trainer.max_steps={total}", f"trainer.val_every_n_steps={total + 1}",
                                    f"trainer.ckpt_every_n_steps={total + 1}", "trainer.val_before_training=false",
                                    "trainer.limit_val_batches=1", "eval.sample_every_n_steps=0",
                                    "trainer.progress_bar=false", f"trainer.print_every_n_steps={total + 1}",
                                    "logger.wandb.enabled=false"])
    timer = step_timer(args.warmup)
    train(cfg, extra_callbacks=[timer], command="bench train")
    if not _is_launch_rank_zero():  # a rank Lightning relaunched: the first process reports
        return 0
    if len(timer.times) < args.steps:
        raise ConfigError(f"bench train: timed {len(timer.times)} of {args.steps} steps (the run stopped early)")
    t = cfg.trainer
    world = world_size(cfg)
    micro, accum = batch_split(t.global_batch_size, t.micro_batch_size, world)
    seq_len = timer.seq_len  # a prepared manifest sets its own
    tokens = t.global_batch_size * seq_len
    mean = statistics.fmean(timer.times)
    tokens_s = tokens / mean
    on_gpu = torch.cuda.is_available() and t.accelerator in ("auto", "gpu", "cuda")
    device = torch.cuda.get_device_name(0) if on_gpu else f"cpu ({torch.get_num_threads()} threads per process)"
    prec = precision(cfg)
    fpt = flops_per_token(cfg.model, seq_len, int(cfg.model.vocab_size))
    peak = _peak_tflops(device, prec, args.peak_tflops)
    s = cfg.strategy
    strategy = s.name if s.name != "deepspeed" else f"deepspeed_zero{s.stage}"
    result = {
        "config": args.config, "overrides": list(args.overrides), "device": device, "world_size": world,
        "strategy": strategy if s.name != "auto" else t.strategy, "precision": prec,
        "model": cfg.model.name, "objective": cfg.objective.name, "seq_len": seq_len,
        "global_batch_size": int(t.global_batch_size), "micro_batch_size": micro, "accumulation": accum,
        "activation_checkpointing": bool(t.activation_checkpointing), "compile": bool(t.compile),
        "timed_steps": len(timer.times), "step_time_s": statistics.median(timer.times), "step_time_s_mean": mean,
        "tokens_per_s": tokens_s, "flops_per_token": fpt, "tflops_per_s": fpt * tokens_s / 1e12,
        "peak_tflops_per_device": peak, "mfu": (fpt * tokens_s / (world * peak * 1e12)) if peak else None,
        "peak_memory_bytes": timer.peak_memory if on_gpu else None,
        "peak_rss_bytes": timer.peak_rss,
    }
    if not args.run_dir:  # the scratch run is ours
        shutil.rmtree(run_dir, ignore_errors=True)
    if args.out:
        from dlmtrain.data.format import write_json_atomic

        write_json_atomic(args.out, result)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            if isinstance(v, float):
                v = f"{v:.4g}"
            elif v is None:
                v = "n/a"
            print(f"{k:<26} {v}")
    sys.stdout.flush()
    return 0
