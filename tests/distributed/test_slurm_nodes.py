"""Two "nodes" on one machine: two processes started with the environment srun gives one task per
node of a 2-node job (SLURM_PROCID, SLURM_NODEID, SLURM_NTASKS, the node list, the job id) find
each other through Lightning's SLURM environment (gloo), and train exactly what one process does
with the same global batch: same per-step loss and gradient norm (tests/distributed/steps_worker.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests/distributed/steps_worker.py"


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "WORLD_SIZE", "RANK",
                                                                     "LOCAL_RANK", "NODE_RANK"))}


def test_two_slurm_nodes_on_one_machine_train_what_one_process_does(tmp_path, steps_run):
    ref = json.loads((steps_run("one") / "steps.json").read_text())  # the 1-process reference (conftest.py)

    two = tmp_path / "two"
    two.mkdir()
    procs = []
    for node in (0, 1):
        env = {**clean_env(), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "two-nodes", "SLURM_NTASKS": "2",
               "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "1",
               "SLURM_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost",  # both "nodes" are this host
               "SLURM_PROCID": str(node), "SLURM_LOCALID": "0", "SLURM_NODEID": str(node)}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(two), "1", "trainer.num_nodes=2"], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    got = json.loads((two / "steps.json").read_text())
    assert got["environment"] == "SLURMEnvironment" and got["world_size"] == 2 and got["node_rank"] == 0
    assert ref["environment"] == "NoneType" and ref["world_size"] == 1  # one process: no cluster
    # float32 all-reduce order only (as in test_equivalence.py)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=0)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5, abs=0)
    assert got["probe_ema"] == pytest.approx(ref["probe_ema"], rel=1e-5, abs=0)
    assert ref["loss"][0] != pytest.approx(ref["loss"][2], rel=1e-3)  # the steps did differ
