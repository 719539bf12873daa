"""`dlmtrain submit`: the batch script and frozen config it writes, its checks (one line, exit 2,
nothing written), and the template's stop/requeue logic run by bash with stand-in srun and scontrol."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlmtrain.cli import main
from dlmtrain.config import load_config, to_yaml
from dlmtrain.launch.slurm import Job, render, time_seconds

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs/demo.yaml")


def files(d: Path) -> list:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


def submit(capsys, *argv):
    code = main(["submit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def split(out: str) -> tuple[str, str]:
    script, _, cfg = out.partition("\n# ---- resolved config: ")
    return script, cfg.split("\n", 1)[1]


def test_dry_run_prints_the_job_and_the_frozen_config_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = submit(capsys, "--dry-run", "--nodes", "4", "--gpus-per-node", "8", "--time", "2-00:00:00",
                            "-p", "gpu", "-A", "lab", "-C", "h100", "--cpus-per-task", "12", "--env", "NCCL_IB_HCA=mlx5",
                            "--sbatch=--exclusive", DEMO, "trainer=gpu", "model=small", "run.name=big",
                            "trainer.global_batch_size=64")
    assert code == 0, err
    script, frozen = split(out)
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == ["#SBATCH --job-name=big", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8",
                      "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=12", "#SBATCH --time=2-00:00:00",
                      "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --constraint=h100",
                      "#SBATCH --exclusive", "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue",
                      "#SBATCH --open-mode=append", f"#SBATCH --output={tmp_path}/runs/big/slurm/%x-%j.out"]
    run = tmp_path / "runs/big"
    assert (f"srun --kill-on-bad-exit=1 {sys.executable} -m dlmtrain.cli train {run}/slurm/config.yaml &"
            in script.splitlines())
    assert "export NCCL_IB_HCA=mlx5" in script.splitlines() and f"cd {tmp_path} || exit 2" in script
    # the frozen config is the composed one with the job's shape and an absolute run.dir, and loads back as is
    want = load_config(DEMO, ["trainer=gpu", "model=small", "run.name=big", "trainer.global_batch_size=64",
                              "trainer.num_nodes=4", "trainer.devices=8", f"run.dir={run}"])
    assert frozen == to_yaml(want)
    (tmp_path / "frozen.yaml").write_text(frozen)
    assert to_yaml(load_config(tmp_path / "frozen.yaml")) == frozen
    assert files(tmp_path) == ["frozen.yaml"]  # the dry run wrote nothing


def test_the_script_passes_bash_n_and_shellcheck_and_a_cpu_job_asks_for_no_gpus(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = submit(capsys, "--dry-run", "--gpus-per-node", "2", DEMO)
    assert code == 0, err
    script, _ = split(out)
    assert "--gpus-per-node" not in script and "#SBATCH --ntasks-per-node=2" in script
    assert "#SBATCH --time" not in script  # the partition's default
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (.ci/run installs it); bash -n passed")
    r = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("1:30", 90), ("02:00:05", 7205), ("1-2", 93600),
                                           ("1-02:03", 93780), ("1-00:00:10", 86410)])
def test_slurm_time_formats(text, seconds):
    assert time_seconds(text) == seconds


BAD = [
    (["--gpus-per-node", "3"], "trainer.global_batch_size=32 is not divisible by the world size 3"),
    (["--nodes", "2", "--gpus-per-node", "3"], "--nodes 2 x --gpus-per-node 3"),
    (["--time", "1h"], "--time 1h: use HH:MM:SS"),
    (["--time", "1:00"], "--time 1:00 is not longer than --signal-s 120"),
    (["--nodes", "0"], "both must be at least 1"),
    (["--env", "1X=2"], "--env 1X=2: use KEY=VALUE"),
    (["--partition", "a b"], "must be one word"),
    (["--local", "--nodes", "2"], "--local runs on this machine"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_submissions_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = submit(capsys, *args, DEMO)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert files(tmp_path) == []


def test_unknown_config_key_and_missing_sbatch_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = submit(capsys, DEMO, "trainer.max_step=3")
    assert code == 2 and "trainer.max_step" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    code, _, err = submit(capsys, DEMO, "trainer.max_steps=3")
    assert code == 2 and "sbatch not found" in err and len(err.strip().splitlines()) == 1
    assert files(tmp_path) == []


def _shim(bin_dir: Path, name: str, body: str) -> None:
    p = bin_dir / name
    p.write_text("#!/bin/bash\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


def test_a_refused_submission_leaves_nothing_and_an_accepted_one_writes_script_and_config(tmp_path, capsys,
                                                                                           monkeypatch):
    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    work.mkdir(), bin_dir.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    _shim(bin_dir, "sbatch", 'echo "sbatch: error: invalid partition specified: nope" >&2; exit 1\n')
    code, _, err = submit(capsys, "-p", "nope", DEMO)
    assert code == 2 and "sbatch refused" in err and "invalid partition specified: nope" in err
    assert files(work) == []
    _shim(bin_dir, "sbatch", f'echo "$@" > {tmp_path}/args; echo "4242;cluster"\n')
    code, out, err = submit(capsys, "--gpus-per-node", "2", DEMO, "run.name=r")
    assert code == 0, err
    assert "submitted job 4242" in out and f"{work}/runs/r/slurm/r-4242.out" in out
    assert files(work) == ["runs", "runs/r", "runs/r/slurm", "runs/r/slurm/config.yaml", "runs/r/slurm/job.sbatch"]
    assert (tmp_path / "args").read_text().split() == ["--parsable", f"{work}/runs/r/slurm/job.sbatch"]


STEP = """import signal, sys, time
code = int(sys.argv[1])
signal.signal(signal.SIGUSR1, lambda *a: sys.exit(code))  # as dlmtrain train: save, then exit
signal.signal(signal.SIGTERM, lambda *a: sys.exit(code))
open(sys.argv[2], "w").write("ready")
time.sleep(60)
sys.exit(9)
"""


@pytest.mark.parametrize("sig, step_exit, requeued", [
    (signal.SIGUSR1, 0, True),   # time limit ahead: saved, requeue ourselves
    (signal.SIGUSR1, 4, True),   # stopped before the first checkpoint: nothing lost, requeue too
    (signal.SIGUSR1, 3, False),  # diverged while stopping: a requeue would not help
    (signal.SIGTERM, 0, False),  # scontrol requeue / preemption: Slurm requeues by itself
])
def test_the_template_passes_the_signal_on_and_requeues_only_after_usr1_and_a_clean_stop(tmp_path, sig, step_exit,
                                                                                      requeued):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _shim(bin_dir, "scontrol", f'echo "$@" >> {tmp_path}/scontrol\n')
    (tmp_path / "step.py").write_text(STEP)
    ready = tmp_path / "ready"
    text = render(Job(), title="t", command=f"{sys.executable} {tmp_path}/step.py {step_exit} {ready}",
                  workdir=tmp_path, log="x.out", script=tmp_path / "job.sbatch", gpu=False)
    (tmp_path / "job.sbatch").write_text(text)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77"}
    p = subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert ready.exists(), p.communicate()[0]
    p.send_signal(sig)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == step_exit, out
    calls = (tmp_path / "scontrol").read_text().split("\n") if (tmp_path / "scontrol").exists() else []
    assert calls[:1] == (["requeue 77"] if requeued else []), out
    assert f"[dlmtrain] exit {step_exit}" in out


def test_a_failing_wandb_service_warns_once_and_never_stops_training(tmp_path, capsys, monkeypatch):
    """A preemption's TERM kills W&B's service process with the job step; the next log call must
    not raise (the run still has to save last.ckpt)."""
    from lightning.pytorch.loggers import WandbLogger

    from dlmtrain.loggers import wandb_logger

    calls = []

    def broken(self, metrics, step=None):
        calls.append(step)
        raise ConnectionResetError("Connection lost")

    monkeypatch.setattr(WandbLogger, "log_metrics", broken)
    cfg = load_config(DEMO, ["logger.wandb.enabled=true", "logger.wandb.mode=offline"])
    lg = wandb_logger(cfg, tmp_path)
    assert isinstance(lg, WandbLogger)
    assert lg.log_metrics({"train/loss": 1.0}, step=1) is None
    assert lg.log_metrics({"train/loss": 1.0}, step=2) is None  # no second attempt, no second warning
    out = capsys.readouterr().out
    assert calls == [1] and out.count("W&B logging failed (ConnectionResetError: Connection lost)") == 1


def test_the_launch_wrappers_run_dlmtrain_submit(tmp_path):
    for name, extra in (("submit", ["--dry-run"]), ("local", [])):
        script = ROOT / "launch" / name
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        # a bad shape: the same one-line refusal as `dlmtrain submit`, exit 2, nothing written
        r = subprocess.run([str(script), *extra, "--gpus-per-node", "3", DEMO], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and "not divisible by the world size 3" in r.stderr, r.stderr
    r = subprocess.run([str(ROOT / "launch/submit"), "--dry-run", DEMO], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "#SBATCH --requeue" in r.stdout and files(tmp_path) == []


def test_local_honours_time_with_a_save_before_it_and_the_next_start_resumes_there(tmp_path, make_corpus):
    """--local --time 0:20 --signal-s 10: USR1 to itself after 10 s saves last.ckpt and exits 0 (as the
    Slurm job would before requeueing); the same command resumes at that step."""
    import re

    manifest = make_corpus(["alpha", "beta", "gamma"], 20, 40, 5, "--val-fraction", "0.2")
    args = [sys.executable, "-m", "dlmtrain.cli", "submit", "--local", "--signal-s", "10", DEMO,
            f"data.manifest={manifest}", "run.name=loc", "trainer.global_batch_size=8", "trainer.val_before_training=false",
            "trainer.val_every_n_steps=100000", "trainer.limit_val_batches=1", "eval.sample_every_n_steps=0",
            "trainer.ckpt_every_n_steps=100000", "model.n_layers=1", "data.num_workers=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([*args, "--time", "0:20", "trainer.max_steps=100000"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "received SIGUSR1" in r.stdout, r.stdout[-2000:]
    step = int(re.search(r"stopped at step (\d+)", r.stdout).group(1))
    import torch

    assert step > 0 and torch.load(tmp_path / "runs/loc/checkpoints/last.ckpt", map_location="cpu",
                                   weights_only=False)["global_step"] == step
    r = subprocess.run([*args, "--time", "10:00", f"trainer.max_steps={step + 2}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"(step {step})" in r.stdout and f"finished at step {step + 2}" in r.stdout, r.stdout[-2000:]


def test_a_stop_signal_during_start_up_stops_cleanly_instead_of_killing_the_process(tmp_path):
    """Slurm's USR1/TERM can come while `dlmtrain train` is still importing torch: the signal is held
    and the run stops at its first safe point (exit 4: no checkpoint yet, nothing lost)."""
    import time

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        p = subprocess.Popen([sys.executable, "-m", "dlmtrain.cli", "train", DEMO, f"run.dir={tmp_path / sig.name}"],
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)  # after the CLI's first lines, during the imports
        p.send_signal(sig)
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 4, out[-2000:]
        assert "stopped before training started" in out
        assert not (tmp_path / sig.name / "checkpoints" / "last.ckpt").exists()
