"""dlmtrain: pretraining diffusion language models at scale."""

from dlmtrain.config import load_config

__version__ = "0.1.0"


def build_module(cfg):
    """The LightningModule for ``cfg.objective.name`` (see dlmtrain/modules/)."""
    from dlmtrain.modules import build_module as _build

    return _build(cfg)


__all__ = ["load_config", "build_module", "__version__"]
