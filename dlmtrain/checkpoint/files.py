"""Checkpoint files of a run directory: what they hold, which one to resume from, stale temporaries.

A Lightning checkpoint is a zip (torch.save); a truncated copy (a node died mid-copy, a
full disk) lacks the zip's central directory and fails to open. ``inspect`` opens with
``mmap=True``, so checking even a multi-GB checkpoint reads only its small pickle.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from dlmtrain.errors import ConfigError

TMP_RE = re.compile(r"\.tmp-(?:(?P<host>[^/]*)-)?(?P<pid>\d+)$")
STALE_OTHER_HOST_S = 3600  # a temporary from another host untouched this long belongs to a dead writer


class BadCheckpoint(Exception):
    """A file that cannot be resumed from; the message says why."""


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    config_yaml: str | None  # the resolved dlmtrain config stored in the checkpoint


def inspect(path: str | Path) -> CheckpointInfo:
    """Open ``path`` just enough to know it is a readable Lightning checkpoint. Raises BadCheckpoint."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise BadCheckpoint(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise BadCheckpoint(f"{path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadCheckpoint(f"{path} is not a readable checkpoint ({first[:120]})") from None
    if not isinstance(ck, dict) or "state_dict" not in ck or "global_step" not in ck:
        raise BadCheckpoint(f"{path} is not a Lightning training checkpoint (no state_dict / global_step)")
    return CheckpointInfo(path, int(ck["global_step"]), ck.get("dlmtrain_config"))


def candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints a run can resume from, newest first by modification time (never nonfinite-*)."""
    files = [p for p in ckpt_dir.glob("*.ckpt") if p.is_file() and not p.name.startswith("nonfinite-")]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def find_resume(resume: str, ckpt_dir: Path, say=print) -> CheckpointInfo | None:
    """The checkpoint ``run.resume`` asks for (auto | never | a path), checked readable.

    auto: ``last.ckpt``; if it is unreadable, the newest readable checkpoint of the run
    directory, said loudly; if none is readable, a ConfigError naming the ways out.
    """
    if resume == "never":
        return None
    if resume != "auto":
        try:
            return inspect(resume)
        except BadCheckpoint as e:
            raise ConfigError(f"run.resume={resume}: {e}; pass a .ckpt file, run.resume=auto or run.resume=never") from None
    last = ckpt_dir / "last.ckpt"
    files = candidates(ckpt_dir)
    if not files:
        return None
    bad = []
    for p in ([last] if last in files else []) + [p for p in files if p != last]:
        try:
            info = inspect(p)
        except BadCheckpoint as e:
            bad.append(str(e))
            continue
        if bad:
            say(f"[dlmtrain] WARNING: {'; '.join(bad)}. Falling back to the newest readable checkpoint {p} "
                f"(step {info.step}); the unreadable file(s) are left in place for inspection")
        return info
    raise ConfigError(
        f"no readable checkpoint in {ckpt_dir} ({'; '.join(bad)}); start over with run.resume=never "
        "or point run.resume=<path> at a good checkpoint"
    )


def temp_name(path: str | Path) -> str:
    """Where an atomic write of ``path`` goes first: names the writer, so leftovers can be judged stale."""
    return f"{os.fspath(path)}.tmp-{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(directory: Path, say=print) -> list[Path]:
    """Delete ``*.tmp-<host>-<pid>`` files whose writer is gone: a dead pid on this host, or
    another host's file untouched for an hour. Returns what was removed."""
    host, removed = socket.gethostname(), []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = TMP_RE.search(p.name)
        if not m or not p.is_file():
            continue
        same_host = m["host"] in (None, host)
        stale = not _alive(int(m["pid"])) if same_host else time.time() - p.stat().st_mtime > STALE_OTHER_HOST_S
        if stale:
            size = p.stat().st_size
            p.unlink(missing_ok=True)
            removed.append(p)
            say(f"[dlmtrain] removed {p.name} ({size / 1e6:.1f} MB), left by an interrupted checkpoint write")
    return removed
