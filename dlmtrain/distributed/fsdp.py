"""FSDP2 through Lightning's ModelParallelStrategy (data parallel only), on GPU (NCCL) and CPU (gloo).

Sharding itself is applied from outside the model in ``configure_model``
(dlmtrain/distributed/parallelize.py). This strategy adds to Lightning's:
- checkpoints are torch.distributed.checkpoint directories written beside their name and
  swapped in (DirectoryCheckpoints), holding the weights, the Adam state and the EMA as
  DTensors, so each rank writes its own shard and a checkpoint loads on any number of ranks;
- the EMA keeps this rank's shard of every parameter (dlmtrain/modules/ema.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from dlmtrain.distributed.checkpoint import FSDP_META, DirectoryCheckpoints


def _ema_dtensors(module, shadow: dict[str, torch.Tensor]) -> dict:
    """This rank's EMA shards as DTensors laid out like their parameters."""
    from torch.distributed.tensor import DTensor

    params = dict(module.backbone.named_parameters())
    return {n: DTensor.from_local(t.to(params[n].device), params[n].device_mesh, params[n].placements,
                                  shape=params[n].shape, stride=params[n].stride(), run_check=False)
            for n, t in shadow.items()}


class FSDP2Strategy(DirectoryCheckpoints, ModelParallelStrategy):
    dlm_strategy = "fsdp"
    shards_parameters = True  # a forward needs every rank

    def __init__(self, world_size: int, **kwargs):
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=True,
                         **kwargs)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        ema = getattr(self.lightning_module, "ema", None)
        if ema is not None:
            ema.rebind(self.lightning_module.backbone)  # keep only this rank's shards

    # ---- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        self._save_directory(checkpoint, filepath)

    def _write_shards(self, checkpoint: dict, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        meta = dict(checkpoint)
        state = {"state_dict": meta.pop("state_dict")}
        for i, opt_state in enumerate(meta.pop("optimizer_states", [])):
            state[f"optimizer_{i}"] = opt_state
        if meta.get("ema"):
            meta["ema"] = dict(meta["ema"])
            state["ema"] = _ema_dtensors(self.lightning_module, meta["ema"].pop("shadow"))
        path.mkdir(parents=True, exist_ok=True)
        dcp.save(state, checkpoint_id=path)
        if self.is_global_zero:
            torch.save(meta, path / FSDP_META)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        module = self.lightning_module
        meta = torch.load(path / FSDP_META, map_location="cpu", weights_only=False)
        state = {"state_dict": get_model_state_dict(self.model)}
        for i, opt in enumerate(self.optimizers):
            state[f"optimizer_{i}"] = get_optimizer_state_dict(self.model, opt)
        ema = getattr(module, "ema", None)
        if meta.get("ema") and ema is not None:
            state["ema"] = _ema_dtensors(module, {n: torch.empty_like(t) for n, t in ema.shadow.items()})
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.model, state["state_dict"])
        for i, opt in enumerate(self.optimizers):
            set_optimizer_state_dict(self.model, opt, optim_state_dict=state[f"optimizer_{i}"])
        if "ema" in state:
            meta["ema"] = {**meta["ema"], "shadow": {n: t.to_local() for n, t in state["ema"].items()}}
        return meta
