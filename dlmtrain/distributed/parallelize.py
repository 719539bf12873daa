"""What is applied to the backbone from outside, per transformer block: activation
checkpointing, torch.compile and FSDP2 sharding, in that order (torchtitan's order: the
checkpointed forward is what gets compiled, the compiled block is what gets sharded).

The model files know nothing of this. Parameter names never change (no wrapper modules):
checkpointing replaces a block's ``forward`` on the instance, compile is ``Module.compile``
in place, and ``fully_shard`` keeps the module tree. So checkpoints and the EMA read the
same names under every strategy.

Lightning calls the module's ``configure_model`` (dlmtrain/modules/base.py) inside each
fit/validate after the process group and the device mesh exist; it calls the
:class:`Parallelize` set on the module, which acts once.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dlmtrain.errors import ConfigError


def checkpoint_block(block: nn.Module) -> None:
    """Recompute ``block``'s activations in backward instead of storing them (non-reentrant
    checkpointing: works with DDP, FSDP2, ZeRO-3 and compile; RNG state, e.g. dropout, replayed)."""
    inner = block.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def fully_shard_backbone(module: nn.Module, mesh, reshard_after_forward: bool = True, bf16: bool = False) -> None:
    """FSDP2: one ``fully_shard`` unit per transformer block, then the rest of the backbone
    (embedding, final norm, head) as the root unit. ``bf16``: bf16 parameters for compute,
    float32 gradient reduction (the sharded float32 master weights stay float32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    outside = [n for n, p in module.named_parameters() if not n.startswith("backbone.")]
    if outside:  # they would be neither sharded nor gradient-synchronised
        raise ConfigError(f"strategy=fsdp shards the backbone only, but {type(module).__name__} has parameters "
                          f"outside it ({', '.join(outside[:3])}); use a deepspeed strategy or ddp")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in module.backbone.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    fully_shard(module.backbone, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)


class Parallelize:
    """Set as ``module.parallelize`` by :func:`dlmtrain.distributed.prepare`; plain values only
    (the module stays picklable)."""

    def __init__(self, activation_checkpointing: bool = False, compile: bool = False, fsdp: bool = False,
                 reshard_after_forward: bool = True, bf16: bool = False):
        self.activation_checkpointing = activation_checkpointing
        self.compile = compile
        self.fsdp = fsdp
        self.reshard_after_forward = reshard_after_forward
        self.bf16 = bf16

    def __call__(self, module: nn.Module) -> None:
        if getattr(module, "_parallelized", False):  # Lightning calls configure_model in every fit/validate
            return
        blocks = list(module.backbone.blocks)
        if self.activation_checkpointing:
            for b in blocks:
                checkpoint_block(b)
        if self.compile:
            for b in blocks:
                b.compile()
        if self.fsdp:
            fully_shard_backbone(module, module.device_mesh["data_parallel"], self.reshard_after_forward, self.bf16)
        module._parallelized = True
