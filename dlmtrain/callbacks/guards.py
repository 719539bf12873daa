"""The non-finite guard: stop before a step whose gradients are NaN/inf would ruin the weights."""

from __future__ import annotations

from typing import Iterable

import lightning as L
import torch

from dlmtrain.errors import UserError


class NonFiniteLossError(UserError):
    exit_code = 3


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """One fused reduction and one host sync, however many tensors."""
    ts = [t.detach() for t in tensors if t is not None]
    if not ts:
        return True
    norms = torch._foreach_norm(ts)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


class NonFiniteGuard(L.Callback):
    """Before each optimizer step: are the gradients (and the weights) finite?

    The check runs once per optimizer step (a fused norm over the gradients, one host sync,
    an all-reduce of one flag with several ranks) and logs the norm as ``train/grad_norm``
    (before clipping). If anything is non-finite, all ranks save ``nonfinite-step<N>.ckpt``
    (the finite state before this step: weights, optimizer, data position; for inspection)
    and stop with exit 3, telling how to resume from the newest regular checkpoint.
    Under ``16-mixed`` inf gradients are the loss scaler's business, so only weights are checked.
    """

    def __init__(self, checkpoints, resume_hint: str = ""):
        self.checkpoints = checkpoints
        self.resume_hint = resume_hint
        self._params: list[torch.nn.Parameter] | None = None

    def on_fit_start(self, trainer, pl_module):
        self._params = [p for p in pl_module.parameters() if p.requires_grad]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.detach() for p in self._params if p.grad is not None]
        scaled = str(trainer.precision).startswith("16")
        gnorm = None
        if grads and not scaled:
            gnorm = torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))
            pl_module.log("train/grad_norm", gnorm, on_step=True, on_epoch=False)
        weights_ok = all_finite(self._params)
        ok = weights_ok and (gnorm is None or bool(torch.isfinite(gnorm)))
        if trainer.strategy.reduce_boolean_decision(ok, all=True):
            return
        step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(weights_ok, all=True):
            self.checkpoints.save(trainer, self.checkpoints.last_path)  # raises: weights are not finite
        path = self.checkpoints.dir / f"nonfinite-step{step}.ckpt"
        self.checkpoints.save(trainer, path)
        loss = trainer.callback_metrics.get("train/loss")
        lr = trainer.optimizers[0].param_groups[0]["initial_lr"] if trainer.optimizers else None
        last = self.checkpoints.last_path
        # Resuming from the state right before the failing step recomputes the same non-finite
        # gradients whatever the learning rate, so the way back is an earlier checkpoint.
        if self.checkpoints.last_saved_step is not None or last.exists():
            where = f"resume from {last.name} (the newest checkpoint, {self._step_of(last)}) with a lower learning rate"
        else:
            where = "start again with a lower learning rate (no earlier checkpoint exists)"
        cmd = f"{self.resume_hint or 'the same command'} optim.lr={lr / 10:g}" if lr else "the same command with a lower optim.lr"
        raise NonFiniteLossError(
            f"training diverged at step {step + 1}: the gradients are not finite (last logged loss "
            f"{float(loss) if loss is not None else float('nan'):.4g}). To recover, {where}: run {cmd} "
            f"(changed optim.* settings apply on resume; if it diverges again, point run.resume= at an earlier "
            f"best-*.ckpt). The finite weights right before the failing step are in {path}, for inspection"
        )

    def _step_of(self, path) -> str:
        if self.checkpoints.last_saved_step is not None:
            return f"step {self.checkpoints.last_saved_step}"
        try:
            from dlmtrain.checkpoint.files import inspect

            return f"step {inspect(path).step}"
        except Exception:
            return "unknown step"
