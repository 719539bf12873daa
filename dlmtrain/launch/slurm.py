"""SLURM batch scripts from one template (templates/slurm.sbatch) and their submission.

The script runs one task per GPU (or CPU process) under ``srun``; the job's resources are the
``#SBATCH`` lines written here. What the template does on USR1 / TERM (save, requeue, resume)
is explained in the template itself.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dlmtrain.errors import ConfigError

TEMPLATE = Path(__file__).resolve().parent / "templates" / "slurm.sbatch"
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_seconds(text: str) -> int:
    """Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = _TIME.match(text.strip())
    if not m:
        raise ConfigError(f"--time {text}: use HH:MM:SS, MM, or D-HH:MM:SS (Slurm's formats)")
    d, a, b, c = m.groups()
    if d is not None:  # D-H[:M[:S]]
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return ((int(d) * 24 + h) * 60 + mi) * 60 + s
    if c is not None:
        return (int(a) * 60 + int(b)) * 60 + int(c)
    if b is not None:
        return int(a) * 60 + int(b)
    return int(a) * 60


@dataclass
class Job:
    """What a job asks Slurm for (the #SBATCH lines) and its environment."""

    nodes: int = 1
    gpus_per_node: int = 1  # tasks per node; GPUs per node too unless the config runs on CPU
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    constraint: str | None = None
    qos: str | None = None
    mem: str | None = None
    signal_s: int = 120
    job_name: str | None = None
    sbatch: list[str] = field(default_factory=list)  # extra #SBATCH options, as written
    env: list[str] = field(default_factory=list)  # KEY=VALUE exported in the script

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def add_job_arguments(p, gpus_default_help: str = "trainer.devices of the config, else 1") -> None:
    g = p.add_argument_group("Slurm job")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default: %(default)s)")
    g.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                   help=f"GPUs per node, one task each (default: {gpus_default_help}); with a CPU config "
                   "(trainer=cpu) the number of CPU processes per node")
    g.add_argument("--cpus-per-task", type=int, default=None, metavar="C", help="CPU cores per task (data workers)")
    g.add_argument("--time", default=None, metavar="HH:MM:SS", help="time limit (default: the partition's)")
    g.add_argument("--partition", "-p", default=None)
    g.add_argument("--account", "-A", default=None)
    g.add_argument("--constraint", "-C", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--mem", default=None, help="memory per node, e.g. 200G (default: the partition's)")
    g.add_argument("--signal-s", type=int, default=120, metavar="S",
                   help="seconds before the time limit at which the job saves last.ckpt and requeues (default: %(default)s)")
    g.add_argument("--job-name", default=None, help="default: the run's name")
    g.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH option as written, e.g. --sbatch=--exclusive (repeatable)")
    g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the job, e.g. --env NCCL_IB_HCA=mlx5 (repeatable)")


def job_from_args(args, gpus_default: int) -> Job:
    job = Job(nodes=args.nodes, gpus_per_node=args.gpus_per_node or gpus_default, cpus_per_task=args.cpus_per_task,
              time=args.time, partition=args.partition, account=args.account, constraint=args.constraint,
              qos=args.qos, mem=args.mem, signal_s=args.signal_s, job_name=args.job_name, sbatch=list(args.sbatch),
              env=list(args.env))
    if job.nodes < 1 or job.gpus_per_node < 1:
        raise ConfigError(f"--nodes {job.nodes} --gpus-per-node {job.gpus_per_node}: both must be at least 1")
    if job.cpus_per_task is not None and job.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task {job.cpus_per_task}: must be at least 1")
    if job.signal_s < 10:
        raise ConfigError(f"--signal-s {job.signal_s}: leave at least 10 s to save last.ckpt (120 is safe for "
                          "large models)")
    if job.time is not None and time_seconds(job.time) <= job.signal_s:
        raise ConfigError(f"--time {job.time} is not longer than --signal-s {job.signal_s}: the job would be told "
                          "to stop before it starts; give more time or a smaller --signal-s")
    for kv in job.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", kv):
            raise ConfigError(f"--env {kv}: use KEY=VALUE")
    for opt in job.sbatch:
        if not opt.startswith("-") or "\n" in opt:
            raise ConfigError(f"--sbatch {opt}: give one sbatch option as written, e.g. --sbatch=--exclusive")
    for name in ("partition", "account", "constraint", "qos", "mem", "job_name"):
        v = getattr(job, name)
        if v is not None and (not v or re.search(r"\s", v)):
            raise ConfigError(f"--{name.replace('_', '-')} {v!r}: must be one word")
    return job


def render(job: Job, *, title: str, command: str, workdir: Path, log: str, script: Path, gpu: bool,
           array: str | None = None) -> str:
    """The batch script: the template with this job's resources and command filled in."""
    lines = []
    if gpu:
        lines.append(f"--gpus-per-node={job.gpus_per_node}")
    for opt, v in (("cpus-per-task", job.cpus_per_task), ("time", job.time), ("partition", job.partition),
                   ("account", job.account), ("constraint", job.constraint), ("qos", job.qos), ("mem", job.mem),
                   ("array", array)):
        if v is not None:
            lines.append(f"--{opt}={v}")
    lines += job.sbatch
    env = "".join(f"export {kv.split('=', 1)[0]}={shlex.quote(kv.split('=', 1)[1])}\n" for kv in job.env)
    fill = {
        "title": title, "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "script": shlex.quote(str(script)),
        "job_name": job.job_name or "dlmtrain", "nodes": str(job.nodes), "tasks_per_node": str(job.gpus_per_node),
        "resources": "".join(f"#SBATCH {line}\n" for line in lines), "signal_s": str(job.signal_s), "log": log,
        "workdir": shlex.quote(str(workdir)), "env": env, "command": command,
    }
    text = TEMPLATE.read_text()
    for k, v in fill.items():
        text = text.replace("{{" + k + "}}", v)
    return text


def cluster_plugins() -> list:
    """Inside a Slurm job step: Lightning's SLURM environment (ranks, rendezvous) without its own
    requeue handler; saving, stopping and requeueing are dlmtrain's (callbacks/stop.py, the template)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def python_command(*args: str) -> str:
    """`python -m dlmtrain.cli ARGS` with this interpreter (the job runs the same installation)."""
    return shlex.join([sys.executable, "-m", "dlmtrain.cli", *args])


def find_sbatch() -> str:
    exe = shutil.which("sbatch")
    if exe is None:
        raise ConfigError("sbatch not found: submit from a Slurm login node (or use --dry-run to see the script, "
                          "--local to run on this machine)")
    return exe


def sbatch(script: Path, workdir: Path) -> str:
    """Submit ``script``; returns the job id. A refusal by sbatch is the user's to fix (exit 2)."""
    r = subprocess.run([find_sbatch(), "--parsable", str(script)], capture_output=True, text=True, cwd=workdir)
    if r.returncode != 0:
        msg = " ".join(r.stderr.split()) or f"exit {r.returncode}"
        raise ConfigError(f"sbatch refused {script}: {msg}")
    return r.stdout.strip().split(";")[0]
