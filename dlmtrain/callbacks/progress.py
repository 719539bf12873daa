"""Plain progress lines for logs: one line every N optimizer steps, and one per validation.

Used when there is no progress bar (stderr is not a terminal, or trainer.progress_bar=false):
a bar's carriage returns make one enormous line in a log file.
"""

from __future__ import annotations

import time

import lightning as L


def _duration(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _count(x: float) -> str:
    for unit, div in (("M", 1e6), ("K", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


class ProgressLines(L.Callback):
    def __init__(self, every_n_steps: int, throughput=None, lines: bool = True):
        self.every = every_n_steps
        self.throughput = throughput
        self.lines = lines  # step lines (off when a bar shows the same)
        self._t0 = None
        self._step0 = 0
        self._last = -1

    def on_train_start(self, trainer, pl_module):
        self._t0, self._step0 = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.lines or step == self._last or step % self.every or not trainer.is_global_zero:
            return
        self._last = step
        done, total = step - self._step0, trainer.max_steps - self._step0
        elapsed = time.monotonic() - self._t0
        eta = elapsed / done * (total - done) if done else float("nan")
        loss = trainer.callback_metrics.get("train/loss")
        tps = self.throughput.tokens_per_s if self.throughput is not None else None
        parts = [f"[dlmtrain] step {step}/{trainer.max_steps}"]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        if tps:
            parts.append(f"{_count(tps)} tokens/s")
        parts.append(f"elapsed {_duration(elapsed)}" + (f", ETA {_duration(eta)}" if done else ""))
        print(" | ".join(parts), flush=True)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn != "fit" or getattr(pl_module, "abort_validation", False) or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        if getattr(pl_module, "_last_val_step", -1) == trainer.global_step and "val/nelbo" in m:
            se = f" ± {float(m['val/nelbo_se']):.4f}" if "val/nelbo_se" in m else ""
            bpb = f", {float(m['val/bpb']):.4f} bits/byte" if "val/bpb" in m else ""
            print(f"[dlmtrain] step {trainer.global_step}: val/nelbo {float(m['val/nelbo']):.4f}{se} nats/token, "
                  f"ppl <= {float(m['val/ppl_bound']):.2f}, {float(m['val/bpt']):.4f} bits/token{bpb}", flush=True)
