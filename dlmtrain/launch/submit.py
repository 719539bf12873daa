"""`dlmtrain submit [job options] [--dry-run | --local] CONFIG [overrides...]`.

    dlmtrain submit --nodes 4 --gpus-per-node 8 --time 24:00:00 -p gpu configs/demo.yaml model=small trainer=gpu
    dlmtrain submit --dry-run --nodes 2 --gpus-per-node 8 configs/demo.yaml trainer=gpu   # print, write nothing
    dlmtrain submit --local --gpus-per-node 2 configs/demo.yaml trainer=gpu               # this machine

The config is composed and validated here, with trainer.num_nodes and trainer.devices set from
--nodes and --gpus-per-node (the world size must divide the global batch), and frozen into
RUN/slurm/config.yaml: the job (and every requeue of it) trains exactly what was submitted, whatever
happens to configs/ meanwhile. The batch script goes to RUN/slurm/job.sbatch, its log to
RUN/slurm/<job name>-<job id>.out. Nothing is written when a check fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

from dlmtrain.errors import ConfigError
from dlmtrain.launch.slurm import (
    Job, add_job_arguments, find_sbatch, job_from_args, python_command, render, sbatch, time_seconds,
)


def add_arguments(p) -> None:
    p.add_argument("config", help="YAML config file (path, or relative to configs/)")
    p.add_argument("overrides", nargs="*", help="group=name or dotted.key=value")
    add_job_arguments(p)
    m = p.add_mutually_exclusive_group()
    m.add_argument("--dry-run", action="store_true", help="print the batch script and the resolved config; "
                   "submit and write nothing")
    m.add_argument("--local", action="store_true", help="train on this machine with the same arguments (one node; "
                   "--time is honoured: last.ckpt is saved --signal-s seconds before it)")


def _gpus_default(cfg) -> int:
    d = cfg.trainer.devices
    return int(d) if isinstance(d, int) or (isinstance(d, str) and d.isdigit()) else 1


def job_config(config: str, overrides: list[str], args):
    """(Job, resolved config with num_nodes/devices of the job and an absolute run.dir), validated."""
    from dlmtrain.config import batch_split, load_config, validate
    from dlmtrain.distributed import check as check_strategy
    from dlmtrain.train import run_dir

    cfg = load_config(config, overrides)
    job = job_from_args(args, _gpus_default(cfg))
    cfg.trainer.num_nodes, cfg.trainer.devices = job.nodes, job.gpus_per_node
    validate(cfg)
    try:
        batch_split(cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size, job.world)
    except ConfigError as e:
        raise ConfigError(f"--nodes {job.nodes} x --gpus-per-node {job.gpus_per_node}: {e}") from None
    gpu = cfg.trainer.accelerator != "cpu"
    prec = cfg.trainer.precision if cfg.trainer.precision != "auto" else ("bf16-mixed" if gpu else "32-true")
    check_strategy(cfg, job.world, prec)
    cfg.run.dir = str(run_dir(cfg).resolve())
    job.job_name = job.job_name or cfg.run.name
    return job, cfg, gpu


def run_submit(args) -> int:
    from dlmtrain.config import to_yaml
    from dlmtrain.train import write_atomic

    job, cfg, gpu = job_config(args.config, args.overrides, args)
    if args.local:
        return _run_local(job, cfg, args)
    out = Path(cfg.run.dir) / "slurm"
    script, frozen = out / "job.sbatch", out / "config.yaml"
    text = render(job, title=f"dlmtrain train: run {cfg.run.name} ({cfg.objective.name}, model {cfg.model.name})",
                  command="srun --kill-on-bad-exit=1 " + python_command("train", str(frozen)),
                  workdir=Path.cwd(), log=str(out / "%x-%j.out"), script=script, gpu=gpu)
    if args.dry_run:
        print(text, end="")
        print(f"\n# ---- resolved config: {frozen} on submission ----")
        print(to_yaml(cfg), end="")
        return 0
    find_sbatch()  # before writing anything
    fresh = next((d for d in reversed([out, *out.parents]) if not d.exists()), None)  # the top dir we create
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(frozen, to_yaml(cfg))
    write_atomic(script, text)
    try:
        job_id = sbatch(script, Path.cwd())
    except ConfigError:
        if fresh is not None:  # a refused submission leaves nothing behind
            shutil.rmtree(fresh, ignore_errors=True)
        raise
    unit = "GPU(s)" if gpu else "CPU process(es)"
    print(f"[dlmtrain] submitted job {job_id}: {job.nodes} node(s) x {job.gpus_per_node} {unit} for run "
          f"{cfg.run.name}; log {out / f'{job.job_name}-{job_id}.out'}", flush=True)
    return 0


def _run_local(job: Job, cfg, args) -> int:
    """`dlmtrain train` on this machine with the job's devices; --time ends it like Slurm's signal would."""
    import shlex

    from dlmtrain.train import train

    if job.nodes != 1:
        raise ConfigError(f"--local runs on this machine: --nodes {job.nodes} needs Slurm (drop --local)")
    if job.time is not None:
        delay = time_seconds(job.time) - job.signal_s
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.daemon = True
        timer.start()
    command = shlex.join(["dlmtrain", "submit", "--local", args.config, *args.overrides])
    result = train(cfg, command=command)
    return int(result.get("exit_code", 0))
