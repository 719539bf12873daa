"""`dlmtrain sweep FILE`: a grid and/or random search over config overrides.

A sweep file (YAML)::

    name: lr-sweep                      # runs go to runs/lr-sweep/<run> (or dir: ...)
    config: configs/demo.yaml           # the base config of every run
    overrides: [trainer.max_steps=300]  # applied to every run
    grid:                               # every combination
      optim.lr: [1e-3, 3e-4, 1e-4]
    random:                             # `count` draws, reproducible from `seed`
      count: 4
      seed: 0
      params:
        optim.warmup_steps: [100, 200]        # a choice
        optim.weight_decay: {uniform: [0.0, 0.1]}
        optim.lr: {loguniform: [1e-4, 1e-2]}  # also {int: [lo, hi]}, both ends included
    seeds: [0, 1]                       # trainer.seed of each combination
    run_name: "lr{optim.lr}-s{trainer.seed}"  # default: the varied keys' last parts and values

Runs are grid x random draws x seeds. Every run's config is composed and validated before
the first one starts, and run names must be unique, so a typo costs nothing. Runs execute
one after another, each as its own `dlmtrain train` process (a fresh process per run: no
state leaks between runs); a run that finished is skipped when the sweep is started again,
an interrupted one resumes from its last.ckpt. `--index I` runs only run I (for a job
array or any scheduler), `--dry-run` lists the runs, `--summary` collects each run's final
metrics into one table (Markdown and CSV in the sweep directory).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import itertools
import json
import math
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dlmtrain.errors import ConfigError

KEYS = ("name", "config", "dir", "overrides", "grid", "random", "seeds", "run_name")
RANDOM_KEYS = ("count", "seed", "params")
DEFAULT_METRICS = ("val/nelbo", "val/nelbo_se", "val/bpb", "val/bpb_se", "samples/entropy", "samples/gen_ppl",
                   "train/loss")
STATUS_FILE = "sweep-status.json"  # in each run's directory, written by the sweep after the run's process ends


@dataclass
class Run:
    index: int
    name: str
    dir: Path
    varied: dict[str, str]  # the keys this sweep sets for this run (grid, random, seed) -> value as written
    overrides: list[str] = field(default_factory=list)  # everything passed to `dlmtrain train` after CONFIG

    def varied_overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.varied.items()]


@dataclass
class Sweep:
    path: Path
    name: str
    config: str
    dir: Path
    runs: list[Run]
    spec: dict = field(default_factory=dict)  # the file as read
    extra: list[str] = field(default_factory=list)  # the command line's overrides for every run


def _fmt(v) -> str:
    """A value as an override writes it (floats short and exact enough: 3e-4, not 0.00030000000000000003)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _draw(spec, rng, where: str):
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: an empty list of choices; give at least one value")
        return spec[int(rng.integers(len(spec)))]
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, bounds), = spec.items()
        if kind in ("uniform", "loguniform", "int") and isinstance(bounds, list) and len(bounds) == 2:
            try:  # YAML reads 1e-4 (no dot) as a string
                lo, hi = float(bounds[0]), float(bounds[1])
            except (TypeError, ValueError):
                lo = hi = math.nan
            if not lo <= hi:
                raise ConfigError(f"{where}: {kind} needs [low, high] numbers with low <= high, got {bounds}")
            if kind == "uniform":
                return float(rng.uniform(lo, hi))
            if kind == "int":
                return int(rng.integers(int(lo), int(hi) + 1))
            if lo <= 0:
                raise ConfigError(f"{where}: loguniform needs positive bounds, got {bounds}")
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    raise ConfigError(f"{where}: give a list of choices or one of {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, "
                      f"{{int: [lo, hi]}}; got {spec!r}")


def _check_keys(node: dict, allowed: tuple, where: str) -> None:
    for k in node:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; keys are {', '.join(allowed)}"
            raise ConfigError(f"{where}: unknown key '{k}'{hint}")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "run"


def _run_name(template: str | None, varied: dict[str, str], cfg, where: str) -> str:
    if not template:
        return _safe("-".join(f"{k.split('.')[-1]}{v}" for k, v in varied.items()))

    from omegaconf import OmegaConf

    def sub(m):
        key = m.group(1)
        if key in varied:
            return varied[key]
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            raise ConfigError(f"{where}: run_name uses {{{key}}}, which is neither a swept key nor a config key")
        return _fmt(value)

    return _safe(re.sub(r"\{([^{}]+)\}", sub, template))


def load_sweep(path: str | Path, extra: list[str] | None = None, agent: list[str] | None = None) -> Sweep:
    """Read, expand and validate a sweep file (every run's config is composed here). ``extra``:
    overrides for every run after the file's; ``agent``: the one run a W&B agent asks for
    (``key=value`` for each swept key) instead of the expansion."""
    import numpy as np
    import yaml

    from dlmtrain.config import load_config

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} not found")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with keys {', '.join(KEYS)}")
    _check_keys(spec, KEYS, str(path))
    if not spec.get("config"):
        raise ConfigError(f"{path}: 'config' (the base config, e.g. configs/demo.yaml) is required")
    name = _safe(str(spec.get("name") or path.stem))
    base = [str(o) for o in spec.get("overrides") or []] + list(extra or [])
    for o in base:
        if o.split("=", 1)[0] in ("run.dir", "run.name"):
            raise ConfigError(f"{path}: overrides set {o.split('=', 1)[0]}, which the sweep sets per run; use 'dir'")

    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: grid must map config keys to lists of values")
    for k, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid key '{k}' has no values; give a non-empty list, e.g. {k}: [1, 2]")
    combos = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] if grid else [{}]

    rnd = spec.get("random")
    draws = [{}]
    if rnd:
        if not isinstance(rnd, dict):
            raise ConfigError(f"{path}: random must be a mapping with count, seed and params")
        _check_keys(rnd, RANDOM_KEYS, f"{path}: random")
        count, params = rnd.get("count"), rnd.get("params") or {}
        if not isinstance(count, int) or count < 1 or not params:
            raise ConfigError(f"{path}: random needs count >= 1 and a non-empty params mapping")
        rng = np.random.default_rng(int(rnd.get("seed", 0)))
        draws = [{k: _draw(s, rng, f"{path}: random.params.{k}") for k, s in params.items()} for _ in range(count)]

    seeds = spec.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds)):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers")
    if not grid and not rnd and not seeds:
        raise ConfigError(f"{path}: nothing to sweep; give a grid, random draws or seeds")

    out = Path(spec["dir"]) if spec.get("dir") else Path("runs") / name
    if agent is not None:  # a W&B agent's run: its swept values; the rest of the command line applies to it
        swept = [*grid, *(rnd or {}).get("params", {}), *(["trainer.seed"] if seeds else [])]
        base += [a for a in agent if a.partition("=")[0] not in swept] + ["logger.wandb.enabled=true"]
        combos_out = [_agent_values([a for a in agent if a.partition("=")[0] in swept], swept, path)]
    else:
        combos_out = []
        for combo, draw, seed in itertools.product(combos, draws, seeds or [None]):
            varied = {k: _fmt(v) for k, v in {**combo, **draw}.items()}
            if seed is not None:
                varied["trainer.seed"] = str(seed)
            combos_out.append(varied)
    runs, names = [], {}
    for varied in combos_out:
        i = len(runs)
        sets = [f"{k}={v}" for k, v in varied.items()]
        where = f"{path}: run {i} ({' '.join(sets)})"
        try:
            cfg = load_config(spec["config"], [*base, *sets])
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        run_name = _run_name(spec.get("run_name"), varied, cfg, str(path))
        if run_name in names:
            raise ConfigError(f"{path}: runs {names[run_name]} and {i} are both named '{run_name}'; put the keys "
                              "that tell them apart into run_name")
        names[run_name] = i
        run_dir = out / run_name
        runs.append(Run(i, run_name, run_dir, varied, [*base, *sets, f"run.name={name}-{run_name}", f"run.dir={run_dir}"]))
    return Sweep(path, name, str(spec["config"]), out, runs, spec, list(extra or []))


def _agent_values(agent: list[str], keys: list[str], path) -> dict[str, str]:
    """The swept values a W&B agent passes (``key=value``, one per swept key), as the sweep writes them."""
    import yaml

    got = {}
    for item in agent:
        k, _, v = item.partition("=")
        got[k] = _fmt(yaml.safe_load(v)) if v else v
    missing = [k for k in keys if k not in got]
    if missing:
        raise ConfigError(f"{path}: --agent: no value for {', '.join(missing)}")
    return {k: got[k] for k in keys}


def _status(run: Run) -> dict:
    try:
        return json.loads((run.dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _final_metrics(run: Run) -> dict[str, str]:
    """The last value of every column of the run's metrics.csv (one file per run, kept across resumes)."""
    path = run.dir / "logs" / "metrics.csv"
    if not path.is_file():
        return {}
    last: dict[str, str] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            last.update({k: v for k, v in row.items() if v not in (None, "")})
    return last


class _Forward:
    """Signals to the sweep go to the running `dlmtrain train` (its own session, so a terminal's Ctrl-C
    reaches it once, through us): it saves last.ckpt and stops; the sweep then stops too."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.child, self.requested, self._old = None, 0, {}

    def _handle(self, signum, frame):
        self.requested += 1
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def execute(sweep: Sweep, indices: list[int] | None = None, rerun: bool = False, say=print, srun: bool = False) -> int:
    """Run the sweep's runs (all, or `indices`) one after another. Exit code: 0 when every run finished
    (or was stopped by a signal with its state saved), 1 when some run failed (the others still ran)."""
    from dlmtrain.train import write_atomic

    sweep.dir.mkdir(parents=True, exist_ok=True)
    write_atomic(sweep.dir / "sweep.json", json.dumps({
        "name": sweep.name, "file": str(sweep.path), "config": sweep.config,
        "runs": [{"index": r.index, "name": r.name, "dir": str(r.dir), "varied": r.varied, "overrides": r.overrides}
                 for r in sweep.runs]}, indent=1))
    failed = []
    todo = [r for r in sweep.runs if indices is None or r.index in indices]
    with _Forward() as fwd:
        for run in todo:
            if fwd.requested:
                break
            if not rerun and _status(run).get("finished"):
                say(f"[sweep] {run.index + 1}/{len(sweep.runs)} {run.name}: finished before, skipped")
                continue
            say(f"[sweep] {run.index + 1}/{len(sweep.runs)} {run.name}: {' '.join(run.varied_overrides())}", flush=True)
            cmd = [sys.executable, "-m", "dlmtrain.cli", "train", sweep.config, *run.overrides]
            if srun:  # inside a Slurm job (an array task): one task per GPU of the job
                cmd = ["srun", "--kill-on-bad-exit=1", *cmd]
            fwd.child = subprocess.Popen(cmd, start_new_session=True)
            code = fwd.child.wait()
            fwd.child = None
            finished = code == 0 and not fwd.requested
            run.dir.mkdir(parents=True, exist_ok=True)
            write_atomic(run.dir / STATUS_FILE, json.dumps({"exit_code": code, "finished": finished}))
            if code != 0 and not fwd.requested:  # a stopped run (exit 0, or 4 before any step) did not fail
                failed.append(f"{run.name} (exit {code})")
                say(f"[sweep] {run.name} failed with exit code {code}; going on with the next run", flush=True)
    if fwd.requested:
        say("[sweep] stopped by a signal; run the same command to continue (finished runs are skipped, the "
            "interrupted one resumes)", flush=True)
        return 0
    if failed:
        say(f"[sweep] {len(failed)} of {len(todo)} runs failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


def _as_written(v):
    """A grid value for W&B as the sweep writes it (3e-3 stays "3e-3"), so that an agent's run gets the
    same name and directory as the same run started by `dlmtrain sweep` (and --summary finds it)."""
    return v if isinstance(v, (bool, int)) else _fmt(v)


def wandb_config(sweep: Sweep) -> dict:
    """The sweep as a W&B sweep configuration: `wandb sweep` registers it, `wandb agent` runs it, each
    agent run being `dlmtrain sweep FILE --agent key=value...` (the same run names, directories and
    validation). W&B sweeps are grid or random, so a file with both is refused; in a random sweep the
    seeds become one more random choice."""
    from dlmtrain.config import load_config

    spec, grid, rnd, seeds = sweep.spec, sweep.spec.get("grid") or {}, sweep.spec.get("random"), sweep.spec.get("seeds")
    if grid and rnd:
        raise ConfigError(f"{sweep.path}: a W&B sweep is either a grid or random draws; this file has both "
                          "(split it in two, or run it with dlmtrain sweep / --slurm)")
    params: dict = {k: {"values": [_as_written(v) for v in vs]} for k, vs in grid.items()}
    for k, p in (rnd or {}).get("params", {}).items():
        if isinstance(p, list):
            params[k] = {"values": [_as_written(v) for v in p]}
        else:
            (kind, (lo, hi)), = p.items()
            dist = {"uniform": "uniform", "loguniform": "log_uniform_values", "int": "int_uniform"}[kind]
            cast = int if kind == "int" else float
            params[k] = {"distribution": dist, "min": cast(float(lo)), "max": cast(float(hi))}
    if seeds:
        params["trainer.seed"] = {"values": list(seeds)}
    base = load_config(sweep.config, [*(spec.get("overrides") or []), *sweep.extra])
    w = base.logger.wandb
    out = {
        "name": sweep.name, "method": "random" if rnd else "grid",
        "metric": {"name": "val/nelbo", "goal": "minimize"}, "parameters": params,
        "program": "dlmtrain",  # W&B wants one; the command below is what runs
        "command": ["${env}", sys.executable, "-m", "dlmtrain.cli", "sweep", str(sweep.path.resolve()), "--agent",
                    *sweep.extra, "${args_no_hyphens}"],
        "project": w.project,
    }
    if w.entity:
        out["entity"] = w.entity
    if rnd:
        out["run_cap"] = len(sweep.runs)
    return out


def submit_array(sweep: Sweep, args) -> int:
    """One SLURM job array, one task per run (``%N`` at most N at a time); each task is
    ``dlmtrain sweep FILE --index $SLURM_ARRAY_TASK_ID --srun`` and requeues itself like a
    `dlmtrain submit` job. Every run is checked against the job's shape first."""
    import shlex

    from dlmtrain.config import batch_split, load_config
    from dlmtrain.launch.slurm import find_sbatch, job_from_args, python_command, render, sbatch
    from dlmtrain.train import write_atomic

    first = load_config(sweep.config, sweep.runs[0].overrides)
    d = first.trainer.devices
    job = job_from_args(args, int(d) if isinstance(d, int) or str(d).isdigit() else 1)
    shape = [f"trainer.num_nodes={job.nodes}", f"trainer.devices={job.gpus_per_node}"]
    sweep = load_sweep(sweep.path, [*sweep.extra, *shape])  # every run validated with the job's shape
    gpu = False
    for run in sweep.runs:
        cfg = load_config(sweep.config, run.overrides)
        gpu = gpu or cfg.trainer.accelerator != "cpu"
        try:
            batch_split(cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size, job.world)
        except ConfigError as e:
            raise ConfigError(f"run {run.index} ({run.name}): --nodes {job.nodes} x --gpus-per-node "
                              f"{job.gpus_per_node}: {e}") from None
    if args.max_parallel is not None and args.max_parallel < 1:
        raise ConfigError(f"--max-parallel {args.max_parallel}: must be at least 1")
    job.job_name = job.job_name or sweep.name
    out = sweep.dir.resolve() / "slurm"
    script = out / "array.sbatch"
    array = f"0-{len(sweep.runs) - 1}" + (f"%{args.max_parallel}" if args.max_parallel else "")
    command = (python_command("sweep", str(sweep.path.resolve()), "--srun", *sweep.extra)
               + ' --index "$SLURM_ARRAY_TASK_ID"')
    text = render(job, title=f"dlmtrain sweep {sweep.name}: {len(sweep.runs)} runs as a job array", command=command,
                  workdir=Path.cwd(), log=str(out / "%x-%A_%a.out"), script=script, gpu=gpu, array=array)
    if args.dry_run:
        print(text, end="")
        for r in sweep.runs:
            print(f"# task {r.index}: {r.name}: {shlex.join(r.varied_overrides())}")
        return 0
    find_sbatch()
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(script, text)
    job_id = sbatch(script, Path.cwd())
    print(f"[sweep] submitted job array {job_id} ({array}): {len(sweep.runs)} runs of {sweep.config}; logs "
          f"{out}/{job.job_name}-{job_id}_<task>.out; dlmtrain sweep {sweep.path} --summary when they are done",
          flush=True)
    return 0


def summary(sweep: Sweep, metrics: list[str] | None = None) -> tuple[str, str]:
    """(Markdown, CSV) tables: one row per run, its swept values, final step, status and final metrics."""
    rows = []
    for run in sweep.runs:
        last, st = _final_metrics(run), _status(run)
        status = ("finished" if st.get("finished") else f"exit {st['exit_code']}" if st.get("exit_code") else
                  "stopped" if st else "running or interrupted" if last else "not run")
        rows.append((run, last, status))
    varied_keys = list(dict.fromkeys(k for r in sweep.runs for k in r.varied))
    if metrics is None:
        present = set().union(*(last for _, last, _ in rows))
        metrics = [m for m in DEFAULT_METRICS if m in present]
    header = ["run", *varied_keys, "step", "status", *metrics]
    table = [[run.name, *(run.varied.get(k, "") for k in varied_keys), _step(run), status,
              *(_short(last.get(m, "")) for m in metrics)] for run, last, status in rows]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in table]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(table)
    return "\n".join(md) + "\n", buf.getvalue()


def _step(run: Run) -> str:
    """Optimizer steps done: last.ckpt's global_step (metrics.csv's step column is Lightning's, one less)."""
    from dlmtrain.checkpoint.files import BadCheckpoint, inspect

    try:
        return str(inspect(run.dir / "checkpoints" / "last.ckpt").step)
    except BadCheckpoint:
        return ""


def _short(v: str) -> str:
    try:
        x = float(v)
    except ValueError:
        return v
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:.4f}" if abs(x) >= 1e-3 else f"{x:.3e}"


def add_arguments(p) -> None:
    from dlmtrain.launch.slurm import add_job_arguments

    p.add_argument("file", help="sweep file (YAML; see dlmtrain/sweep.py or the README)")
    p.add_argument("overrides", nargs="*", help="key=value for every run, after the file's overrides (with --agent: "
                   "the swept values of the one run a W&B agent asks for)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dry-run", action="store_true", help="list every run with its overrides (with --slurm: print the "
                   "array job script); run nothing")
    g.add_argument("--summary", action="store_true", help="collect each run's final metrics into one table "
                   "(printed as Markdown; summary.md and summary.csv in the sweep directory)")
    g.add_argument("--wandb", action="store_true", help="write the sweep as a W&B sweep configuration "
                   "(SWEEP_DIR/wandb-sweep.yaml) for `wandb sweep` + `wandb agent`")
    g.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)  # the command a W&B agent runs
    p.add_argument("--index", type=int, action="append", help="run only run I (repeatable; e.g. "
                   "$SLURM_ARRAY_TASK_ID in a job array)")
    p.add_argument("--rerun", action="store_true", help="also run runs that finished before")
    p.add_argument("--metrics", help="comma-separated metrics for --summary (default: the val/ and samples/ figures present)")
    p.add_argument("--slurm", action="store_true", help="submit the runs as one SLURM job array (one task per run, "
                   "each requeued on preemption like dlmtrain submit); job options below")
    p.add_argument("--max-parallel", type=int, default=None, metavar="N", help="--slurm: at most N runs at a time "
                   "(the array's %%N)")
    p.add_argument("--srun", action="store_true", help="start each run's training under srun (inside a Slurm job; "
                   "the array script uses it)")
    add_job_arguments(p, gpus_default_help="trainer.devices of the runs' config, else 1")


def run_command(args) -> int:
    agent = args.overrides if args.agent else None
    sweep = load_sweep(args.file, [] if args.agent else args.overrides, agent)
    for i in args.index or []:
        if not 0 <= i < len(sweep.runs):
            raise ConfigError(f"--index {i}: the sweep {args.file} has runs 0..{len(sweep.runs) - 1}")
    if args.slurm:
        if args.summary or args.wandb or args.agent or args.index or args.srun:
            raise ConfigError("--slurm submits every run of the sweep as a job array; it takes only --dry-run, "
                              "--max-parallel and the job options")
        return submit_array(sweep, args)
    if args.max_parallel is not None:
        raise ConfigError("--max-parallel applies to --slurm job arrays")
    if args.dry_run:
        print(f"sweep {sweep.name}: {len(sweep.runs)} runs of {sweep.config} in {sweep.dir}")
        for r in sweep.runs:
            print(f"  [{r.index}] {r.name}: dlmtrain train {sweep.config} {' '.join(r.overrides)}")
        return 0
    from dlmtrain.train import write_atomic

    if args.summary:
        md, table = summary(sweep, args.metrics.split(",") if args.metrics else None)
        print(md, end="")
        if sweep.dir.is_dir():
            write_atomic(sweep.dir / "summary.md", md)
            write_atomic(sweep.dir / "summary.csv", table)
        return 0
    if args.wandb:
        import yaml

        text = yaml.safe_dump(wandb_config(sweep), sort_keys=False)
        sweep.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(sweep.dir / "wandb-sweep.yaml", text)
        print(text, end="")
        print(f"[sweep] wrote {sweep.dir / 'wandb-sweep.yaml'}; register it with `wandb sweep {sweep.dir / 'wandb-sweep.yaml'}` "
              "and start agents (on any machine with this checkout) with `wandb agent ENTITY/PROJECT/SWEEP_ID`")
        return 0
    return execute(sweep, args.index, args.rerun, srun=args.srun)
