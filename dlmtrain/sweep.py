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


def load_sweep(path: str | Path) -> Sweep:
    """Read, expand and validate a sweep file (every run's config is composed here)."""
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
    base = [str(o) for o in spec.get("overrides") or []]
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
    runs, names = [], {}
    for combo, draw, seed in itertools.product(combos, draws, seeds or [None]):
        varied = {k: _fmt(v) for k, v in {**combo, **draw}.items()}
        if seed is not None:
            varied["trainer.seed"] = str(seed)
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
    return Sweep(path, name, str(spec["config"]), out, runs)


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


def execute(sweep: Sweep, indices: list[int] | None = None, rerun: bool = False, say=print) -> int:
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
    p.add_argument("file", help="sweep file (YAML; see dlmtrain/sweep.py or the README)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dry-run", action="store_true", help="list every run with its overrides; run nothing")
    g.add_argument("--summary", action="store_true", help="collect each run's final metrics into one table "
                   "(printed as Markdown; summary.md and summary.csv in the sweep directory)")
    p.add_argument("--index", type=int, action="append", help="run only run I (repeatable; e.g. "
                   "$SLURM_ARRAY_TASK_ID in a job array)")
    p.add_argument("--rerun", action="store_true", help="also run runs that finished before")
    p.add_argument("--metrics", help="comma-separated metrics for --summary (default: the val/ and samples/ figures present)")


def run_command(args) -> int:
    sweep = load_sweep(args.file)
    for i in args.index or []:
        if not 0 <= i < len(sweep.runs):
            raise ConfigError(f"--index {i}: the sweep {args.file} has runs 0..{len(sweep.runs) - 1}")
    if args.dry_run:
        print(f"sweep {sweep.name}: {len(sweep.runs)} runs of {sweep.config} in {sweep.dir}")
        for r in sweep.runs:
            print(f"  [{r.index}] {r.name}: dlmtrain train {sweep.config} {' '.join(r.overrides)}")
        return 0
    if args.summary:
        from dlmtrain.train import write_atomic

        md, table = summary(sweep, args.metrics.split(",") if args.metrics else None)
        print(md, end="")
        if sweep.dir.is_dir():
            write_atomic(sweep.dir / "summary.md", md)
            write_atomic(sweep.dir / "summary.csv", table)
        return 0
    return execute(sweep, args.index, args.rerun)
