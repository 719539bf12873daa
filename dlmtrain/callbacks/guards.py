"""Stop cleanly: on a non-finite loss, and on SIGINT/SIGTERM/SIGUSR1 (preemption)."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import torch

from dlmtrain.errors import UserError


class NonFiniteLossError(UserError):
    exit_code = 3


class NonFiniteLossGuard(L.Callback):
    """Checks the loss before backward, so the weights saved are the last finite ones.
    All ranks agree (one all-reduce of a flag), save ``nonfinite-step<N>.ckpt`` and raise."""

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)

    def on_before_backward(self, trainer, pl_module, loss):
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            path = self.dirpath / f"nonfinite-step{trainer.global_step}.ckpt"
            trainer.save_checkpoint(path)
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at step {trainer.global_step}; the weights before this step "
                f"are in {path}. Lower optim.lr, raise optim.warmup_steps or check the data, then resume from it"
            )


class GracefulStop(L.Callback):
    """First SIGINT/SIGTERM/SIGUSR1: finish the current step, save ``last.ckpt`` and stop.
    A second SIGINT interrupts at once. Running the same command again resumes."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self, last_path: str | Path):
        self.last_path = Path(last_path)
        self.requested = False
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n[dlmtrain] received {signal.Signals(signum).name}: saving {self.last_path} after this step", flush=True)

    def on_train_start(self, trainer, pl_module):
        # After Lightning registers its own SIGTERM handler, so ours replaces it.
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old[sig] = signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # only between optimizer steps, so no half-accumulated gradient is lost
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            trainer.save_checkpoint(self.last_path)
            trainer.should_stop = True
            self.stopped_at = trainer.global_step

    def teardown(self, trainer, pl_module, stage):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
