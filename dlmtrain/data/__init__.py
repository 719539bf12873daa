"""Data: tokenizer wrapper, shard format, streaming DataModule with a resumable position.

    from dlmtrain.data import build_datamodule
    dm = build_datamodule(cfg, micro_batch_size)

``cfg.data.manifest`` names a manifest written by ``python -m data_prep`` (a path, a
directory holding manifest.json, or a URL webdataset's gopen opens); empty means the
embedded default corpus (see dlmtrain/data/default.py).

Submodules import lazily, so data_prep can use the format and tokenizer without
importing torch or Lightning.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ShardDataModule": "dlmtrain.data.datamodule",
    "DataMetrics": "dlmtrain.data.datamodule",
    "dist_info": "dlmtrain.data.datamodule",
    "read_manifest": "dlmtrain.data.format",
    "Tokenizer": "dlmtrain.data.tokenizer",
    "ByteTokenizer": "dlmtrain.data.tokenizer",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dlmtrain.data' has no attribute {name!r}")


def build_datamodule(cfg, micro_batch_size: int):
    """The DataModule for ``cfg`` (the whole run config); reads the manifest now, building the default if needed."""
    from dlmtrain.data.datamodule import ShardDataModule
    from dlmtrain.data.format import read_manifest
    from dlmtrain.errors import ConfigError

    d = cfg.data
    if d.kind != "shards":
        raise ConfigError(f"data.kind={d.kind!r}: only 'shards' is supported")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers={d.num_workers} must be >= 0")
    if d.shuffle_buffer < 1:
        raise ConfigError(f"data.shuffle_buffer={d.shuffle_buffer} must be >= 1")
    if d.manifest:
        url = str(d.manifest)
    else:
        from dlmtrain.data.default import ensure_default

        url = str(ensure_default(d))
    manifest = read_manifest(url)
    seed = int(cfg.trainer.seed) if "trainer" in cfg and "seed" in cfg.trainer else 0
    return ShardDataModule(
        manifest, micro_batch_size=micro_batch_size, num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
        on_corrupt=d.on_corrupt, max_val_samples=d.max_val_samples, seed=seed, shard_url=d.get("shard_url", ""),
        verify_checksums=bool(d.get("verify_checksums", True)),
    )


__all__ = ["build_datamodule", *_LAZY]
