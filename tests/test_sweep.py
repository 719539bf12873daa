"""`dlmtrain sweep`: expansion, validation before anything runs, execution, resume, summary."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlmtrain.cli import main
from dlmtrain.sweep import load_sweep

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text, name="sweep.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_grid_times_seeds_expands_into_uniquely_named_runs_with_their_overrides(tmp_path):
    f = write(tmp_path, f"""
name: lrs
config: configs/demo.yaml
dir: {tmp_path}/out
overrides: [trainer.max_steps=7]
grid: {{optim.lr: [3e-3, 1e-3, 3e-4], model.n_layers: [1, 2]}}
seeds: [0, 5]
run_name: "lr{{optim.lr}}-L{{model.n_layers}}-s{{trainer.seed}}-h{{model.hidden_size}}"
""")
    sw = load_sweep(f)
    assert len(sw.runs) == 12 and sw.name == "lrs" and sw.dir == tmp_path / "out"
    r = sw.runs[3]  # the product is ordered grid keys first, seeds innermost
    assert r.varied == {"optim.lr": "3e-3", "model.n_layers": "2", "trainer.seed": "5"}
    h = load_sweep(f).runs[0].name.split("-h")[1]  # a key of the resolved config, not a swept one
    assert r.name == f"lr3e-3-L2-s5-h{h}" and r.dir == tmp_path / "out" / r.name
    assert r.overrides == ["trainer.max_steps=7", "optim.lr=3e-3", "model.n_layers=2", "trainer.seed=5",
                           f"run.name=lrs-{r.name}", f"run.dir={r.dir}"]
    assert len({x.name for x in sw.runs}) == 12 and not (tmp_path / "out").exists()  # nothing written


def test_random_draws_are_reproducible_and_within_their_ranges(tmp_path):
    f = write(tmp_path, """
config: configs/demo.yaml
random:
  count: 24
  seed: 3
  params:
    optim.lr: {loguniform: [1e-4, 1e-2]}
    optim.weight_decay: {uniform: [0.0, 0.1]}
    optim.warmup_steps: {int: [1, 3]}
    model: [tiny, small]
run_name: "r{optim.lr}-{optim.weight_decay}-{optim.warmup_steps}-{model}"
""", "rand.yaml")
    a, b = load_sweep(f), load_sweep(f)
    assert [r.varied for r in a.runs] == [r.varied for r in b.runs] and a.name == "rand"
    lr = [float(r.varied["optim.lr"]) for r in a.runs]
    wd = [float(r.varied["optim.weight_decay"]) for r in a.runs]
    ws = {int(r.varied["optim.warmup_steps"]) for r in a.runs}
    assert all(1e-4 <= x <= 1e-2 for x in lr) and all(0 <= x <= 0.1 for x in wd)
    assert ws == {1, 2, 3} and {r.varied["model"] for r in a.runs} == {"tiny", "small"}  # ends included
    # log-uniform: about half the draws below the geometric middle 1e-3 (24 draws, fixed seed)
    assert 5 <= sum(x < 1e-3 for x in lr) <= 19
    assert len({r.varied["optim.lr"] for r in a.runs}) == 24


@pytest.mark.parametrize("body, match", [
    ("config: configs/demo.yaml\ngird: {optim.lr: [1]}", "unknown key 'gird'; did you mean grid"),
    ("config: configs/demo.yaml\ngrid: {optim.lr: []}", "grid key 'optim.lr' has no values"),
    ("config: configs/demo.yaml\noverrides: [trainer.max_steps=3]", "nothing to sweep"),
    ("config: configs/demo.yaml\ngrid: {optim.lrr: [1e-3]}", r"run 0 \(optim.lrr=1e-3\): .*optim.lrr"),
    ("config: configs/demo.yaml\ngrid: {optim.lr: [1e-3, 0.001]}\nrun_name: x", "runs 0 and 1 are both named 'x'"),
    ("config: configs/demo.yaml\nseeds: [1]\nrun_name: '{optim.nope}'", r"run_name uses \{optim.nope\}"),
    ("config: configs/demo.yaml\nrandom: {count: 2, params: {optim.lr: {loguniform: [0, 1]}}}", "positive bounds"),
    ("grid: {optim.lr: [1]}", "'config' .* is required"),
    ("config: configs/demo.yaml\nseeds: [1]\noverrides: [run.dir=/tmp/x]", "overrides set run.dir"),
])
def test_mistakes_are_one_line_errors_with_exit_2_and_nothing_written(tmp_path, capsys, body, match):
    import re

    f = write(tmp_path, body + f"\ndir: {tmp_path}/out\n")
    assert main(["sweep", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def corpus(make_corpus):
    return make_corpus(["alpha", "beta", "gamma", "delta", "token"], 30, 50, 4, "--val-fraction", "0.15")


def tiny_sweep(tmp_path, manifest, steps=6):
    return write(tmp_path, f"""
name: t
config: configs/demo.yaml
dir: {tmp_path}/out
overrides: [data.manifest={manifest}, data.num_workers=0, trainer.max_steps={steps}, trainer.global_batch_size=8,
            trainer.val_every_n_steps={steps}, trainer.limit_val_batches=2, trainer.ckpt_every_n_steps=100,
            trainer.progress_bar=false, trainer.val_before_training=false, eval.sample_every_n_steps=0,
            optim.warmup_steps=1, model.n_layers=1]
grid: {{optim.lr: [1e-2, 1e-4]}}
run_name: "lr{{optim.lr}}"
""")


def sweep_cmd(f, *args):
    return [sys.executable, "-m", "dlmtrain.cli", "sweep", str(f), *args]


def test_a_sweep_runs_in_order_stops_on_a_signal_continues_skips_finished_runs_and_summarizes(tmp_path, corpus):
    f = tiny_sweep(tmp_path, corpus, steps=12)
    f.write_text(f.read_text().replace("optim.warmup_steps=1", "optim.warmup_steps=1, trainer.print_every_n_steps=1"))
    out = tmp_path / "out"
    p = subprocess.Popen(sweep_cmd(f), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    seen = []
    for line in p.stdout:  # the run's own progress lines come through the sweep's stdout
        seen.append(line)
        if "step 3/12" in line:
            p.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C or scancel --signal would
            break
    seen += p.stdout.readlines()
    assert p.wait(timeout=120) == 0, "".join(seen)[-3000:]
    text = "".join(seen)
    assert "stopped by a signal; run the same command to continue" in text and "Traceback" not in text
    assert (out / "lr1e-2" / "checkpoints" / "last.ckpt").is_file()  # the run saved its state
    assert not (out / "lr1e-4").exists()  # and the sweep did not go on to the next run
    assert json.loads((out / "lr1e-2" / "sweep-status.json").read_text())["finished"] is False
    assert [x["name"] for x in json.loads((out / "sweep.json").read_text())["runs"]] == ["lr1e-2", "lr1e-4"]

    # the same command: run 0 resumes where it stopped, then run 1 starts fresh
    r = subprocess.run(sweep_cmd(f), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("resuming from") == 1 and r.stdout.count("finished at step 12") == 2, r.stdout[-3000:]
    finals = {}
    for name, lr in (("lr1e-2", 1e-2), ("lr1e-4", 1e-4)):
        assert json.loads((out / name / "sweep-status.json").read_text()) == {"exit_code": 0, "finished": True}
        assert math.isclose(float(__import__("yaml").safe_load((out / name / "config.yaml").read_text())["optim"]["lr"]), lr)
        rows = list(csv.DictReader(open(out / name / "logs" / "metrics.csv")))
        finals[name] = [float(x["val/nelbo"]) for x in rows if x.get("val/nelbo")][-1]
    assert finals["lr1e-2"] != finals["lr1e-4"]

    # again: both finished runs are skipped, nothing trains
    r2 = subprocess.run(sweep_cmd(f), capture_output=True, text=True, cwd=ROOT)
    assert r2.returncode == 0 and r2.stdout.count("finished before, skipped") == 2, r2.stdout

    # the summary: one row per run with its final step and val/nelbo, as Markdown and CSV
    r3 = subprocess.run(sweep_cmd(f, "--summary"), capture_output=True, text=True, cwd=ROOT)
    assert r3.returncode == 0, r3.stderr
    assert r3.stdout.splitlines()[0].startswith("| run | optim.lr | step | status | val/nelbo |")
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(x["run"], x["step"], x["status"]) for x in rows] == [("lr1e-2", "12", "finished"), ("lr1e-4", "12", "finished")]
    assert [float(x["val/nelbo"]) for x in rows] == pytest.approx([finals["lr1e-2"], finals["lr1e-4"]], abs=1e-4)
    assert (out / "summary.md").read_text() == r3.stdout
