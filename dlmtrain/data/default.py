"""The embedded default corpus: the running Python's standard-library ``.py`` files.

Every machine with Python has this real text (~30 MB of code and docstrings). The
first use prepares it with data_prep (a byte-level BPE of ``data.vocab_size`` trained
on <= 8 MB of it, sequences of ``data.seq_len``) into
``data.cache_dir/stdlib-py<version>-L<seq_len>-V<vocab>-<key>/``; the key covers the
Python version, the stdlib path and the data settings. Concurrent builders (ranks,
requeued jobs) serialise on a file lock and the manifest is written last, atomically,
so a reader never sees a half-built corpus. On 2 cores the build takes about 10 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

from dlmtrain.errors import DataError

RECIPE_VERSION = 1
TRAIN_BYTES = "8MB"  # BPE training text cap (keeps the build fast)
SHARD_SIZE = "4MB"  # ~20 train shards: enough for a few ranks x workers


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_dir(data_cfg) -> Path:
    v = sys.version_info
    key = {
        "recipe": RECIPE_VERSION, "python": sys.version, "impl": platform.python_implementation(),
        "stdlib": str(stdlib_dir()), "seq_len": int(data_cfg.seq_len), "vocab_size": int(data_cfg.vocab_size),
        "val_fraction": float(data_cfg.val_fraction), "train_bytes": TRAIN_BYTES, "shard_size": SHARD_SIZE,
    }
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    name = f"stdlib-py{v.major}.{v.minor}.{v.micro}-L{data_cfg.seq_len}-V{data_cfg.vocab_size}-{h}"
    return Path(os.path.expanduser(str(data_cfg.cache_dir))) / name


def prep_command(data_cfg, out: Path, source: Path | None = None) -> list[str]:
    return [
        sys.executable, "-m", "data_prep", str(source or stdlib_dir()), "--glob", "*.py",
        "--exclude", "site-packages", "--exclude", "dist-packages",
        "--train-tokenizer", "--vocab-size", str(data_cfg.vocab_size), "--tokenizer-train-bytes", TRAIN_BYTES,
        "--seq-len", str(data_cfg.seq_len), "--val-fraction", str(data_cfg.val_fraction),
        "--shard-size", SHARD_SIZE, "--out", str(out),
    ]


def ensure_default(data_cfg, source: Path | None = None) -> Path:
    """Path of the default corpus manifest, building it first if needed (safe to call from every rank)."""
    if data_cfg.seq_len < 2 or data_cfg.vocab_size < 260:
        raise DataError("the embedded default corpus needs data.seq_len >= 2 and data.vocab_size >= 260 "
                        f"(got {data_cfg.seq_len}, {data_cfg.vocab_size})")
    if not 0 < data_cfg.val_fraction < 1:
        raise DataError(f"data.val_fraction={data_cfg.val_fraction} must lie in (0, 1) for the embedded default corpus")
    out = default_dir(data_cfg)
    manifest = out / "manifest.json"
    if manifest.is_file():
        return manifest
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data.cache_dir {out.parent}: {e.strerror}; set data.cache_dir to a writable directory") from None
    from filelock import FileLock, Timeout

    lock = FileLock(str(out) + ".lock")
    try:
        lock.acquire(timeout=1)
    except Timeout:
        print(f"[dlmtrain] waiting for another process to finish preparing {out}", flush=True)
        lock.acquire()
    try:
        if manifest.is_file():
            return manifest
        cmd = prep_command(data_cfg, out, source)
        print(f"[dlmtrain] preparing the embedded default corpus (Python standard library .py files) in {out}",
              flush=True)
        env = dict(os.environ)
        spec = importlib.util.find_spec("data_prep")
        if spec is not None and spec.origin:  # make sure the child finds the same data_prep
            root = str(Path(spec.origin).resolve().parent.parent)
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        r = subprocess.run(cmd, env=env)
        if r.returncode != 0 or not manifest.is_file():
            raise DataError(f"preparing the embedded default corpus failed (exit {r.returncode}); command: {' '.join(cmd)}")
    finally:
        lock.release()
    return manifest
