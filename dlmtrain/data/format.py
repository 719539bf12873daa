"""The shard format: the contract between data_prep (writer) and the loader (reader).

A prepared dataset is a directory (or any prefix webdataset's ``gopen`` can open)::

    manifest.json        what is there (see below); written last, atomically
    tokenizer.json       the tokenizer (absent for the byte tokenizer)
    inputs.json          data_prep's record of the input files (the loader does not read it)
    train-000000.tar ... webdataset shards of the training split
    val-000000.tar   ... webdataset shards of the validation split

Each shard is a plain (uncompressed, ustar) tar; each sample is one packed sequence of
exactly ``seq_len`` tokens, stored under the key ``%09d`` (the sample's index in its
split) as:

``KEY.input_ids.npy``
    1-D ``uint16`` (vocabulary <= 65536) or ``uint32`` array of ``seq_len`` token ids.
``KEY.doc_starts.npy`` (only when a document starts inside the sequence)
    1-D ``int32`` array of the positions ``p`` (0 < p < seq_len) where a new document
    begins, ascending. Position 0 always starts a segment (the first may continue a
    document from the previous sequence). Documents are packed back to back, each
    ending in EOS, so ``doc_starts`` is exactly the set of positions right after an EOS;
    the member makes the boundaries explicit for readers that don't know the EOS id.
``KEY.pairs.npy`` (only in prompt-conditioned datasets: data_prep ``--prompt-field``)
    1-D ``int32`` array of ``3 k`` entries, ``(start, answer_start, end)`` for each of the
    ``k`` prompt/answer pairs in the sequence, ascending, not overlapping, with
    ``0 <= start <= answer_start < end <= seq_len``. Pair ``j`` holds its prompt tokens at
    ``[start, answer_start)`` and its answer tokens then EOS at ``[answer_start, end)``;
    pairs are never cut between sequences. Every position outside all pairs is padding
    (the pad id, else EOS), which is never attended to or scored; the padding after a pair
    starts a segment like any position after an EOS, so it is listed in ``doc_starts``.
    The loader turns the member into ``prompt_mask`` (True on prompt tokens) and
    ``attention_mask`` (False on padding). Such a manifest says ``"prompt_conditioned": true``
    and ``"version": 2``, so a dlmtrain that predates pairs refuses it rather than score the
    prompts and padding; a sample without the member there is plain text (no prompt, no
    padding). Datasets without the member keep version 1 and read exactly as before.

Any webdataset pipeline reads these (``.decode()`` turns ``.npy`` into arrays); the
loader in this package reads each shard whole, checks it against the manifest's
``sha256`` and ``bytes``, and parses it with a small tar parser that checks member
sizes (and header checksums where no sha256 was checked), so a truncated or garbled
shard is reported as corrupt.

Writes are atomic: a shard is written to ``NAME.tmp-PID``, flushed, fsynced and
renamed. The writer is deterministic (fixed mtime/uid/mode, no wall-clock in any
header), so the same input gives byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from dlmtrain.errors import DataError

FORMAT = "dlmtrain-shards"
FORMAT_VERSION = 1  # plain text datasets
PAIRS_VERSION = 2  # prompt-conditioned datasets (pairs.npy); the newest version this reader knows
IDS = "input_ids.npy"
DOCS = "doc_starts.npy"
PAIRS = "pairs.npy"
SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")
BLOCK = 512
RECORD = 20 * BLOCK


class CorruptShard(Exception):
    """A shard that cannot be read as the manifest says (the loader decides skip or fail)."""


# ----------------------------------------------------------------------------- npy


def npy_bytes(arr: np.ndarray) -> bytes:
    """``np.save`` of a 1-D little-endian array, as bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


class NpyHeaderCache:
    """Fast ``.npy`` decoding: a header seen before is matched by bytes, not parsed."""

    def __init__(self):
        self._known: dict[bytes, tuple[int, np.dtype, tuple]] = {}

    def decode(self, data: bytes) -> np.ndarray:
        head = bytes(data[:12])  # bytes, not a view: compared and sliced below
        if len(head) < 10 or head[:6] != b"\x93NUMPY":
            raise ValueError("not an .npy member")
        major = head[6]
        hl = int.from_bytes(head[8:10], "little") + 10 if major == 1 else int.from_bytes(head[8:12], "little") + 12
        header = bytes(data[:hl])
        hit = self._known.get(header)
        if hit is None:
            f = io.BytesIO(data)
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            if fortran or dtype.hasobject or len(shape) != 1:
                raise ValueError("unexpected .npy layout")
            hit = (f.tell(), dtype, shape)
            if len(self._known) < 64:
                self._known[header] = hit
        offset, dtype, shape = hit
        n = shape[0]
        if len(data) - offset != n * dtype.itemsize:
            raise ValueError(f".npy payload is {len(data) - offset} bytes, expected {n * dtype.itemsize}")
        return np.frombuffer(data, dtype=dtype, count=n, offset=offset)


# ----------------------------------------------------------------------------- tar writing


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


class _HashingFile:
    def __init__(self, f: BinaryIO):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, b: bytes) -> None:
        self.f.write(b)
        self.sha.update(b)
        self.size += len(b)


class TarShard:
    """One tar shard written atomically: members go to a temp file, ``close`` renames it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self._f = open(self.tmp, "wb")
        self._out = _HashingFile(self._f)
        self.samples = 0

    @property
    def size(self) -> int:
        return self._out.size

    def add(self, name: str, data: bytes) -> None:
        self._out.write(_tar_header(name, len(data)))
        self._out.write(data)
        pad = -len(data) % BLOCK
        if pad:
            self._out.write(b"\0" * pad)

    def close(self) -> dict:
        end = 2 * BLOCK
        end += -(self._out.size + end) % RECORD
        self._out.write(b"\0" * end)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return {"name": self.path.name, "bytes": self._out.size, "sha256": self._out.sha.hexdigest()}

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class ShardWriter:
    """Packs ``(ids, doc_starts)`` samples into ``{split}-NNNNNN.tar`` shards of about ``target_bytes``.

    ``add`` returns the shard record when it just committed a shard, else ``None``.
    ``shard_index``/``sample_index`` let a resumed run continue the numbering.
    """

    def __init__(
        self, out_dir: str | Path, split: str, *, seq_len: int, dtype: str, target_bytes: int,
        shard_index: int = 0, sample_index: int = 0,
    ):
        self.out_dir = Path(out_dir)
        self.split = split
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.target_bytes = max(1, int(target_bytes))
        self.shard_index = shard_index
        self.sample_index = sample_index
        self._shard: TarShard | None = None
        self._tokens = 0
        head = npy_bytes(np.zeros(seq_len, dtype=self.dtype))
        self._ids_header = head[: len(head) - seq_len * self.dtype.itemsize]

    def add(self, ids: np.ndarray, doc_starts, pairs=None) -> dict | None:
        """``pairs``: (start, answer_start, end) triples, flat (see the module docstring) or None."""
        if len(ids) != self.seq_len:
            raise ValueError(f"sample has {len(ids)} tokens, expected {self.seq_len}")
        if self._shard is None:
            self._shard = TarShard(self.out_dir / f"{self.split}-{self.shard_index:06d}.tar")
            self._tokens = 0
        key = f"{self.sample_index:09d}"
        self._shard.add(f"{key}.{IDS}", self._ids_header + np.asarray(ids, dtype=self.dtype).tobytes())
        if len(doc_starts):
            self._shard.add(f"{key}.{DOCS}", npy_bytes(np.asarray(doc_starts, dtype="<i4")))
        if pairs is not None:
            self._shard.add(f"{key}.{PAIRS}", npy_bytes(np.asarray(pairs, dtype="<i4").reshape(-1)))
        self._shard.samples += 1
        self._tokens += self.seq_len
        self.sample_index += 1
        if self._shard.size >= self.target_bytes:
            return self._commit()
        return None

    def _commit(self) -> dict:
        shard, self._shard = self._shard, None
        rec = shard.close()
        rec.update(samples=shard.samples, tokens=self._tokens)
        self.shard_index += 1
        return {k: rec[k] for k in ("name", "samples", "tokens", "bytes", "sha256")}

    def finish(self) -> dict | None:
        """Commit the last, partly filled shard (if it has samples)."""
        if self._shard is None:
            return None
        return self._commit()

    def abort(self) -> None:
        if self._shard is not None:
            self._shard.abort()
            self._shard = None


# ----------------------------------------------------------------------------- tar reading


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:  # pipes may return short reads
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if field and field[0] & 0x80:  # GNU base-256 for huge sizes
        return int.from_bytes(field, "big") & ~(0x80 << (8 * (len(field) - 1)))
    return int(field or b"0", 8)


def _header(header: bytes, check: bool) -> tuple[str, int, bytes]:
    """``(name, size, typeflag)`` of one tar header; ``check`` verifies its checksum. Raises CorruptShard."""
    try:
        if check:
            chksum = _octal(header[148:156])
            if chksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):
                raise CorruptShard("bad tar header checksum")
        size = _octal(header[124:136])
    except ValueError:
        raise CorruptShard("garbled tar header") from None
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    if prefix:
        name = prefix.decode("utf-8", "replace") + "/" + name
    return name, size, header[156:157]


def _long_name(typeflag: bytes, data) -> str | None:
    """The next member's name from a GNU long-name (L) or pax (x) member, else None."""
    if typeflag == b"L":
        return bytes(data).split(b"\0", 1)[0].decode("utf-8", "replace")
    if typeflag == b"x":  # pax extended header: honour path=
        for rec in bytes(data).decode("utf-8", "replace").split("\n"):
            _, _, kv = rec.partition(" ")
            if kv.startswith("path="):
                return kv[5:]
    return None


_ZERO_BLOCK = b"\0" * BLOCK


def iter_tar(f: BinaryIO, skip=None) -> Iterator[tuple[str, bytes | None]]:
    """Yield ``(member name, data)`` of regular files in a tar stream, checking each header.

    ``skip(name) -> bool`` may ask to skip a member's data (``None`` is yielded for it; seeks
    when the stream allows). Raises :class:`CorruptShard` on a bad checksum, a truncated
    member or a missing end-of-archive marker.
    """
    long_name = None
    seekable = False
    try:
        seekable = f.seekable()
    except Exception:
        pass
    while True:
        header = _read_exact(f, BLOCK)
        if len(header) < BLOCK:
            raise CorruptShard("truncated (no end-of-archive marker)" if not header else "truncated tar header")
        if header == _ZERO_BLOCK:
            return
        name, size, typeflag = _header(header, check=True)
        if long_name is not None:
            name, long_name = long_name, None
        padded = size + (-size % BLOCK)
        if typeflag in (b"0", b"\0"):
            if skip is not None and skip(name):
                if seekable:
                    f.seek(padded, 1)
                elif len(_read_exact(f, padded)) < padded:
                    raise CorruptShard(f"truncated member {name}")
                yield name, None
                continue
            data = _read_exact(f, padded)
            if len(data) < padded:
                raise CorruptShard(f"truncated member {name}")
            yield name, data[:size] if padded != size else data
        else:
            data = _read_exact(f, padded)
            if len(data) < padded:
                raise CorruptShard(f"truncated member {name}")
            long_name = _long_name(typeflag, data[:size])


def iter_tar_buffer(buf, check_headers: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """:func:`iter_tar` over a whole shard in memory: the data are read-only uint8 views into ``buf``, no copies.

    ``check_headers=False`` skips the header checksums, for a buffer whose sha256 is checked anyway.
    """
    # ndarray views, not memoryviews: memoryviews are tracked by the garbage collector, and tens of
    # thousands alive (one per sample of a shard) made collections cost more than the parse
    mv = np.frombuffer(memoryview(buf).toreadonly(), dtype=np.uint8)
    n = len(mv)
    pos = 0
    long_name = None
    while True:
        if pos + BLOCK > n:
            raise CorruptShard("truncated (no end-of-archive marker)" if pos >= n else "truncated tar header")
        header = mv[pos:pos + BLOCK].tobytes()
        if header == _ZERO_BLOCK:
            return
        name, size, typeflag = _header(header, check_headers)
        if long_name is not None:
            name, long_name = long_name, None
        start = pos + BLOCK
        pos = start + size + (-size % BLOCK)
        if pos > n:
            raise CorruptShard(f"truncated member {name}")
        if typeflag in (b"0", b"\0"):
            yield name, mv[start:start + size]
        else:
            long_name = _long_name(typeflag, mv[start:start + size])


def _key(name: str) -> tuple[str, str]:
    key, _, ext = name.rsplit("/", 1)[-1].partition(".")
    return key, ext


def _group(members, skip: int) -> Iterator[dict]:
    """Consecutive members grouped by key, from the ``skip``-th group on (skipped members carry None)."""
    cur: dict | None = None
    cur_key = None
    idx = -1
    for name, data in members:
        key, ext = _key(name)
        if key != cur_key:
            if cur is not None and idx >= skip:
                yield cur
            idx += 1
            cur, cur_key = {"__key__": key}, key
        if data is not None:
            cur[ext] = data
    if cur is not None and idx >= skip:
        yield cur


def iter_samples(f: BinaryIO, skip: int = 0) -> Iterator[dict[str, bytes]]:
    """Group consecutive members by key (the name up to the first dot): ``{"__key__": key, ext: data}``.

    The first ``skip`` samples are passed over without reading their data where possible.
    """
    seen = {"key": None, "n": -1}

    def _skip(name: str) -> bool:
        k = _key(name)[0]
        if k != seen["key"]:
            seen["key"] = k
            seen["n"] += 1
        return seen["n"] < skip

    return _group(iter_tar(f, skip=_skip if skip else None), skip)


def buffer_samples(buf, check_headers: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """:func:`iter_samples` of a whole shard in memory (see :func:`iter_tar_buffer`)."""
    return _group(iter_tar_buffer(buf, check_headers), 0)


# ----------------------------------------------------------------------------- manifest


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_url(url: str, mode: str = "rb"):
    """Open a local path or any URL webdataset's gopen understands (``pipe:``, ``http(s)``, ...)."""
    if "://" not in url and not url.startswith("pipe:"):
        return open(url, mode)
    from webdataset.gopen import gopen

    return gopen(url, mode)


def join_url(base: str, name: str) -> str:
    """``name`` beside ``base`` (a manifest path or URL)."""
    if base.startswith("pipe:"):
        raise DataError(
            f"cannot locate shard {name!r} next to a pipe: manifest; set data.shard_url to a template such as "
            "'pipe:aws s3 cp s3://bucket/dir/{name} -'"
        )
    if "://" in base:
        return base.rsplit("/", 1)[0] + "/" + name
    return str(Path(base).expanduser().resolve().parent / name)


def read_manifest(url: str) -> dict:
    """Load and check a manifest.json (path or URL)."""
    where = url
    try:
        if "://" not in url and not url.startswith("pipe:"):
            p = Path(url).expanduser()
            if p.is_dir():
                p = p / "manifest.json"
            if not p.is_file():
                raise DataError(f"data.manifest={url}: no such file; run `python -m data_prep ... --out DIR` and pass DIR/manifest.json")
            where = str(p)
            text = p.read_text()
        else:
            with open_url(url) as f:
                text = f.read().decode("utf-8")
        m = json.loads(text)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read manifest {url}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"{where} is not a dlmtrain shard manifest (no \"format\": \"{FORMAT}\")")
    if int(m.get("version", 0)) > PAIRS_VERSION:
        raise DataError(f"{where} has format version {m.get('version')}; this dlmtrain reads up to {PAIRS_VERSION}: upgrade dlmtrain")
    for key in ("seq_len", "dtype", "tokenizer", "splits", "vocab_size"):
        if key not in m:
            raise DataError(f"{where}: manifest lacks '{key}'")
    m["_where"] = where
    return m
