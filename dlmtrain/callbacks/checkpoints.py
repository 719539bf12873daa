"""The run's checkpoints: ``last.ckpt`` (every N steps, on a stop, at the end) and the top-k
``best-step<N>-nelbo<X>.ckpt`` by validation NELBO. Replaces Lightning's ModelCheckpoint,
whose ``save_last`` and top-k bookkeeping do not survive stops and resumes (``last-v1``,
extra top-k files, scores from before training).

Invariants:
- Every checkpoint is at an optimizer-step boundary. A save in the middle of a step
  (a fault during gradient accumulation, the non-finite guard) stores the loop counters
  captured at the last boundary, and the DataModule and Throughput keep their own
  boundary state, so resuming replays exactly the unfinished step.
- No checkpoint with non-finite weights is written.
- Top-k keeps exactly ``save_top_k`` files over any number of resumes: the set is read
  from the directory (the score is in the file name), not from callback state.
- Under sharded strategies (DeepSpeed, FSDP2) each checkpoint is a directory of the same
  name, written beside it and swapped in (dlmtrain/distributed/checkpoint.py); everything
  here applies to it unchanged.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import lightning as L

from dlmtrain.callbacks.guards import NonFiniteLossError, all_finite
from dlmtrain.checkpoint.files import remove_path

BEST_RE = re.compile(r"^best-step(\d+)-nelbo(-?[0-9.]+|inf|nan)\.ckpt$")


class RunCheckpoints(L.Callback):
    def __init__(self, ckpt_dir: str | Path, every_n_steps: int, save_top_k: int):
        self.dir = Path(ckpt_dir)
        self.every_n_steps = every_n_steps
        self.save_top_k = save_top_k
        self.last_path = self.dir / "last.ckpt"
        self.last_saved_step: int | None = None
        self._boundary_loops: dict | None = None
        self._at_boundary = True
        self._seen_step = -1

    # ---- boundary tracking -------------------------------------------------------------
    def _capture(self, trainer) -> None:
        self._boundary_loops = copy.deepcopy(trainer._checkpoint_connector._get_loops_state_dict())
        self._at_boundary = True
        self._seen_step = trainer.global_step

    def on_train_start(self, trainer, pl_module):
        self._capture(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._at_boundary = False

    def _sync(self, trainer) -> None:
        """At a train batch end where the optimizer just stepped, capture the boundary. Called by
        every save too, so a callback that saves before this one in the same hook is covered."""
        if trainer.state.fn == "fit" and trainer.training and trainer.global_step != self._seen_step:
            self._capture(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(trainer)
        if self._at_boundary and trainer.global_step % self.every_n_steps == 0:
            self.save_last(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if not self._at_boundary and self._boundary_loops is not None:
            # the loops as at the end of the last completed step: a resumed run replays the unfinished one
            checkpoint["loops"] = copy.deepcopy(self._boundary_loops)

    # ---- saving ------------------------------------------------------------------------
    def save(self, trainer, path: Path) -> None:
        """Save the training state (as of the last optimizer-step boundary) to ``path``."""
        self._sync(trainer)
        module = trainer.lightning_module
        ema = getattr(module, "ema", None)
        if ema is not None and ema.active:  # never store EMA weights as the training weights
            ema.swap_out(module.backbone)
        if not trainer.strategy.reduce_boolean_decision(all_finite(module.parameters()), all=True):
            raise NonFiniteLossError(
                f"the weights became non-finite in the optimizer step before step {trainer.global_step} although the "
                f"gradients were finite (learning rate or weight decay too large); nothing was saved, the newest good "
                f"checkpoint is {self.last_path} (step {self.last_saved_step}); resume from it with a lower optim.lr"
            )
        trainer.save_checkpoint(path, weights_only=False)

    def save_last(self, trainer) -> None:
        if self.last_saved_step == trainer.global_step and self.last_path.exists():
            return
        self.save(trainer, self.last_path)
        self.last_saved_step = trainer.global_step

    # ---- top-k by val/nelbo ------------------------------------------------------------
    def best(self) -> list[tuple[float, int, Path]]:
        """(score, step, path) of the best-* files in the directory, best first."""
        out = []
        for p in self.dir.glob("best-step*-nelbo*.ckpt"):
            m = BEST_RE.match(p.name)
            if m:
                out.append((float(m[2]), int(m[1]), p))
        return sorted(out, key=lambda x: (x[0] if math.isfinite(x[0]) else math.inf, x[1]))

    def update_topk(self, trainer, score: float) -> Path | None:
        """Keep a checkpoint of this step if its score is among the best ``save_top_k``."""
        step = trainer.global_step
        if self.save_top_k <= 0 or step <= 0 or not math.isfinite(score):
            return None
        path = self.dir / f"best-step{step}-nelbo{score:.4f}.ckpt"
        keep = False
        if trainer.is_global_zero:
            others = [b for b in self.best() if b[1] != step]
            ranked = sorted(others + [(score, step, path)], key=lambda x: (x[0], x[1]))[: self.save_top_k]
            keep = any(p == path for _, _, p in ranked)
        keep = trainer.strategy.broadcast(keep)
        if keep:
            self.save(trainer, path)
        if trainer.is_global_zero:
            entries = self.best()
            for _, s, p in entries[self.save_top_k:]:
                remove_path(p)
            for _, s, p in entries[: self.save_top_k]:
                if s == step and p != path:  # an older file for the same step (another trajectory)
                    remove_path(p)
        trainer.strategy.barrier("topk")
        return path if keep else None

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn != "fit" or getattr(pl_module, "abort_validation", False):
            return
        if getattr(pl_module, "_last_val_step", -1) == trainer.global_step and "val/nelbo" in trainer.callback_metrics:
            self.update_topk(trainer, float(trainer.callback_metrics["val/nelbo"]))
