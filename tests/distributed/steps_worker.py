"""Train a few steps of the tiny MDLM on fixed in-memory global batches under one strategy;
used by tests/distributed/test_equivalence.py (run as a script: Lightning relaunches it once
per extra rank).

    python tests/distributed/steps_worker.py OUT_DIR DEVICES [override ...]

``fit(out, devices, overrides, resume=CKPT, steps=N)`` (imported, one process) continues a
checkpoint to step N on the global batches of the steps it has not trained.

Global batch ``s`` is ``GLOBAL`` rows drawn from ``Generator(seed=s)``; micro-batch slot
``j * world + rank`` (the order of dlmtrain's step_generator) gets rows ``slot*m:(slot+1)*m``,
so 1 process accumulating and ``world`` processes see the same global batch with the same
noise. Rank 0 writes OUT_DIR/steps.json: per step the loss averaged over the global batch
and the logged ``train/grad_norm``; a fixed batch's NELBO under the raw weights, the EMA
swapped in, and the raw weights swapped back; and OUT_DIR/final.ckpt (a file or a sharded directory).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's dlmtrain, not an installed one

from dlmtrain import load_config
from dlmtrain.callbacks.guards import NonFiniteGuard
from dlmtrain.config import batch_split
from dlmtrain.distributed import check, prepare
from dlmtrain.launch.slurm import cluster_plugins
from dlmtrain.modules import build_module

GLOBAL, SEQ, STEPS = 8, 32, 3


class FixedBatches(L.LightningDataModule):
    def __init__(self, micro: int, accum: int, steps: int):
        super().__init__()
        self.micro, self.accum, self.steps = micro, accum, steps

    def train_dataloader(self):  # built after a resumed checkpoint is restored: from its step on
        rank, world = self.trainer.global_rank, self.trainer.world_size
        out = []
        for s in range(self.trainer.global_step, self.steps):
            rows = torch.randint(0, 256, (GLOBAL, SEQ), generator=torch.Generator().manual_seed(s))
            for j in range(self.accum):
                slot = j * world + rank
                out.append({"input_ids": rows[slot * self.micro:(slot + 1) * self.micro]})
        # no length, as dlmtrain's streams: a resumed epoch keeps its micro-batch count, which places the steps
        return torch.utils.data.DataLoader(Stream(out), batch_size=None)


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, items: list):
        self.items = items

    def __iter__(self):
        return iter(self.items)


class Record(L.Callback):
    """Per optimizer step: the global-batch mean loss (micro-batch losses averaged here, then
    over ranks) and the grad norm the non-finite guard logged."""

    def __init__(self):
        self.losses, self.norms, self._micro = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._micro.append(pl_module._last_loss)
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            local = torch.stack(self._micro).mean()
            self.losses.append(float(trainer.strategy.reduce(local, reduce_op="mean")))
            self.norms.append(float(trainer.callback_metrics["train/grad_norm"]))
            self._micro = []


def fit(out: Path, devices: int, overrides: list[str], resume: str | None = None, steps: int = STEPS) -> dict:
    cfg = load_config("configs/demo.yaml", [
        f"trainer.devices={devices}", f"trainer.global_batch_size={GLOBAL}", f"data.seq_len={SEQ}",
        "model.vocab_size=260", "objective.antithetic=false",
        "trainer.micro_batch_size=4", "optim.warmup_steps=0", "optim.lr=1e-2", "optim.grad_clip=1.0", *overrides])
    nodes = int(cfg.trainer.num_nodes)  # > 1: one process per "node", started with the environment Slurm gives
    world = devices * nodes
    micro, accum = batch_split(GLOBAL, int(cfg.trainer.micro_batch_size), world)
    check(cfg, world, "32-true")
    L.seed_everything(0, verbose=False)
    module = build_module(cfg)
    inner = module.training_step

    def training_step(batch, batch_idx):
        loss = inner(batch, batch_idx)
        module._last_loss = loss.detach()
        return loss

    module.training_step = training_step
    parallel = prepare(cfg, module, world, micro, "32-true")
    rec = Record()
    trainer = L.Trainer(accelerator="cpu", devices=devices, num_nodes=nodes, plugins=cluster_plugins(),
                        precision="32-true", max_steps=steps,
                        accumulate_grad_batches=accum, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[NonFiniteGuard(checkpoints=None), rec], **parallel)
    trainer.fit(module, datamodule=FixedBatches(micro, accum, steps), ckpt_path=resume)
    raw, ema, raw_after = probe(module, None), probe(module, module.ema), probe(module, None)
    trainer.save_checkpoint(out / "final.ckpt")
    result = {"loss": rec.losses, "grad_norm": rec.norms, "probe_raw": raw, "probe_ema": ema,
              "probe_raw_after": raw_after, "step": trainer.global_step, "world_size": trainer.world_size,
              "node_rank": trainer.node_rank,
              "environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__}
    if trainer.is_global_zero:
        (out / "steps.json").write_text(json.dumps(result))
    return result


def main() -> None:
    torch.set_num_threads(1)
    fit(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])


@torch.no_grad()
def probe(module, ema) -> float:
    """The summed NELBO draws of a fixed batch with fixed noise, with the EMA swapped in (as
    validation does; every rank takes part when parameters are sharded) or the raw weights."""
    x = torch.randint(0, 256, (4, SEQ), generator=torch.Generator().manual_seed(99))
    if ema is not None:
        ema.swap_in(module.backbone)
    try:
        nats, _ = module.nelbo_draws(x, num_samples=2, generator=torch.Generator().manual_seed(123))
    finally:
        if ema is not None:
            ema.swap_out(module.backbone)
    return float(nats.sum())


if __name__ == "__main__":
    main()
