"""The SLURM path end to end under a real single-node Slurm (slurmctld + slurmd + munge started
here; tests/launch/slurm_cluster.py): `dlmtrain submit` a 2-task CPU job (gloo) that trains; USR1
to the batch script (what --signal=B:USR1@120 sends before the time limit) saves last.ckpt and the
job requeues itself; `scontrol requeue` (TERM, as a preemption) saves again and Slurm requeues it;
each start resumes at the saved step, the W&B offline run keeps its id, and the job completes.

Slurm holds a requeued batch job for ~2 minutes (its BeginTime); the test releases it at once
with `scontrol update StartTime=now`. Run with `-m slurm` (as root; .ci/run installs the packages).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slurm_cluster import Cluster, unavailable

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = unavailable()
    if why:
        if os.environ.get("DLMTRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(f"DLMTRAIN_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def wait_for(what, predicate, timeout_s=240, every_s=0.5):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_submit_trains_stops_requeues_and_resumes_under_real_slurm(cluster, make_corpus, tmp_path):
    manifest = make_corpus(["alpha", "beta", "gamma", "delta", "epsilon"], 40, 60, 7, "--val-fraction", "0.2")
    env = {**cluster.env, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "dlmtrain.cli", "submit", "--gpus-per-node", "2", "--time", "10:00",
                        "--job-name", "e2e", str(ROOT / "configs/demo.yaml"), f"data.manifest={manifest}",
                        "run.name=e2e", "trainer.max_steps=150", "trainer.global_batch_size=16",
                        "trainer.val_before_training=false", "trainer.val_every_n_steps=1000",
                        "trainer.limit_val_batches=2", "trainer.ckpt_every_n_steps=1000",
                        "trainer.print_every_n_steps=1", "eval.sample_every_n_steps=0", "eval.nelbo_samples=1",
                        "logger.wandb.enabled=true", "logger.wandb.mode=offline"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    job = re.search(r"submitted job (\d+)", r.stdout).group(1)
    log = tmp_path / "runs/e2e/slurm" / f"e2e-{job}.out"
    text = lambda: log.read_text() if log.exists() else ""  # noqa: E731

    def step_at_least(n):
        steps = [int(s) for s in re.findall(r"\[dlmtrain\] step (\d+)/150", text())]
        return bool(steps) and max(steps) >= n

    def requeued(count):
        def check():
            j = cluster.job(job)
            if j.get("Restarts") == str(count) and j.get("JobState") == "PENDING":
                # release it now instead of after Slurm's ~2 minute hold of requeued batch jobs, once the
                # node is idle and a second has passed (a relaunch in the second its credential was
                # revoked is refused: "Job credential revoked")
                wait_for("the node to be idle", lambda: subprocess.run(
                    ["sinfo", "-h", "-o", "%T"], env=cluster.env, capture_output=True, text=True).stdout.strip() == "idle")
                time.sleep(2)
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster.env, check=True)
                return True
            return False
        return check

    # 1. a time limit ahead: USR1 to the batch script -> save, requeue itself
    wait_for("training to reach step 10", lambda: step_at_least(10))
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster.env, check=True)
    wait_for("the job to requeue itself", requeued(1))
    first = int(re.search(r"stopped at step (\d+)", text()).group(1))
    assert f"requeueing job {job}" in text()

    # 2. the requeued job resumes at that step; then a preemption-like `scontrol requeue` (TERM)
    wait_for("the resume", lambda: re.search(r"resuming from \S+ \(step (\d+)\)", text()))
    assert int(re.search(r"resuming from \S+ \(step (\d+)\)", text()).group(1)) == first
    wait_for("training to go on", lambda: step_at_least(first + 10))
    subprocess.run(["scontrol", "requeue", job], env=cluster.env, check=True)
    wait_for("Slurm to requeue the job", requeued(2))
    second = [int(s) for s in re.findall(r"stopped at step (\d+)", text())][1]
    assert second >= first + 10

    # 3. resumes there and finishes
    wait_for("the job to complete", lambda: cluster.job(job).get("JobState") == "COMPLETED", timeout_s=300)
    out = text()
    resumed = [int(s) for s in re.findall(r"resuming from \S+ \(step (\d+)\)", out)]
    assert resumed == [first, second], out[-3000:]
    assert "finished at step 150" in out and out.count("requeueing job") == 1
    assert cluster.job(job)["Restarts"] == "2" and cluster.job(job)["ExitCode"] == "0:0"
    starts = re.findall(r"\[dlmtrain\] job (\d+) \(restart (\d+)\) on \S+: 2 task\(s\)", out)
    assert starts == [(job, "0"), (job, "1"), (job, "2")]
    ck = torch.load(tmp_path / "runs/e2e/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ck["global_step"] == 150
    # one W&B run continued over the three starts: three offline segments under the same id
    runs = sorted((tmp_path / "runs/e2e/wandb").glob("offline-run-*"))
    ids = {p.name.split("-", 3)[3] for p in runs}  # offline-run-<time>-<id>
    want = "dlm-" + hashlib.sha256(str((tmp_path / "runs/e2e").resolve()).encode()).hexdigest()[:12]
    assert len(runs) == 3 and ids == {want}, [p.name for p in runs]
    print(f"\n[slurm e2e] job {job}: stopped at {first} (USR1, self-requeue) and {second} (scontrol requeue), "
          f"resumed at {resumed}, finished at 150 with Restarts=2")


def test_a_sweep_runs_as_a_job_array_one_run_at_a_time_and_summarizes(cluster, make_corpus, tmp_path):
    manifest = make_corpus(["alpha", "beta", "gamma"], 20, 40, 3, "--val-fraction", "0.2")
    f = tmp_path / "sweep.yaml"
    f.write_text(f"""
name: arr
config: {ROOT / 'configs/demo.yaml'}
overrides: [data.manifest={manifest}, trainer.max_steps=4, trainer.global_batch_size=8, trainer.val_every_n_steps=4,
            trainer.limit_val_batches=1, trainer.val_before_training=false, eval.sample_every_n_steps=0, model.n_layers=1]
grid: {{optim.lr: [3e-3, 1e-3]}}
run_name: "lr{{optim.lr}}"
""")
    env = {**cluster.env, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "dlmtrain.cli", "sweep", str(f), "--slurm", "--max-parallel", "1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    job = re.search(r"submitted job array (\d+) \(0-1%1\)", r.stdout).group(1)
    tasks = [f"{job}_0", f"{job}_1"]

    seen_running = set()

    def done():
        states = [cluster.job(t).get("JobState") for t in tasks]
        seen_running.add(sum(s == "RUNNING" for s in states))
        return all(s == "COMPLETED" for s in states)
    wait_for("both array tasks to complete", done, timeout_s=300, every_s=0.3)
    assert max(seen_running) == 1  # %1: one run at a time
    md = subprocess.run([sys.executable, "-m", "dlmtrain.cli", "sweep", str(f), "--summary"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120).stdout
    rows = [line for line in md.splitlines() if line.startswith("| lr")]
    assert len(rows) == 2 and all("| 4 | finished |" in row for row in rows), md
    logs = sorted((tmp_path / "runs/arr/slurm").glob("arr-*.out"))
    assert [p.name for p in logs] == [f"arr-{job}_0.out", f"arr-{job}_1.out"]
