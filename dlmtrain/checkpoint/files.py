"""Checkpoint files of a run directory: what they hold, which one to resume from, stale temporaries.

A Lightning checkpoint is a zip (torch.save); a truncated copy (a node died mid-copy, a
full disk) lacks the zip's central directory and fails to open. ``inspect`` opens with
``mmap=True``, so checking even a multi-GB checkpoint reads only its small pickle.

A sharded checkpoint (DeepSpeed, FSDP2: dlmtrain/distributed/) is a directory with the
same name. Its ``dlmtrain.json`` (:data:`MANIFEST`), written last, names the strategy, the
world size, the step, the resolved config and every file with its size, so a directory
is known complete and readable without opening the shards. Directories are written
beside their final name and swapped in (:func:`replace_path`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from dlmtrain.errors import ConfigError

TMP_RE = re.compile(r"\.(?P<kind>tmp|old)-(?:(?P<host>[^/]*)-)?(?P<pid>\d+)$")
MANIFEST = "dlmtrain.json"  # in a sharded checkpoint directory; written last
STALE_OTHER_HOST_S = 3600  # a temporary from another host untouched this long belongs to a dead writer


class BadCheckpoint(Exception):
    """A file that cannot be resumed from; the message says why."""


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    config_yaml: str | None  # the resolved dlmtrain config stored in the checkpoint
    strategy: str = "file"  # "file" (one file: single device, DDP) | "deepspeed" | "fsdp" (a sharded directory)
    stage: int = 0  # DeepSpeed ZeRO stage of a deepspeed directory
    world_size: int = 1  # ranks that wrote a sharded directory

    @property
    def sharded(self) -> bool:
        return self.strategy != "file"

    def describe(self) -> str:
        if not self.sharded:
            return "a single-file checkpoint"
        kind = f"DeepSpeed ZeRO-{self.stage}" if self.strategy == "deepspeed" else "FSDP2"
        return f"a {kind} checkpoint of {self.world_size} rank(s)"


def read_manifest(path: Path) -> dict:
    """The manifest of a sharded checkpoint directory, checked complete (every file, its size). Raises BadCheckpoint."""
    try:
        man = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise BadCheckpoint(f"{path} is a directory without {MANIFEST}: an interrupted save, or not a dlmtrain "
                            "checkpoint") from None
    except (OSError, ValueError) as e:
        raise BadCheckpoint(f"{path}/{MANIFEST} is unreadable ({str(e).splitlines()[0][:120]})") from None
    for rel, size in man.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            raise BadCheckpoint(f"{path} is incomplete: {rel} is missing")
        if f.stat().st_size != size:
            raise BadCheckpoint(f"{path} is damaged: {rel} has {f.stat().st_size} bytes, the manifest says {size}")
    return man


def inspect(path: str | Path) -> CheckpointInfo:
    """Open ``path`` just enough to know it is a readable checkpoint: a Lightning checkpoint file,
    or a sharded directory with a complete manifest. Raises BadCheckpoint."""
    import torch

    path = Path(path)
    if path.is_dir():
        man = read_manifest(path)
        return CheckpointInfo(path, int(man["global_step"]), man.get("dlmtrain_config"), man["strategy"],
                              int(man.get("stage", 0)), int(man["world_size"]))
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
    files = [p for p in ckpt_dir.glob("*.ckpt") if not p.name.startswith("nonfinite-")]
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
            raise ConfigError(f"run.resume={resume}: {e}; pass a checkpoint (.ckpt file or sharded directory), "
                              "run.resume=auto or run.resume=never") from None
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


def temp_name(path: str | Path, kind: str = "tmp") -> str:
    """Where an atomic write of ``path`` goes first (``kind=old``: where the replaced one waits to be
    deleted): names the writer, so leftovers can be judged stale."""
    return f"{os.fspath(path)}.{kind}-{socket.gethostname()}-{os.getpid()}"


def remove_path(path: Path) -> None:
    """Delete a checkpoint, file or directory."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_path(src: str | Path, dst: str | Path) -> None:
    """Put the finished ``src`` (file or directory) where ``dst`` is, never leaving a partial ``dst``.

    A file over a file is one atomic rename. A directory cannot replace a non-empty one in one
    portable step, so the old ``dst`` is first renamed to ``dst.old-<host>-<pid>``, then ``src``
    renamed to ``dst``, then the old one deleted; a crash between the two renames leaves no
    ``dst`` but the complete old one, which :func:`clean_stale_temporaries` puts back.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir() and not dst.is_dir():
        os.replace(src, dst)
        return
    if not os.path.lexists(dst):
        os.rename(src, dst)
        return
    old = Path(temp_name(dst, "old"))
    os.rename(dst, old)
    os.rename(src, dst)
    remove_path(old)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def clean_stale_temporaries(directory: Path, say=print) -> list[Path]:
    """Deal with leftovers of checkpoint writers that are gone (a dead pid on this host, or another
    host's leftover untouched for an hour): ``*.tmp-<host>-<pid>`` files and directories are
    deleted; a ``NAME.old-<host>-<pid>`` (see :func:`replace_path`) is renamed back to NAME if NAME
    is missing, else deleted. Returns what was removed or restored."""
    host, removed = socket.gethostname(), []
    if not directory.is_dir():
        return removed
    for p in sorted(directory.iterdir()):
        m = TMP_RE.search(p.name)
        if not m:
            continue
        same_host = m["host"] in (None, host)
        stale = not _alive(int(m["pid"])) if same_host else time.time() - p.stat().st_mtime > STALE_OTHER_HOST_S
        if not stale:
            continue
        final = p.with_name(p.name[: m.start()])
        if m["kind"] == "old" and not os.path.lexists(final):
            os.rename(p, final)
            say(f"[dlmtrain] restored {final.name} from {p.name}, left by a checkpoint swap that was interrupted")
        else:
            size = _size(p)
            remove_path(p)
            say(f"[dlmtrain] removed {p.name} ({size / 1e6:.1f} MB), left by an interrupted checkpoint write")
        removed.append(p)
    return removed
