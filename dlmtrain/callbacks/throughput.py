"""Tokens per second on the progress bar and in the logs."""

from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    """Logs ``train/tokens_per_s`` (all ranks together, averaged over the last
    ``window`` micro-batches) and ``train/tokens`` (consumed by completed optimizer steps,
    so the count in a checkpoint matches its weights)."""

    def __init__(self, window: int = 10):
        self.window = window
        self._t0 = None
        self._tokens_since = 0
        self._steps_since = 0
        self.tokens = 0
        self._pending = 0  # micro-batches of the optimizer step in progress
        self._seen_step = None
        self.tokens_per_s: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:
            self._t0 = time.perf_counter()
        if self._seen_step is None:
            self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = batch["input_ids"].numel() * trainer.world_size
        self._pending += n
        if trainer.global_step != self._seen_step:  # an optimizer step completed
            self.tokens += self._pending
            self._pending, self._seen_step = 0, trainer.global_step
        self._tokens_since += n
        self._steps_since += 1
        if self._steps_since >= self.window:
            dt = time.perf_counter() - self._t0
            self.tokens_per_s = self._tokens_since / dt
            pl_module.log("train/tokens_per_s", self.tokens_per_s, prog_bar=True, on_step=True, on_epoch=False)
            self._t0, self._tokens_since, self._steps_since = time.perf_counter(), 0, 0
        pl_module.log("train/tokens", float(self.tokens), on_step=True, on_epoch=False)

    def on_validation_end(self, trainer, pl_module):
        self._t0, self._tokens_since, self._steps_since = time.perf_counter(), 0, 0  # validation is not training time

    def state_dict(self):
        return {"tokens": self.tokens}

    def load_state_dict(self, state):
        self.tokens = int(state.get("tokens", 0))
