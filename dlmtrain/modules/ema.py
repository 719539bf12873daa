"""Exponential moving average of weights, stored by parameter name.

Stored by name (not by position, as some peers do) so a checkpoint's EMA survives
reordering, added parameters and conversion tools that read it without the model.

Under sharded training each rank keeps the EMA of the part of each parameter it holds
(:func:`local_shard`): the local shard of an FSDP2 DTensor, the ZeRO-3 partition of a
DeepSpeed parameter (flattened and padded), or the whole tensor otherwise. Updates and
swaps are then purely local, and each rank saves its EMA with its shard of the weights
(dlmtrain/distributed/). ``rebind`` re-takes the shards once the strategy has sharded
the model (the EMA is created before, at step 0, where it equals the weights).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """The part of parameter ``p`` this process holds and updates in place.

    DeepSpeed ZeRO-3: the partition ``ds_tensor`` (what its optimizer updates; a forward
    gathers from it). FSDP2: the DTensor's local shard. Anything else: ``p`` itself.
    """
    if getattr(p, "ds_tensor", None) is not None:
        return p.ds_tensor
    local = getattr(p, "_local_tensor", None)  # a DTensor (FSDP2)
    return p.detach() if local is None else local


def _drop_gathered(model: nn.Module) -> None:
    """Drop gathered (whole) copies of sharded parameters, so the next forward gathers the
    shards that were swapped: FSDP2 may keep them after a forward (the root module, or
    reshard_after_forward=false), ZeRO-3 keeps small ("persistent") parameters whole."""
    zero3 = [p for p in model.parameters()
             if getattr(p, "ds_tensor", None) is not None and p.ds_status.name == "AVAILABLE"]
    if zero3:
        zero3[0].partition(param_list=zero3)  # frees the whole copies; the partitions stay
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch: no FSDP2
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = self._take(model)
        self.num_updates = 0
        self._backup: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _take(model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: local_shard(p).detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def rebind(self, model: nn.Module) -> None:
        """After the strategy sharded ``model``: keep the EMA of this rank's shards. Only at the
        start (no update yet), where the EMA equals the weights; later it would lose the average."""
        shards = {n: local_shard(p) for n, p in model.named_parameters() if n in self.shadow}
        if all(s.shape == self.shadow[n].shape for n, s in shards.items()):
            return
        if self.num_updates:
            raise RuntimeError("the model was sharded after the EMA had been updated; its average would be lost")
        self.shadow = self._take(model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        # Warm-up as in Polyak averaging with a growing horizon: early EMA tracks the weights.
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for n, p in model.named_parameters():
            if n in self.shadow:
                s, w = self.shadow[n], local_shard(p)
                if s.device != w.device:
                    s = self.shadow[n] = s.to(w.device)
                s.lerp_(w.float(), 1.0 - d)

    @torch.no_grad()
    def swap_in(self, model: nn.Module) -> None:
        """Load the EMA weights into ``model``, keeping the training weights aside."""
        if self._backup is not None:
            return
        _drop_gathered(model)
        self._backup = {}
        for n, p in model.named_parameters():
            if n in self.shadow:
                w = local_shard(p)
                self._backup[n] = w.clone()
                w.copy_(self.shadow[n].to(w.device, w.dtype))

    @torch.no_grad()
    def swap_out(self, model: nn.Module) -> None:
        """Put the training weights back."""
        if self._backup is None:
            return
        _drop_gathered(model)
        for n, p in model.named_parameters():
            if n in self._backup:
                local_shard(p).copy_(self._backup[n])
        self._backup = None

    @property
    def active(self) -> bool:
        return self._backup is not None

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """Temporarily load the EMA weights into ``model`` (validation, sampling)."""
        was_active = self.active
        self.swap_in(model)
        try:
            yield
        finally:
            if not was_active:
                self.swap_out(model)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        for n in self.shadow:
            if state["shadow"][n].shape != self.shadow[n].shape:
                raise ValueError(f"EMA of {n} has shape {tuple(state['shadow'][n].shape)}, this rank holds "
                                 f"{tuple(self.shadow[n].shape)}: saved with another sharding (world size)")
        self.num_updates = int(state["num_updates"])
        for n in self.shadow:
            self.shadow[n] = state["shadow"][n].float().to(self.shadow[n].device)
