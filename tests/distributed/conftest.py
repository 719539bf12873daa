"""Runs of tests/distributed/steps_worker.py shared by the modules that read them
(test_equivalence.py, test_convert_sharded.py): each configuration runs once per session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests/distributed/steps_worker.py"

# "one": 1 process, the reference. ZeRO-3 partitions every parameter (param_persistence_threshold=0;
# by default the tiny model's would all stay whole) and checkpoints activations; FSDP2 checkpoints
# activations and compiles its blocks (composition with sharding; the reference has neither).
STEPS_RUNS = {
    "one": (1, []),
    "deepspeed_zero2": (2, ["strategy=deepspeed_zero2"]),
    "deepspeed_zero3": (2, ["strategy=deepspeed_zero3", "strategy.param_persistence_threshold=0",
                            "trainer.activation_checkpointing=true"]),
    "fsdp": (2, ["strategy=fsdp", "trainer.activation_checkpointing=true", "trainer.compile=true"]),
    # micro-batch 2: 1 process accumulates 4, and ZeRO-2 on 2 ranks accumulates 2 inside DeepSpeed's engine
    "one_micro2": (1, ["trainer.micro_batch_size=2"]),
    "deepspeed_zero2_accum": (2, ["strategy=deepspeed_zero2", "trainer.micro_batch_size=2"]),
}


@pytest.fixture(scope="session")
def steps_run(tmp_path_factory):
    """``steps_run(name) -> OUT_DIR`` (steps.json, final.ckpt) of the steps_worker run ``name`` of
    STEPS_RUNS, run on first use."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp(f"steps-{name}")
            devices, overrides = STEPS_RUNS[name]
            r = subprocess.run([sys.executable, str(WORKER), str(out), str(devices), *overrides], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
            done[name] = out
        return done[name]

    return get
