"""Atomic checkpoint writes: a crash while saving never corrupts the previous file.

The temporary is named after its writer (``NAME.tmp-<host>-<pid>``) so a later start can
tell a dead writer's leftover from a live one (dlmtrain.checkpoint.files.clean_stale_temporaries).
"""

from __future__ import annotations

import os

from lightning.pytorch.plugins.io import TorchCheckpointIO

from dlmtrain.checkpoint.files import replace_path, temp_name


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = os.fspath(path)
        tmp = temp_name(path)
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            replace_path(tmp, path)  # also over a sharded directory of an earlier run
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
