"""What the inputs are: one record per input file (resolved path, size, mtime, sha256, text checks).

The records decide three things:

* whether a rerun is up to date. The fingerprint covers resolved paths and contents, so
  ``./a.jsonl``, ``a.jsonl`` and ``/abs/a.jsonl`` are one input, and a ``touch``ed file is
  unchanged while an edited one is not.
* which text files are skipped as binary: a NUL byte in their first 8 KB, or more than
  ``--max-undecodable`` of their bytes not UTF-8. JSONL/Parquet/HF inputs are never skipped.
* what changed, when a rerun is refused.

Hashing reads every input once. The records are saved as ``OUT/inputs.json``; on a rerun a
file whose size and mtime match its record is not read again (a file rewritten with the
same size and mtime would go unnoticed; ``--overwrite`` rebuilds regardless).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import zlib
from pathlib import Path
from typing import Callable

from data_prep.sources import Source, count_replaced
from dlmtrain.errors import DataError

HEAD_BYTES = 8192  # where a NUL byte marks a file as binary
_CHUNK = 1 << 20


def _files(src: Source) -> list[Path]:
    p = Path(src.path)
    if p.is_dir():  # a Hugging Face save_to_disk directory: every file in it
        return sorted(f.resolve() for f in p.rglob("*") if f.is_file())
    return [p.resolve()]


def _scan(path: Path, src: Source) -> dict:
    """sha256 of the file; for text, also NUL in the head and undecodable bytes (after gunzip)."""
    sha = hashlib.sha256()
    text = src.kind == "text"
    dec = codecs.getincrementaldecoder("utf-8")(errors="dlmtrain-count")
    counted = [0, 0]  # text bytes, replaced bytes
    head = bytearray()

    def check(chunk: bytes) -> None:
        if len(head) < HEAD_BYTES:
            head.extend(chunk[: HEAD_BYTES - len(head)])
        counted[0] += len(chunk)
        counted[1] += count_replaced(lambda: dec.decode(chunk))

    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                sha.update(chunk)
                if text and not src.gz:
                    check(chunk)
        if text and src.gz:
            with gzip.open(path, "rb") as g:
                for chunk in iter(lambda: g.read(_CHUNK), b""):
                    check(chunk)
        if text:
            counted[1] += count_replaced(lambda: dec.decode(b"", final=True))
    except (OSError, EOFError, zlib.error) as e:  # unreadable, or a damaged .gz
        raise DataError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    rec = {"sha256": sha.hexdigest()}
    if text:
        rec.update(head_nul=b"\0" in head, text_bytes=counted[0], replaced=counted[1])
    return rec


def scan_inputs(sources: list[Source], cache: dict[str, dict], tick: Callable[[int], None] | None = None) -> list[dict]:
    """One record per file of ``sources``, in order; ``cache`` (path -> old record) saves rereads."""
    records = []
    for src in sources:
        for f in _files(src):
            st = f.stat()
            old = cache.get(str(f))
            rec = {"path": str(f), "kind": src.kind, "gz": src.gz, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
            if old and all(old.get(k) == rec[k] for k in ("kind", "gz", "bytes", "mtime_ns")):
                rec.update({k: v for k, v in old.items() if k not in rec})
            else:  # new, or size/mtime changed: the content hash decides (a touched file hashes the same)
                rec.update(_scan(f, src))
                if tick is not None:
                    tick(st.st_size)
            records.append(rec)
    return records


def binary_reason(rec: dict, max_undecodable: float) -> str | None:
    """Why a text file is skipped as binary, or None to keep it."""
    if rec["kind"] != "text":
        return None
    if rec["head_nul"]:
        return f"NUL bytes in its first {HEAD_BYTES // 1024} KB"
    if rec["text_bytes"] and rec["replaced"] > max_undecodable * rec["text_bytes"]:
        return f"{rec['replaced'] / rec['text_bytes']:.1%} of its bytes are not UTF-8 (--max-undecodable {max_undecodable:g})"
    return None


def identity(records: list[dict]) -> list:
    """What the fingerprint covers: resolved path, how it is read, content hash."""
    return [[r["path"], r["kind"], r["gz"], r["sha256"]] for r in records]


def changes(old: dict[str, list[dict]], new: dict[str, list[dict]], limit: int = 3) -> list[str]:
    """Human-readable differences between two ``{split: records}`` (added, removed, modified, reordered)."""
    out = []
    for split in sorted(set(old) | set(new)):
        a = {r["path"]: r["sha256"] for r in old.get(split, [])}
        b = {r["path"]: r["sha256"] for r in new.get(split, [])}
        role = "input" if split == "train" else "--val-input"
        diff = [f"{role} added: {p}" for p in b if p not in a]
        diff += [f"{role} removed: {p}" for p in a if p not in b]
        diff += [f"{role} modified: {p}" for p in b if p in a and a[p] != b[p]]
        if not diff and list(a) != list(b):
            diff.append(f"{role} order changed")
        out += diff
    if len(out) > limit:
        out = out[:limit] + [f"and {len(out) - limit} more"]
    return out
