"""Sharded checkpoint directories: written beside their name by every rank, completed by a
manifest, swapped in by rank 0; and read back whole (consolidated) for evaluation.

Layouts (``NAME`` is ``last.ckpt``, ``best-step<N>-nelbo<X>.ckpt``, ...):

DeepSpeed (Lightning's ``engine.save_checkpoint(NAME, tag="checkpoint")``)::

    NAME/latest                                          the tag, "checkpoint"
    NAME/checkpoint/mp_rank_00_model_states.pt           ZeRO-1/2: the weights + everything else (rank 0)
    NAME/checkpoint/zero_pp_rank_<r>_mp_rank_00_model_states.pt   ZeRO-3: rank r's part, with its EMA shard
    NAME/checkpoint/[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt   rank r's float32 weights + Adam state
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
import math
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

# DeepSpeed's own entries in a model-states file (engine.save_checkpoint); the rest is Lightning's client state
DS_ENGINE_KEYS = {"module", "optimizer", "lr_scheduler", "buffer_names", "param_shapes", "frozen_param_shapes",
                  "shared_params", "frozen_param_fragments", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                  "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
                  "ds_version", "checkpoint_parallel_dimensions"}
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


class NotConsolidated(Exception):
    """The optimizer state of a sharded checkpoint cannot be laid out for one process; the message says why."""


def _zero3_full(shards: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A ZeRO-3 parameter from its per-rank partitions (flattened, padded to equal parts), or a
    parameter DeepSpeed kept whole on every rank (then every shard is the whole tensor)."""
    if shards[0].shape == like.shape:
        return shards[0]
    return torch.cat([s.reshape(-1) for s in shards])[: like.numel()].view(like.shape)


def _zero_unflatten(flats: list[list[torch.Tensor]], shapes: list[dict], stage: int, paddings=None) -> dict:
    """Whole tensors by name from ZeRO's flat per-rank partitions (``flats[rank][k]``: flat group k;
    ``shapes[k]``: name -> shape of the parameters in flat group k, in order). The fp32 master
    weights and Adam's moments share this layout.

    ZeRO-1/2: flat group k of all ranks concatenated is the group's parameters back to back
    (plus ``paddings[k][i]`` after parameter i). ZeRO-3: every parameter is split on its own into
    ``world`` equal parts (ceil(numel / world), the last padded); rank r's flat groups hold its
    part of each parameter back to back, in order.
    """
    out = {}
    if stage <= 2:
        for k, group in enumerate(shapes):
            whole, offset = torch.cat([f[k] for f in flats]), 0
            for i, (name, shape) in enumerate(group.items()):
                n = math.prod(shape)
                out[name] = whole.narrow(0, offset, n).view(tuple(shape))
                offset += n + (paddings[k][i] if paddings else 0)
        return out
    world, ranks, offset = len(flats), [torch.cat(list(f)) for f in flats], 0
    for group in shapes:
        for name, shape in group.items():
            n = math.prod(shape)
            part = -(-n // world)
            out[name] = torch.cat([r.narrow(0, offset, part) for r in ranks])[:n].view(tuple(shape))
            offset += part
    return out


def _deepspeed_adam(tag_dir: Path, man: dict, parts: list[dict], weights: dict) -> tuple[dict, list]:
    """(name -> {step, exp_avg, exp_avg_sq}, [(names, hyperparameters) per param group]) from the
    ZeRO optimizer files. The layout is first checked on the fp32 master weights: unflattened the
    same way, they must equal DeepSpeed's own consolidation (``weights``) exactly."""
    world, stage = int(man["world_size"]), int(man.get("stage", 0))
    files = [sorted(tag_dir.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")) for r in range(world)]
    if any(len(f) != 1 for f in files):  # bf16 training names them bf16_zero_pp_rank_...
        raise NotConsolidated(f"not one optimizer file per rank under {tag_dir}")
    files = [f[0] for f in files]
    opts = [torch.load(f, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"] for f in files]
    base = [o.get("base_optimizer_state" if stage <= 2 else "optimizer_state_dict") for o in opts]
    if not all(isinstance(b, dict) and "state" in b and "param_groups" in b for b in base):
        raise NotConsolidated("its ZeRO optimizer files hold no torch optimizer state dict (elastic or offloaded "
                              "layout)")
    shapes = [{n.removeprefix("_forward_module."): s for n, s in g.items()} for g in parts[0]["param_shapes"]]
    masters = [o["single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"] for o in opts]
    paddings = opts[0].get("param_alignment_paddings") if stage <= 2 else None
    if any(len(m) != len(shapes) for m in masters):
        raise NotConsolidated(f"{len(masters[0])} flat groups for {len(shapes)} parameter groups")
    mine = _zero_unflatten(masters, shapes, stage, paddings)
    aliases = set(parts[0].get("buffer_names", [])) | set(parts[0].get("shared_params", {}))  # a tied head
    if set(mine) != {n for n in weights if n not in aliases} or \
            any(not torch.equal(v, weights[n]) for n, v in mine.items()):
        raise NotConsolidated("its ZeRO partition layout is not the one dlmtrain reads (the master weights do not "
                              "match DeepSpeed's consolidation)")
    moments = {}
    for key in ADAM_KEYS:
        flats = [[b["state"][k][key] for k in range(len(shapes))] for b in base]
        for name, t in _zero_unflatten(flats, shapes, stage, paddings).items():
            moments.setdefault(name, {})[key] = t.clone()
    groups = []
    for g in base[0]["param_groups"]:
        names = [n for k in g["params"] for n in shapes[k]]
        step = base[0]["state"][g["params"][0]]["step"] if g["params"] else 0
        for n in names:
            moments[n]["step"] = torch.as_tensor(float(step), dtype=torch.float32)
        groups.append((names, g))
    return moments, groups


def _fsdp_adam(path: Path) -> tuple[dict, list]:
    """(name -> {step, exp_avg, exp_avg_sq}, [(names, hyperparameters) per param group]) from the
    DCP entry ``optimizer_0`` (torch's get_optimizer_state_dict: keyed by parameter name)."""
    import warnings

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        opt = _load_state_dict_from_keys({"optimizer_0"}, checkpoint_id=str(path))["optimizer_0"]
    return dict(opt["state"]), [(list(g["params"]), g) for g in opt["param_groups"]]


def one_process_adamw(config_yaml: str, where: str, moments: dict, groups: list) -> dict:
    """The AdamW ``state_dict()`` one process holds for these moments: parameter indices in the
    order of the module's ``configure_optimizers`` (which Lightning restores into), each group's
    hyperparameters (lr, betas, weight decay, initial_lr) as saved. Checked by loading it into
    that optimizer. Raises NotConsolidated when groups or shapes differ."""
    from dlmtrain.config import config_from_resolved
    from dlmtrain.modules import build_module

    module = build_module(config_from_resolved(config_yaml, where=where))
    opt = module.configure_optimizers()["optimizer"]
    name_of = {id(p): n for n, p in module.named_parameters()}
    if len(groups) != len(opt.param_groups):
        raise NotConsolidated(f"{len(groups)} parameter groups, the module's AdamW has {len(opt.param_groups)}")
    state, out, i = {}, [], 0
    for g, (group, (names, saved)) in enumerate(zip(opt.param_groups, groups)):
        mine = [name_of[id(p)] for p in group["params"]]
        if sorted(mine) != sorted(names):
            raise NotConsolidated(f"parameter group {g} holds other parameters than the module's")
        ids = []
        for p, n in zip(group["params"], mine):
            if n in moments:  # absent: the parameter never had a gradient, as in a single process
                m = moments[n]
                if any(tuple(m[k].shape) != tuple(p.shape) for k in ADAM_KEYS):
                    raise NotConsolidated(f"the Adam state of {n} has shape {tuple(m['exp_avg'].shape)}, the "
                                          f"parameter {tuple(p.shape)}")
                state[i] = {"step": torch.as_tensor(float(m["step"]), dtype=torch.float32),
                            **{k: m[k].float().contiguous() for k in ADAM_KEYS}}
            ids.append(i)
            i += 1
        out.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    sd = {"state": state, "param_groups": out}
    try:
        opt.load_state_dict(sd)
    except (ValueError, KeyError, RuntimeError) as e:
        raise NotConsolidated(f"torch's AdamW refuses it ({str(e).splitlines()[0][:120]})") from None
    return sd


def _read_deepspeed(path: Path, man: dict, optimizer: bool) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = path / DS_TAG
    if man.get("stage") == 3:
        parts = [torch.load(tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False) for r in range(int(man["world_size"]))]
    else:
        parts = [torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)]
    ck = {k: v for k, v in parts[0].items() if k not in DS_ENGINE_KEYS}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)
    state = {k.removeprefix("_forward_module."): v for k, v in state.items()}
    ck["state_dict"] = state
    if ck.get("ema") and man.get("stage") == 3:
        shadows = [p["ema"]["shadow"] for p in parts]
        ck["ema"] = {**ck["ema"], "shadow": {n: _zero3_full([s[n] for s in shadows], ck["state_dict"][f"backbone.{n}"])
                                             for n in shadows[0]}}
    if optimizer:
        _attach_adamw(ck, path, lambda: _deepspeed_adam(tag_dir, man, parts, state))
    return ck


def _read_fsdp(path: Path, optimizer: bool) -> dict:
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
    if optimizer:
        _attach_adamw(ck, path, lambda: _fsdp_adam(path))
    return ck


def _attach_adamw(ck: dict, path: Path, read) -> None:
    """``ck["optimizer_states"]``: the consolidated AdamW state, or ``ck["optimizer_left_out"]``: why not."""
    try:
        moments, groups = read()
        ck["optimizer_states"] = [one_process_adamw(ck["dlmtrain_config"], str(path), moments, groups)]
    except NotConsolidated as e:
        ck["optimizer_left_out"] = str(e)
    except Exception as e:  # noqa: BLE001 - an optimizer file this reader does not understand: say so, keep the rest
        ck["optimizer_left_out"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def read_whole(path: str | Path, optimizer: bool = False) -> dict:
    """A sharded checkpoint directory as one checkpoint dict (``state_dict`` in float32, full
    ``ema`` shadow, ``dlmtrain_config``, ``global_step``, loops, LR schedule, ...), as a
    single-file one would hold. Raises BadCheckpoint.

    ``optimizer=True`` adds ``optimizer_states``: the AdamW state consolidated for one process
    (see :func:`one_process_adamw`); where that cannot be done faithfully, no optimizer state and
    ``optimizer_left_out`` saying why.
    """
    path = Path(path)
    man = read_manifest(path)
    try:
        if man["strategy"] == "deepspeed":
            return _read_deepspeed(path, man, optimizer)
        if man["strategy"] == "fsdp":
            return _read_fsdp(path, optimizer)
    except BadCheckpoint:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged shard; say which checkpoint
        raise BadCheckpoint(f"{path}: cannot consolidate the sharded checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    raise BadCheckpoint(f"{path}: unknown sharded checkpoint format {man['strategy']!r}")
