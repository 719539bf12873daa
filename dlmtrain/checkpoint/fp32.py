"""`dlmtrain convert SRC DST --to fp32`: a sharded checkpoint directory (DeepSpeed ZeRO-1/2/3,
FSDP2; layouts in dlmtrain/distributed/checkpoint.py) -> ONE float32 Lightning ``.ckpt`` that
one process continues from and every tool reads like any other ``.ckpt``.

What the file holds, under the keys a single-process checkpoint uses:

- ``state_dict``: the weights in float32 (ZeRO: its fp32 master weights, also after bf16 training).
- ``ema``: the EMA of every parameter, whole (ZeRO-3 / FSDP2 kept one shard per rank).
- ``optimizer_states``: the AdamW state consolidated for one process (step, exp_avg, exp_avg_sq of
  every parameter; the groups' lr, betas, weight decay as saved), so training continues as an
  unsharded run would. Where that cannot be done faithfully (a ZeRO layout it does not recognise:
  elastic or offloaded optimizer files), it is left out: a fresh AdamW state (moments zero, the
  saved learning rates) and the printout says so.
- ``lr_schedulers``, ``loops``, ``callbacks``, the data position, ``global_step``, ``epoch``,
  ``dlmtrain_config``: as saved, so a resume continues at the same step with the same schedule.
  One change: the loops' micro-batch counters are rescaled to one process's gradient accumulation
  (``trainer.global_batch_size / micro_batch_size``), which Lightning uses to place the optimizer
  steps and validations. DeepSpeed's own bookkeeping is dropped.

The write is atomic (``DST.tmp-<host>-<pid>``, renamed); an existing DST is replaced only with --force.
"""

from __future__ import annotations

from pathlib import Path

from dlmtrain.errors import ConfigError


def _rescale_loops(ck: dict, world: int) -> str | None:
    """Micro-batch counters of the fit loop for one process; returns what changed (or None)."""
    from omegaconf import OmegaConf

    from dlmtrain.config import batch_split

    try:
        t = OmegaConf.create(ck["dlmtrain_config"]).trainer
        gb, micro = int(t.global_batch_size), int(t.micro_batch_size)
        was, now = batch_split(gb, micro, world)[1], batch_split(gb, micro, 1)[1]
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError):
        return None
    from dlmtrain.checkpoint.compat import rescale_micro_batches

    if not rescale_micro_batches(ck, was, now):
        return None
    factor = f"{now // was}" if now % was == 0 else f"{now}/{was}"
    return f"micro-batch counters x{factor} (gradient accumulation {was} on {world} ranks -> {now} on 1)"


def consolidate(src: str | Path, dst: str | Path, force: bool = False, say=print) -> Path:
    """A sharded checkpoint directory -> one float32 Lightning checkpoint file (see the module doc)."""
    from dlmtrain.callbacks.checkpoint_io import AtomicCheckpointIO
    from dlmtrain.checkpoint.export import check_destination
    from dlmtrain.checkpoint.files import BadCheckpoint, inspect
    from dlmtrain.config import config_from_resolved
    from dlmtrain.distributed.checkpoint import read_whole
    from dlmtrain.modules import build_module

    dst = check_destination(dst, force)
    try:
        info = inspect(src)
        ck = read_whole(src, optimizer=True)
    except BadCheckpoint as e:
        raise ConfigError(str(e)) from None
    if not ck.get("dlmtrain_config"):
        raise ConfigError(f"{src} was not written by dlmtrain (it has no dlmtrain_config)")
    module = build_module(config_from_resolved(ck["dlmtrain_config"], where=str(src)))
    try:  # the weights must be the model the config describes, or nothing can load the result
        module.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise ConfigError(f"{src}: the weights do not match the model its config describes "
                          f"({lines[1].strip() if len(lines) > 1 else e})") from None
    ck["state_dict"] = {k: v.detach().float().contiguous() if v.is_floating_point() else v
                        for k, v in ck["state_dict"].items()}
    if ck.get("ema"):
        ck["ema"] = {**ck["ema"], "shadow": {n: t.float().contiguous() for n, t in ck["ema"]["shadow"].items()}}
    left_out = ck.pop("optimizer_left_out", None)
    if left_out is not None:  # Lightning resumes only with an optimizer state: a fresh one at the saved lr
        fresh = module.configure_optimizers()["optimizer"].state_dict()
        saved = ck.get("lr_schedulers") and ck["lr_schedulers"][0].get("_last_lr")
        for g, lr in zip(fresh["param_groups"], saved or []):
            g["lr"] = lr
        ck["optimizer_states"] = [fresh]
    loops = _rescale_loops(ck, info.world_size)
    AtomicCheckpointIO().save_checkpoint(ck, dst)
    opt = (f"AdamW state LEFT OUT ({left_out}): a resumed run starts a fresh AdamW state (zero moments) at step "
           f"{info.step}" if left_out is not None else "AdamW state consolidated")
    say(f"[dlmtrain] wrote {dst}: step {info.step} of {info.describe()} as one float32 checkpoint (weights, "
        f"{'EMA, ' if ck.get('ema') else ''}{opt}{'; ' + loops if loops else ''}); continue on one process with "
        f"`dlmtrain train CONFIG run.resume={dst}` (strategy=auto)")
    return dst
