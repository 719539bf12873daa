"""The non-finite guard: stop before a step whose gradients are NaN/inf would ruin the weights."""

from __future__ import annotations

from typing import Iterable

import lightning as L
import torch

from dlmtrain.errors import UserError
from dlmtrain.modules.ema import local_shard


class NonFiniteLossError(UserError):
    exit_code = 3


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """One fused reduction and one host sync, however many tensors (this rank's shards of sharded ones)."""
    ts = [local_shard(t).detach() for t in tensors if t is not None]
    ts = [t for t in ts if t.numel()]
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

    Sharded gradients: FSDP2's are DTensor shards (the norm sums the shards over ranks);
    DeepSpeed ZeRO keeps them in its own partitioned buffers, so its overflow check (one
    all-reduce) decides, and the norm it computes in its step is logged after the step.
    """

    def __init__(self, checkpoints, resume_hint: str = ""):
        self.checkpoints = checkpoints
        self.resume_hint = resume_hint
        self._params: list[torch.nn.Parameter] | None = None

    def on_fit_start(self, trainer, pl_module):
        self._params = [p for p in pl_module.parameters() if p.requires_grad]

    def _grad_norm(self, optimizer) -> torch.Tensor | None:
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return None
        local = [local_shard(g).detach() for g in grads]
        sq = torch.stack([n.float() for n in torch._foreach_norm(local)]).square().sum()
        if any(hasattr(g, "_local_tensor") for g in grads):  # DTensor (FSDP2) shards: sum over ranks
            torch.distributed.all_reduce(sq)
        return sq.sqrt()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        scaled = str(trainer.precision).startswith("16")
        gnorm, grads_ok = None, True
        if hasattr(optimizer, "has_overflow"):  # DeepSpeed ZeRO
            engine = trainer.strategy.model
            if hasattr(engine, "is_gradient_accumulation_boundary") and not engine.is_gradient_accumulation_boundary():
                # DeepSpeed accumulates inside its engine, so Lightning calls this hook after every
                # micro-batch; ZeRO's reduced gradients exist only at the boundary (before it: KeyError)
                return
            grads_ok = scaled or not optimizer.has_overflow()
        elif not scaled:
            gnorm = self._grad_norm(optimizer)
            if gnorm is not None:
                pl_module.log("train/grad_norm", gnorm, on_step=True, on_epoch=False)
        weights_ok = all_finite(self._params)
        ok = weights_ok and grads_ok and (gnorm is None or bool(torch.isfinite(gnorm)))
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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None and getattr(self, "_logged_step", None) != trainer.global_step:
            self._logged_step = trainer.global_step
            norm = engine.get_global_grad_norm()  # of the step just taken, before clipping
            if norm is not None and trainer.global_step > 0:
                pl_module.log("train/grad_norm", float(norm), on_step=True, on_epoch=False)

    def _step_of(self, path) -> str:
        if self.checkpoints.last_saved_step is not None:
            return f"step {self.checkpoints.last_saved_step}"
        try:
            from dlmtrain.checkpoint.files import inspect

            return f"step {inspect(path).step}"
        except Exception:
            return "unknown step"
