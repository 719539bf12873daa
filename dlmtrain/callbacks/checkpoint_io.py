"""Atomic checkpoint writes: a crash while saving never corrupts the previous file."""

from __future__ import annotations

import os

from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)
