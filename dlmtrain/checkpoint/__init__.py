"""Checkpoints: loading a trained model in one call, and the files of a run directory.

    import dlmtrain
    module = dlmtrain.load_checkpoint("runs/demo/checkpoints/last.ckpt")   # EMA weights, eval mode
    nll = module.nelbo(input_ids)
"""

from __future__ import annotations

from pathlib import Path

from dlmtrain.errors import ConfigError


def load_checkpoint(path: str | Path, ema: bool = True, map_location="cpu", overrides: list[str] | None = None):
    """The LightningModule stored in a dlmtrain ``.ckpt``, in eval mode.

    ``ema=True`` loads the exponential moving average of the weights when the checkpoint
    has one (what validation reports); ``ema=False`` the raw training weights.
    ``module.weights`` says which were loaded. ``overrides`` (``key=value``) may change
    settings that do not alter the weights, e.g. ``model.attn_backend=sdpa``.

    ``path`` may be a sharded checkpoint directory (strategy=deepspeed_* or fsdp): it is
    consolidated in memory (weights in float32, the EMA from every rank's shards).
    """
    import torch

    from dlmtrain.checkpoint.files import BadCheckpoint, inspect
    from dlmtrain.config import config_from_resolved
    from dlmtrain.modules import build_module

    try:
        info = inspect(path)
        if info.sharded:
            from dlmtrain.distributed.checkpoint import read_whole

            ck = read_whole(path)
        else:
            ck = torch.load(path, map_location=map_location, weights_only=False)
    except BadCheckpoint as e:
        raise ConfigError(str(e)) from None
    if not ck.get("dlmtrain_config"):
        raise ConfigError(f"{path} was not written by dlmtrain (it has no dlmtrain_config)")
    cfg = config_from_resolved(ck["dlmtrain_config"], overrides, where=str(path))
    module = build_module(cfg)
    try:
        module.load_state_dict(ck["state_dict"])
    except RuntimeError as e:  # weights of another shape or architecture than the config describes
        raise ConfigError(f"{path}: the weights do not match the model its config describes "
                          f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    module.weights = "raw"
    if ema and ck.get("ema"):
        shadow = ck["ema"]["shadow"]
        with torch.no_grad():
            for name, p in module.backbone.named_parameters():
                if name in shadow:
                    p.copy_(shadow[name].to(p.device, p.dtype))
        module.weights = "ema"
    module.global_step_loaded = int(ck["global_step"])
    return module.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


__all__ = ["load_checkpoint"]
