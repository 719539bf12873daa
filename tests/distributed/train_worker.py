"""``dlmtrain train`` with a stop at a chosen step, as a script (Lightning relaunches it once
per extra rank); used by tests/distributed/test_sharded_resume.py.

    python tests/distributed/train_worker.py STOP_AT CONFIG [override ...]

STOP_AT > 0: global rank 0 sends itself SIGINT at the end of that step (as Ctrl-C or
Slurm's signal would), the ranks agree to stop and save last.ckpt. STOP_AT < 0: the loss
of step -STOP_AT is NaN (the non-finite guard must stop the run). The result of
``train`` goes to stdout as one JSON line on rank 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's dlmtrain, not an installed one

from dlmtrain import load_config  # noqa: E402
from dlmtrain.errors import UserError  # noqa: E402
from dlmtrain.train import train  # noqa: E402


class NanLossAt(L.Callback):
    """Multiplies the loss of optimizer step ``step`` by NaN before backward: every gradient NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.step:
            loss.mul_(float("nan"))


class SigintAt(L.Callback):
    def __init__(self, step: int):
        self.step, self.sent = step, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 0 and trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    torch.set_num_threads(1)
    stop_at, config, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    callbacks = [SigintAt(stop_at)] if stop_at > 0 else [NanLossAt(-stop_at)] if stop_at < 0 else []
    try:
        result = train(load_config(config, overrides), extra_callbacks=callbacks)
    except UserError as e:
        result = {"error": str(e), "exit_code": e.exit_code}
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print("RESULT " + json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, bool, str))}))
