"""dlmtrain: pretraining diffusion language models at scale."""

from dlmtrain.config import load_config

__version__ = "0.1.0"


def build_module(cfg):
    """The LightningModule for ``cfg.objective.name`` (see dlmtrain/modules/)."""
    from dlmtrain.modules import build_module as _build

    return _build(cfg)


def load_checkpoint(path, ema: bool = True, map_location="cpu", overrides=None):
    """The trained module stored in a dlmtrain checkpoint, in eval mode (see dlmtrain/checkpoint/)."""
    from dlmtrain.checkpoint import load_checkpoint as _load

    return _load(path, ema=ema, map_location=map_location, overrides=overrides)


def load_pretrained(path, map_location="cpu", dtype=None, overrides=None):
    """The module stored in an export directory (``dlmtrain convert CKPT DST --to safetensors``), in
    eval mode, with ``module.tokenizer`` attached (see dlmtrain/checkpoint/export.py)."""
    from dlmtrain.checkpoint.export import load_pretrained as _load

    return _load(path, map_location=map_location, dtype=dtype, overrides=overrides)


__all__ = ["load_config", "build_module", "load_checkpoint", "load_pretrained", "__version__"]
