"""Sweeps beyond one machine: as a SLURM job array (`--slurm`, one task per run, `%N`), and as a
W&B sweep (`--wandb` writes the configuration; an agent's command runs the same named run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dlmtrain.cli import main

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text, name="sweep.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


GRID = """
name: g
config: configs/demo.yaml
dir: {out}
overrides: [trainer.max_steps=7]
grid: {{optim.lr: [3e-3, 1e-3], model.n_layers: [1, 2]}}
seeds: [0, 5]
run_name: "lr{{optim.lr}}-L{{model.n_layers}}-s{{trainer.seed}}"
"""


def files(d: Path) -> list:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


def test_slurm_dry_run_prints_one_array_task_per_run_and_writes_nothing(tmp_path, capsys, monkeypatch):
    f = write(tmp_path, GRID.format(out=tmp_path / "out"))
    monkeypatch.chdir(ROOT)
    code = main(["sweep", str(f), "--slurm", "--dry-run", "--max-parallel", "3", "--gpus-per-node", "2",
                 "--time", "04:00:00", "-p", "cpu", "trainer.global_batch_size=16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    sbatch = [line for line in out.splitlines() if line.startswith("#SBATCH")]
    assert sbatch[:6] == ["#SBATCH --job-name=g", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2",
                          "#SBATCH --time=04:00:00", "#SBATCH --partition=cpu", "#SBATCH --array=0-7%3"]
    assert "#SBATCH --signal=B:USR1@120" in sbatch and "#SBATCH --requeue" in sbatch
    assert f"#SBATCH --output={tmp_path}/out/slurm/%x-%A_%a.out" in sbatch
    cmd = (f"{sys.executable} -m dlmtrain.cli sweep {f} --srun trainer.global_batch_size=16 trainer.num_nodes=1 "
           'trainer.devices=2 --index "$SLURM_ARRAY_TASK_ID" &')
    assert cmd in out.splitlines()
    tasks = [line for line in out.splitlines() if line.startswith("# task ")]
    assert len(tasks) == 8 and tasks[3] == "# task 3: lr3e-3-L2-s5: optim.lr=3e-3 model.n_layers=2 trainer.seed=5"
    script = tmp_path / "a.sbatch"
    script.write_text(out)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
    assert files(tmp_path) == ["a.sbatch", "sweep.yaml"]


@pytest.mark.parametrize("args, message", [
    (["--slurm", "--gpus-per-node", "3"], "run 0 (lr3e-3-L1-s0): --nodes 1 x --gpus-per-node 3: trainer.global_batch_size=32"),
    (["--slurm", "--max-parallel", "0"], "--max-parallel 0: must be at least 1"),
    (["--max-parallel", "2"], "--max-parallel applies to --slurm"),
    (["--slurm", "--summary"], "--slurm submits every run of the sweep as a job array"),
    (["--slurm", "trainer.max_step=3"], "trainer.max_step"),
])
def test_bad_array_submissions_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch, args, message):
    f = write(tmp_path, GRID.format(out=tmp_path / "out"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'nobin'}:{os.environ['PATH']}")
    try:
        code = main(["sweep", str(f), *args])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert files(tmp_path) == ["sweep.yaml"]


def test_wandb_configuration_of_a_grid_and_of_random_draws(tmp_path, capsys):
    f = write(tmp_path, GRID.format(out=tmp_path / "out"))
    assert main(["sweep", str(f), "--wandb", "trainer.max_steps=9"]) == 0
    capsys.readouterr()
    cfg = yaml.safe_load((tmp_path / "out" / "wandb-sweep.yaml").read_text())
    assert cfg == {
        "name": "g", "method": "grid", "metric": {"name": "val/nelbo", "goal": "minimize"},
        "parameters": {"optim.lr": {"values": ["3e-3", "1e-3"]}, "model.n_layers": {"values": [1, 2]},
                       "trainer.seed": {"values": [0, 5]}},
        "program": "dlmtrain",
        "command": ["${env}", sys.executable, "-m", "dlmtrain.cli", "sweep", str(f.resolve()), "--agent",
                    "trainer.max_steps=9", "${args_no_hyphens}"],
        "project": "dlmtrain",
    }
    r = write(tmp_path, f"""
config: configs/demo.yaml
dir: {tmp_path}/r
random: {{count: 5, seed: 1, params: {{optim.lr: {{loguniform: [1e-4, 1e-2]}}, optim.warmup_steps: {{int: [1, 3]}},
          optim.weight_decay: {{uniform: [0, 0.1]}}, model: [tiny, small]}}}}
seeds: [0, 1]
""", "random.yaml")
    assert main(["sweep", str(r), "--wandb"]) == 0
    cfg = yaml.safe_load((tmp_path / "r" / "wandb-sweep.yaml").read_text())
    assert cfg["method"] == "random" and cfg["run_cap"] == 10
    assert cfg["parameters"] == {
        "optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "optim.warmup_steps": {"distribution": "int_uniform", "min": 1, "max": 3},
        "optim.weight_decay": {"distribution": "uniform", "min": 0.0, "max": 0.1},
        "model": {"values": ["tiny", "small"]}, "trainer.seed": {"values": [0, 1]}}
    both = write(tmp_path, GRID.format(out=tmp_path / "b").replace('-s{trainer.seed}"', '-s{trainer.seed}-w{optim.weight_decay}"')
                 + "random: {count: 2, params: {optim.weight_decay: {uniform: [0, 0.1]}}}\n", "both.yaml")
    capsys.readouterr()
    assert main(["sweep", str(both), "--wandb"]) == 2
    assert "either a grid or random draws" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_a_wandb_agent_command_trains_the_same_named_run_under_the_agents_run_id(tmp_path, make_corpus):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    corpus = make_corpus(["alpha", "beta", "gamma"], 20, 40, 2, "--val-fraction", "0.2")
    f = write(tmp_path, f"""
name: w
config: configs/demo.yaml
dir: {tmp_path}/out
overrides: [data.manifest={corpus}, data.num_workers=0, trainer.max_steps=3, trainer.global_batch_size=8,
            trainer.val_every_n_steps=3, trainer.limit_val_batches=1, trainer.val_before_training=false,
            eval.sample_every_n_steps=0, model.n_layers=1]
grid: {{optim.lr: [3e-3, 1e-3]}}
seeds: [0, 1]
run_name: "lr{{optim.lr}}-s{{trainer.seed}}"
""")
    assert main(["sweep", str(f), "--wandb"]) == 0
    cfg = yaml.safe_load((tmp_path / "out" / "wandb-sweep.yaml").read_text())
    # what `wandb agent` runs for the grid point (1e-3, seed 1), built with wandb's own helper
    chosen = {"optim.lr": {"value": cfg["parameters"]["optim.lr"]["values"][1]}, "trainer.seed": {"value": 1}}
    macros = {**create_sweep_command_args({"args": chosen}), "env": ["/usr/bin/env"]}
    cmd = [part for c in cfg["command"] for part in (macros[c[2:-1]] if c.startswith("${") else [c])]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SWEEP_ID": "sw123", "WANDB_RUN_ID": "agentrun7",
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "out" / "lr1e-3-s1"  # the name `dlmtrain sweep` gives the same point
    assert json.loads((run / "sweep-status.json").read_text()) == {"exit_code": 0, "finished": True}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-3 and saved["trainer"]["seed"] == 1 and saved["logger"]["wandb"]["enabled"]
    assert [p.name.split("-", 3)[3] for p in (run / "wandb").glob("offline-run-*")] == ["agentrun7"]
    # the sweep's summary sees the agent's run
    md = subprocess.run([sys.executable, "-m", "dlmtrain.cli", "sweep", str(f), "--summary"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120).stdout
    row = next(line for line in md.splitlines() if line.startswith("| lr1e-3-s1 "))
    assert "| 3 | finished |" in row
