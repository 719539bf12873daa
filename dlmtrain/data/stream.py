"""Streams of batches read from shards: an infinite shuffled train stream, a finite exact val stream.

Both are ``IterableDataset``s that yield whole batches (use ``DataLoader(batch_size=None)``
and :func:`unpack`, as ``TrackedLoader`` does) and split work by rank and by DataLoader
worker themselves; rank/world come from the caller (torch.distributed, else
RANK/WORLD_SIZE, else 0/1). A batch leaves a worker as one int64 tensor ``[2, B, L]``
(ids, segment ids) plus plain Python values: one shared-memory hand-over per batch.

Checks: a shard is read whole into memory in one pass (no second read, so ``pipe:`` and
object-store URLs work), its sha256 computed as the bytes arrive (on a helper thread, overlapping
the parse), and compared with the manifest's ``sha256`` and ``bytes`` (``verify``; shards of older
manifests without them are not); every sample is decoded and checked too, all before the first
sample of the shard is used. A mismatch is a CorruptShard like any other (``on_corrupt``: fail or
skip), so a corrupt train shard never contributes a sample, resumed mid-shard or not. The price is
memory: a worker holds one whole shard (data_prep writes 256 MB by default). Validation verifies
every shard it reads whole; see :meth:`ValStream._read` for the partly read ones.

``segment_ids`` number the documents within each row from 0; a new segment starts right
after each EOS (EOS belongs to the document it ends), read from the ``doc_starts`` member.

Prompt-conditioned datasets (``pairs`` member, see dlmtrain/data/format.py): every batch,
train and val, also carries ``prompt_mask`` (True on prompt tokens) and ``attention_mask``
(False on padding; val padding rows are False throughout and have no prompt). The worker
sends them as a third channel of the packed tensor (0 text or answer, 1 prompt, 2 padding).

Train order (all ranks agree on it without talking):

* an infinite shard sequence ``S``: epoch ``e`` is a permutation of all train shards,
  seeded by ``(seed, e)``; epochs follow each other;
* global worker ``g = rank * num_workers + worker`` of ``W = world * num_workers`` reads
  positions ``q = g, g + W, g + 2W, ...`` of ``S`` (shard-level split by node and by
  worker; every shard is read once per epoch across all workers);
* within a shard, samples are shuffled in blocks of ``shuffle_buffer`` consecutive
  samples (a block shuffle seeded by ``(seed, q, block)``: the mixing of a shuffle
  buffer of that size, with a position that can be saved exactly).

The position of a worker is ``(q, offset)``: the next sample is the ``offset``-th of
shard ``S[q]`` in block-shuffled order. Each batch carries the position after its last
sample (``_pos``), so the main process knows what was consumed; resuming reopens
``S[q]``, skips to the block and continues with the first unseen sample.

Validation (exactly once across ranks): the first ``N`` val samples in manifest order
(``N`` = all, or ``max_val_samples``) are cut into ``world`` contiguous ranges whose
sizes differ by at most one; every rank yields ``ceil(ceil(N / world) / batch_size)``
batches of exactly ``batch_size`` rows, so all ranks run the same number of steps with
the same shapes. Rows past a rank's range (and rows of a corrupt shard under
``on_corrupt=skip``) are padding: ``attention_mask`` False on every position,
``input_ids`` = pad id (EOS if the tokenizer has none), ``segment_ids`` 0. Within a rank
the batches are split into contiguous runs, one per DataLoader worker.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dlmtrain.data.format import DOCS, IDS, PAIRS, CorruptShard, NpyHeaderCache, buffer_samples, iter_samples, open_url
from dlmtrain.errors import DataError

log = logging.getLogger("dlmtrain.data")


@dataclass(frozen=True)
class ShardRef:
    url: str
    name: str
    samples: int
    sha256: str = ""  # from the manifest; "" (older manifests): not verified
    bytes: int = 0  # from the manifest; 0: unknown


@dataclass(frozen=True)
class StreamSpec:
    seq_len: int
    dtype: str
    vocab_size: int
    pad_id: int
    on_corrupt: str  # fail | skip
    verify: bool = True  # check each whole shard read against the manifest's sha256 and bytes
    prompts: bool = False  # prompt-conditioned data: every batch carries prompt_mask and attention_mask


def worker_id() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


CHUNK = 4 << 20  # bytes per read: few syscalls, and hashlib releases the GIL on buffers this large


class _Sha256:
    """sha256 of chunks fed in order, computed on a helper thread: hashlib releases the GIL, so the hash
    overlaps reading the rest of the shard and parsing it (a spare core does it for free)."""

    def __init__(self):
        self._sha = hashlib.sha256()
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="dlmtrain-sha256", daemon=True)
        self._thread.start()
        self._open = True

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._sha.update(chunk)

    def update(self, chunk) -> None:
        self._chunks.put(chunk)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._chunks.put(None)

    def hexdigest(self) -> str:
        self.close()
        self._thread.join()
        return self._sha.hexdigest()


def _read_all(f, hint: int, sha: _Sha256 | None) -> memoryview:
    """Every byte of ``f`` in one buffer, fed to ``sha`` as it arrives: one pass, no seeking, so
    ``pipe:`` and object-store URLs work. Preallocated to ``hint`` + 1 bytes (the manifest's size),
    so a file of the expected size is copied once and a longer one shows itself."""
    buf = memoryview(np.empty(max(0, hint) + 1, dtype=np.uint8))  # not zero-filled: written once, by the read
    readinto = getattr(f, "readinto", None)  # webdataset's Pipe has only read()
    pos = 0
    while pos < len(buf):
        view = buf[pos:pos + CHUNK]
        if readinto is not None:
            n = readinto(view) or 0
        else:
            got = f.read(len(view))
            n = len(got)
            view[:n] = got
        if not n:
            return buf[:pos]
        if sha is not None:
            sha.update(buf[pos:pos + n])
        pos += n
    rest = [buf]  # longer than expected (or no size known): collect the rest, then one copy
    while chunk := f.read(CHUNK):
        if sha is not None:
            sha.update(chunk)
        rest.append(chunk)
    return memoryview(b"".join(rest))


def _size_of(f) -> int:
    try:
        return os.fstat(f.fileno()).st_size
    except Exception:  # pipes and remote streams have no size up front
        return 0


def _decode(sample: dict, spec: StreamSpec, dtype: np.dtype,
            cache: NpyHeaderCache) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One sample's ``(input_ids, doc_starts or None, pairs or None)``, checked against the spec.
    Raises CorruptShard."""
    L, V = spec.seq_len, spec.vocab_size
    raw = sample.get(IDS)
    if raw is None:
        raise CorruptShard(f"sample {sample['__key__']} has no {IDS}")
    try:
        ids = cache.decode(raw)
        starts = cache.decode(sample[DOCS]) if DOCS in sample else None
        pairs = cache.decode(sample[PAIRS]) if PAIRS in sample else None
    except (ValueError, KeyError) as e:
        raise CorruptShard(f"sample {sample['__key__']}: {e}") from None
    if ids.dtype != dtype or len(ids) != L:
        raise CorruptShard(f"sample {sample['__key__']}: {ids.dtype}[{len(ids)}], expected {dtype}[{L}]")
    if int(ids.max()) >= V:
        raise CorruptShard(f"sample {sample['__key__']}: token id {int(ids.max())} >= vocab size {V}")
    if starts is not None and len(starts) and (starts[0] <= 0 or starts[-1] >= L or np.any(np.diff(starts) <= 0)):
        raise CorruptShard(f"sample {sample['__key__']}: bad doc_starts")
    if pairs is not None and not _good_pairs(pairs, L):
        raise CorruptShard(f"sample {sample['__key__']}: bad {PAIRS}")
    return ids, starts, pairs


def _good_pairs(pairs: np.ndarray, L: int) -> bool:
    """(start, answer_start, end) triples: 0 <= start <= answer_start < end <= L, ascending, disjoint."""
    if pairs.dtype.kind not in "iu" or len(pairs) % 3:
        return False
    p = pairs.astype(np.int64).reshape(-1, 3)
    s, a, e = p[:, 0], p[:, 1], p[:, 2]
    return bool((s >= 0).all() and (s <= a).all() and (a < e).all() and (e <= L).all() and (s[1:] >= e[:-1]).all())


def _open(ref: ShardRef):
    try:
        return open_url(ref.url, "rb")
    except Exception as e:
        raise CorruptShard(f"cannot open ({type(e).__name__}: {e})") from None


def _read_error(e: Exception) -> CorruptShard:  # pipe exit status, I/O errors
    return CorruptShard(f"read error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def read_shard(ref: ShardRef, spec: StreamSpec, skip: int = 0,
               cache: NpyHeaderCache | None = None) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
    """``(input_ids, doc_starts or None, pairs or None)`` of one whole shard, from sample ``skip`` on.
    Raises CorruptShard.

    The shard is read whole into memory (one pass, hashed as it is read), checked against the
    manifest's ``bytes`` and ``sha256`` (``spec.verify``; a shard without them is not), and every
    sample is decoded and checked, all before anything is returned: a corrupt shard contributes no
    sample, and resuming at ``skip`` verifies the whole shard too. The cost is memory: a reader
    holds one whole shard (data_prep writes 256 MB by default). The arrays are read-only views
    into that buffer; copy what you keep.
    """
    cache = cache or NpyHeaderCache()
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    want_sha = ref.sha256 if spec.verify else ""
    sha = _Sha256() if want_sha else None
    try:
        f = _open(ref)
        try:
            data = _read_all(f, ref.bytes or _size_of(f), sha)
            f.close()  # a pipe reports its exit status here
        except (OSError, EOFError, ValueError) as e:
            raise _read_error(e) from None
        finally:
            try:
                f.close()
            except Exception:
                pass
        if spec.verify and ref.bytes and len(data) != ref.bytes:
            raise CorruptShard(f"size mismatch: manifest says {ref.bytes} bytes, file has {len(data)}")
        items: list = []
        bad = None
        try:
            # tar header checksums only prove what the sha256 proves better; they guard unhashed shards
            for sample in buffer_samples(data, check_headers=sha is None):
                items.append(_decode(sample, spec, dtype, cache))
        except CorruptShard as e:
            bad = e
        if sha is not None:  # a checksum mismatch is the root cause of any parse error
            got = sha.hexdigest()
            if got != want_sha:
                raise CorruptShard(f"sha256 mismatch: manifest says {want_sha[:16]}..., file has {got[:16]}...")
        if bad is not None:
            raise bad
    finally:
        if sha is not None:
            sha.close()
    if len(items) != ref.samples:
        raise CorruptShard(f"has {len(items)} samples, the manifest says {ref.samples}")
    return items[skip:]


def stream_shard(ref: ShardRef, spec: StreamSpec, skip: int = 0, stop: int | None = None,
                 cache: NpyHeaderCache | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
    """Samples ``skip..stop-1`` of one shard, streamed: reads no further than ``stop`` (and seeks past
    the first ``skip`` where it can), so its checksum is NOT verified; tar header checksums and each
    sample's dtype, length, token ids and doc_starts are. For partial reads of validation shards.
    Raises CorruptShard."""
    cache = cache or NpyHeaderCache()
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    stop = ref.samples if stop is None else stop
    n = skip
    if n >= stop:
        return
    f = _open(ref)
    try:
        try:
            for sample in iter_samples(f, skip=skip):
                yield _decode(sample, spec, dtype, cache)
                n += 1
                if n >= stop:
                    return
        except CorruptShard:
            raise
        except (OSError, EOFError, ValueError) as e:
            raise _read_error(e) from None
        raise CorruptShard(f"ends after {n} samples, the manifest says {ref.samples}")
    finally:
        try:
            f.close()
        except Exception:
            pass


def _owned(arrays: list) -> list:
    """Copies of views into a shard's buffer (None stays None)."""
    return [None if a is None else np.array(a) for a in arrays]


def _segments(starts_list: list, B: int, L: int) -> np.ndarray:
    marks = np.zeros((B, L), dtype=np.int64)
    for i, s in enumerate(starts_list):
        if s is not None and len(s):
            marks[i, s] = 1
    return np.cumsum(marks, axis=1, out=marks)


PROMPT, PAD = 1, 2  # roles in the third channel; 0: text or answer


def make_batch(rows: list[np.ndarray], starts: list, L: int, real: list[bool] | None = None, pos=None,
               fault: str | None = None, pairs: list | None = None, prompts: bool = False) -> dict:
    """A batch as it leaves a worker: ids and segment ids in ONE int64 tensor ``[2, B, L]`` (one shared-memory
    transfer instead of several), the row mask, position and any fatal-data message as plain Python values.
    With ``prompts`` (or any row's ``pairs``) a third channel holds each position's role. :func:`unpack` opens it."""
    B = len(rows)
    roles = prompts or (pairs is not None and any(p is not None for p in pairs))
    packed = np.empty((3 if roles else 2, B, L), dtype=np.int64)
    np.stack(rows, out=packed[0])
    packed[1] = _segments(starts, B, L)
    if roles:
        packed[2] = 0
        for i, p in enumerate(pairs or ()):
            if p is not None:
                packed[2, i] = PAD
                for s, a, e in p.reshape(-1, 3):
                    packed[2, i, s:a] = PROMPT
                    packed[2, i, a:e] = 0
    return {"_packed": torch.from_numpy(packed), "_rows": real, "_pos": pos, "_fault": fault}


def unpack(batch: dict) -> tuple[dict, tuple | None, str | None]:
    """``(batch for the model, position, fault message)`` from a worker's batch (see :func:`make_batch`)."""
    packed = batch["_packed"]
    out = {"input_ids": packed[0], "segment_ids": packed[1]}
    am = None
    if batch.get("_rows") is not None:
        am = torch.tensor(batch["_rows"], dtype=torch.bool)[:, None].expand(packed.shape[1:]).clone()
    if packed.shape[0] > 2:
        out["prompt_mask"] = packed[2] == PROMPT
        am = packed[2] != PAD if am is None else am & (packed[2] != PAD)
    if am is not None:
        out["attention_mask"] = am
    return out, batch.get("_pos"), batch.get("_fault")


class _Corruption:
    """What to do about a corrupt shard: log it by name and count it, or stop the run."""

    def __init__(self, spec: StreamSpec, counter):
        self.spec = spec
        self.counter = counter

    def __call__(self, ref: ShardRef, err: CorruptShard, split: str) -> str | None:
        """Skip (log, count, return None); or fail: raise for train, return the message for
        val (the val stream pads the shard's rows and flags the batch, so every rank still
        runs the same number of batches and the stop is agreed at a batch end)."""
        if self.spec.on_corrupt != "skip":
            msg = f"corrupt {split} shard {ref.url}: {err}; set data.on_corrupt=skip to skip such shards"
            if split == "val":
                return msg
            raise DataError(msg)
        log.warning("data: skipping corrupt %s shard %s: %s", split, ref.url, err)
        if self.counter is not None:
            with self.counter.get_lock():
                self.counter.value += 1


class TrainStream(IterableDataset):
    """Infinite, shuffled, resumable batches for one rank (see module docstring)."""

    def __init__(self, shards: list[ShardRef], spec: StreamSpec, *, batch_size: int, seed: int, buffer: int,
                 rank: int, world: int, num_workers: int, starts: dict[int, tuple[int, int]] | None = None,
                 counter=None):
        self.shards = shards
        self.spec = spec
        self.batch_size = batch_size
        self.seed = seed
        self.buffer = max(1, buffer)
        self.rank, self.world = rank, world
        self.num_workers = max(1, num_workers)
        self.starts = dict(starts or {})
        self.counter = counter

    @property
    def total_workers(self) -> int:
        return self.world * self.num_workers

    def shard_at(self, q: int) -> int:
        """``S[q]``: epoch ``q // n`` is a permutation of the ``n`` shards seeded by ``(seed, epoch)``."""
        n = len(self.shards)
        e, i = divmod(q, n)
        cached = getattr(self, "_perm", None)
        if cached is None or cached[0] != e:
            cached = self._perm = (e, np.random.default_rng([self.seed, 3, e]).permutation(n))
        return int(cached[1][i])

    def block_order(self, q: int, block: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 7, q, block]).permutation(n)

    def samples(self, g: int) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray | None, tuple[int, int]]]:
        """Worker ``g``'s samples with the position after each: ``(ids, starts, pairs, (q, offset))``."""
        W = self.total_workers
        q, off = self.starts.get(g, (g, 0))
        on_corrupt = _Corruption(self.spec, self.counter)
        cache = NpyHeaderCache()
        B = self.buffer
        failures = 0
        while True:
            ref = self.shards[self.shard_at(q)]
            c = ref.samples
            if off < c:
                first = off // B * B  # resume at the start of the block holding sample `off`
                try:
                    items = read_shard(ref, self.spec, skip=first, cache=cache)  # whole shard, verified
                    failures = 0
                except CorruptShard as err:
                    on_corrupt(ref, err, "train")
                    failures += 1
                    if failures > len(self.shards):
                        raise DataError("every train shard this worker tried is corrupt or unreadable; check the manifest's shards") from None
                    items = []
                for lo in range(first, first + len(items), B):
                    block = items[lo - first:lo - first + B]
                    order = self.block_order(q, lo // B, len(block))
                    for k in range(off - lo, len(block)):
                        ids, starts, pairs = block[order[k]]
                        off += 1
                        yield ids, starts, pairs, ((q, off) if off < c else (q + W, 0))
                items = block = ids = starts = pairs = None  # let the shard's buffer go before the next one is read
            q, off = q + W, 0

    def __iter__(self):
        w, nw = worker_id()
        if nw != self.num_workers and get_worker_info() is not None:
            raise RuntimeError(f"TrainStream built for {self.num_workers} workers runs in {nw}")
        g = self.rank * self.num_workers + w
        L, Bsz = self.spec.seq_len, self.batch_size
        rows, starts, pairs = [], [], []
        for ids, st, pr, nxt in self.samples(g):
            rows.append(ids)
            starts.append(st)
            pairs.append(pr)
            if len(rows) == Bsz:
                yield make_batch(rows, starts, L, pos=(g, nxt[0], nxt[1]), pairs=pairs, prompts=self.spec.prompts)
                rows, starts, pairs = [], [], []
            if nxt[1] == 0:  # a shard ended: hold no view of its buffer (copy a partial batch) while the next is read
                rows, starts, pairs = _owned(rows), _owned(starts), _owned(pairs)
                ids = st = pr = None


def rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, balanced share of ``n`` items for ``rank``."""
    return rank * n // world, (rank + 1) * n // world


class ValStream(IterableDataset):
    """Finite, deterministic batches; each of the first ``total`` val samples once across ranks."""

    def __init__(self, shards: list[ShardRef], spec: StreamSpec, *, batch_size: int, total: int, rank: int,
                 world: int, counter=None):
        self.shards = shards
        self.spec = spec
        self.batch_size = batch_size
        self.total = total
        self.rank, self.world = rank, world
        self.counter = counter
        self.offsets = np.concatenate([[0], np.cumsum([s.samples for s in shards])]).astype(np.int64)

    def batches_per_rank(self) -> int:
        slots = math.ceil(self.total / self.world) if self.total else 0
        return math.ceil(slots / self.batch_size)

    def __len__(self) -> int:  # batches this rank yields (all workers together)
        return self.batches_per_rank()

    def _read(self, lo: int, hi: int, faults: list) -> Iterator[tuple | None]:
        """Samples ``lo..hi-1`` (global val index), ``None`` for unreadable ones (their messages
        go to ``faults`` under on_corrupt=fail).

        A shard wholly inside the range is read whole and verified (:func:`read_shard`). A shard only
        partly inside it (at most the first and the last of a worker's run, where max_val_samples or the
        rank/worker split cuts it) is streamed only as far as needed (:func:`stream_shard`): its tar
        headers and samples are checked, its sha256 and size are not, as that would mean reading all of it.
        """
        on_corrupt = _Corruption(self.spec, self.counter)
        cache = NpyHeaderCache()
        i = lo
        while i < hi:
            s = int(np.searchsorted(self.offsets, i, side="right")) - 1
            ref = self.shards[s]
            first, stop = i - int(self.offsets[s]), min(hi, int(self.offsets[s + 1])) - int(self.offsets[s])
            got = first
            try:
                if first == 0 and stop == ref.samples:
                    items = read_shard(ref, self.spec, cache=cache)
                    tail = len(items) - self.batch_size  # rows from here may share a batch with the next shard
                    for k, item in enumerate(items):
                        yield item if k < tail else tuple(_owned(list(item)))
                        got += 1
                    items = item = None  # let the shard's buffer go before the next one is read
                else:
                    for item in stream_shard(ref, self.spec, skip=first, stop=stop, cache=cache):
                        yield item
                        got += 1
            except CorruptShard as err:
                msg = on_corrupt(ref, err, "val")
                if msg:
                    faults.append(msg)
                for _ in range(got, stop):
                    yield None
            i = int(self.offsets[s]) + stop

    def __iter__(self):
        w, nw = worker_id()
        nb = self.batches_per_rank()
        j0, j1 = w * nb // nw, (w + 1) * nb // nw
        if j0 >= j1:
            return
        a, b = rank_range(self.total, self.rank, self.world)
        n_real = b - a
        Bsz, L = self.batch_size, self.spec.seq_len
        lo, hi = a + min(n_real, j0 * Bsz), a + min(n_real, j1 * Bsz)
        faults: list[str] = []
        reader = self._read(lo, hi, faults)
        pad_row = np.full(L, self.spec.pad_id, dtype=np.int64)
        for j in range(j0, j1):
            rows, starts, pairs, real = [], [], [], []
            for r in range(Bsz):
                slot = j * Bsz + r
                item = next(reader) if slot < n_real else None
                real.append(item is not None)
                rows.append(pad_row if item is None else item[0])
                starts.append(None if item is None else item[1])
                pairs.append(None if item is None else item[2])
            yield make_batch(rows, starts, L, real=real, fault=faults[0] if faults else None, pairs=pairs,
                             prompts=self.spec.prompts)
