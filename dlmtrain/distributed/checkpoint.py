"""Sharded checkpoint directories: written beside their name by every rank, completed by a
manifest, swapped in by rank 0; and read back whole (consolidated) for evaluation.

Layouts (``NAME`` is ``last.ckpt``, ``best-step<N>-nelbo<X>.ckpt``, ...):

DeepSpeed (Lightning's ``engine.save_checkpoint(NAME, tag="checkpoint")``)::

    NAME/latest                                          the tag, "checkpoint"
    NAME/checkpoint/mp_rank_00_model_states.pt           ZeRO-1/2: the weights + everything else (rank 0)
    NAME/checkpoint/zero_pp_rank_<r>_mp_rank_00_model_states.pt   ZeRO-3: rank r's part, with its EMA shard
    NAME/checkpoint/zero_pp_rank_<r>_mp_rank_00_optim_states.pt   rank r's float32 weights + Adam state
    NAME/zero_to_fp32.py                                 DeepSpeed's own consolidation script

FSDP2 (torch.distributed.checkpoint)::

    NAME/.metadata, NAME/__<r>_0.distcp    sharded: weights ("state_dict."), Adam state ("optimizer_0."),
                                           EMA ("ema.") as DTensors: they load on any number of ranks
    NAME/meta.pt                           everything else (loops, data position, config), rank 0

Both: ``NAME/dlmtrain.json`` (dlmtrain.checkpoint.files.MANIFEST), written last.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch

from dlmtrain.checkpoint.files import MANIFEST, BadCheckpoint, read_manifest, remove_path, replace_path, temp_name

DS_TAG = "checkpoint"
FSDP_META = "meta.pt"


def write_manifest(path: Path, checkpoint: dict, strategy: str, stage: int, world_size: int) -> None:
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    man = {
        "format": "dlmtrain sharded checkpoint", "version": 1, "strategy": strategy, "stage": stage,
        "world_size": world_size, "global_step": int(checkpoint.get("global_step", 0)),
        "dlmtrain_config": checkpoint.get("dlmtrain_config"), "files": files,
    }
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(man, indent=1))
    os.replace(tmp, path / MANIFEST)


class DirectoryCheckpoints:
    """Mixin for a Lightning strategy whose checkpoint is a directory written by every rank.

    ``_write_shards(checkpoint, tmp)`` (the strategy's) writes into ``tmp`` on every rank; the
    directory then gets its manifest and replaces ``filepath`` (rank 0), so a reader never sees
    a partial checkpoint under the final name.
    """

    dlm_strategy = "?"
    dlm_stage = 0

    def _save_directory(self, checkpoint: dict, filepath) -> None:
        final = Path(self.broadcast(os.fspath(filepath)))
        tmp = Path(self.broadcast(temp_name(final)))  # rank 0's name: its pid judges a leftover stale
        if self.is_global_zero:
            remove_path(tmp)
            final.parent.mkdir(parents=True, exist_ok=True)
        self.barrier()
        self._write_shards(checkpoint, tmp)
        self.barrier()
        if self.is_global_zero:
            write_manifest(tmp, checkpoint, self.dlm_strategy, self.dlm_stage, self.world_size)
            replace_path(tmp, final)
        self.barrier()


# ----------------------------------------------------------------------------- reading whole


def _zero3_full(shards: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A ZeRO-3 parameter from its per-rank partitions (flattened, padded to equal parts), or a
    parameter DeepSpeed kept whole on every rank (then every shard is the whole tensor)."""
    if shards[0].shape == like.shape:
        return shards[0]
    return torch.cat([s.reshape(-1) for s in shards])[: like.numel()].view(like.shape)


def _read_deepspeed(path: Path, man: dict) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = path / DS_TAG
    if man.get("stage") == 3:
        parts = [torch.load(tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False) for r in range(int(man["world_size"]))]
    else:
        parts = [torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)]
    ck = {k: v for k, v in parts[0].items() if k not in ("module", "optimizer", "lr_scheduler")}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)
    ck["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in state.items()}
    if ck.get("ema") and man.get("stage") == 3:
        shadows = [p["ema"]["shadow"] for p in parts]
        ck["ema"]["shadow"] = {n: _zero3_full([s[n] for s in shadows], ck["state_dict"][f"backbone.{n}"])
                               for n in shadows[0]}
    return ck


def _read_fsdp(path: Path) -> dict:
    import torch.distributed.checkpoint as dcp

    from dlmtrain.config import config_from_resolved
    from dlmtrain.modules import build_module

    ck = torch.load(path / FSDP_META, map_location="cpu", weights_only=False)
    module = build_module(config_from_resolved(ck["dlmtrain_config"], where=str(path)))
    want = {"state_dict": module.state_dict()}
    if ck.get("ema"):
        want["ema"] = {n: p.detach().float().clone() for n, p in module.backbone.named_parameters()}
    dcp.load(want, checkpoint_id=path, no_dist=True)
    ck["state_dict"] = want["state_dict"]
    if ck.get("ema"):
        ck["ema"]["shadow"] = want["ema"]
    return ck


def read_whole(path: str | Path) -> dict:
    """A sharded checkpoint directory as one checkpoint dict (``state_dict`` in float32, full
    ``ema`` shadow, ``dlmtrain_config``, ``global_step``, ...), as a single-file one would hold;
    no optimizer state. Raises BadCheckpoint."""
    path = Path(path)
    man = read_manifest(path)
    try:
        if man["strategy"] == "deepspeed":
            return _read_deepspeed(path, man)
        if man["strategy"] == "fsdp":
            return _read_fsdp(path)
    except BadCheckpoint:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged shard; say which checkpoint
        raise BadCheckpoint(f"{path}: cannot consolidate the sharded checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    raise BadCheckpoint(f"{path}: unknown sharded checkpoint format {man['strategy']!r}")
