"""Stopping a run early, on every rank at the same point: signals and fatal data errors.

A signal (SIGINT, SIGTERM, SIGUSR1: Ctrl-C, ``kill``, Slurm's ``--signal`` before a
preemption or time limit) only sets a flag. A fatal data error after the first batch is
recorded by the DataModule (``data_fault``) instead of raised. At the end of every
training micro-batch and every validation batch the ranks agree (one all-reduce of a
flag) whether anyone wants to stop; if so:

- in training: ``last.ckpt`` is saved (the state at the last optimizer-step boundary,
  see RunCheckpoints) and :class:`RunStopped` is raised on every rank;
- in validation: the validation ends at that batch on every rank and logs nothing; inside
  ``fit`` ``last.ckpt`` is saved before stopping; in a standalone validation (the one
  before training, or the final one, after which ``dlmtrain train`` saves last.ckpt
  itself) nothing is saved here.

No validation pass, no top-k entry and no other checkpoint is written on the way out.
A second Ctrl-C raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import signal
import threading

import lightning as L


class RunStopped(Exception):
    """Raised on every rank when an agreed stop ends training or validation."""

    def __init__(self, step: int, saved: bool, reason: str, fault: str | None = None):
        super().__init__(reason)
        self.step, self.saved, self.reason, self.fault = step, saved, reason, fault


def _gather_fault(trainer, local: str | None) -> str | None:
    import torch.distributed as dist

    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        out = [None] * trainer.world_size
        dist.all_gather_object(out, local)
        return next((m for m in out if m), None)
    return local


class StopHandler(L.Callback):
    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self, checkpoints):
        from dlmtrain.stopsignals import take

        self.checkpoints = checkpoints
        self.requested: str | None = take()  # the name of the first signal received (also before this existed)

    # ---- signals -----------------------------------------------------------------------
    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        if not self.requested:
            print(f"\n[dlmtrain] received {name}: stopping at the end of this step (Ctrl-C again to abort now)",
                  flush=True)
        self.requested = self.requested or name

    def install(self) -> None:
        """(Re)install the handlers: Lightning installs its own when a fit/validate starts."""
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) != self._handler:
                signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) == self._handler:
                signal.signal(sig, signal.default_int_handler if name == "SIGINT" else signal.SIG_DFL)

    # ---- agreement -----------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "defer_faults"):
            dm.defer_faults = True

    def _fault(self, trainer) -> str | None:
        dm = trainer.datamodule
        return getattr(dm, "data_fault", None) if dm is not None else None

    def _agree(self, trainer) -> bool:
        local = bool(self.requested) or bool(self._fault(trainer))
        return trainer.strategy.reduce_boolean_decision(local, all=False)

    def _raise(self, trainer, saved: bool):
        fault = _gather_fault(trainer, self._fault(trainer))
        reason = "data error" if fault else (self.requested or "a stop on another rank")
        raise RunStopped(trainer.global_step, saved, reason, fault)

    # ---- training --------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        self.install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._agree(trainer):
            saved = trainer.global_step > 0
            if saved:
                self.checkpoints.save_last(trainer)
            self._raise(trainer, saved)

    # ---- validation ------------------------------------------------------------------------
    def on_validation_start(self, trainer, pl_module):
        self.install()
        pl_module.abort_validation = False
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "stop_eval"):
            trainer.datamodule.stop_eval = False
        if self._agree(trainer):  # asked to stop before validation began
            self._abort(trainer, pl_module)

    def _abort(self, trainer, pl_module):
        pl_module.abort_validation = True
        if trainer.datamodule is not None and hasattr(trainer.datamodule, "stop_eval"):
            trainer.datamodule.stop_eval = True

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not pl_module.abort_validation and self._agree(trainer):
            self._abort(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module):
        if not pl_module.abort_validation:
            return
        saved = trainer.state.fn == "fit" and trainer.global_step > 0
        if saved:  # the cut-short validation is not redone on resume: its step has no val point
            self.checkpoints.save_last(trainer)
        self._raise(trainer, saved)
