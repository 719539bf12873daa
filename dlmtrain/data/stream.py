"""Streams of batches read from shards: an infinite shuffled train stream, a finite exact val stream.

Both are ``IterableDataset``s that yield whole batches (use ``DataLoader(batch_size=None)``
and :func:`unpack`, as ``TrackedLoader`` does) and split work by rank and by DataLoader
worker themselves; rank/world come from the caller (torch.distributed, else
RANK/WORLD_SIZE, else 0/1). A batch leaves a worker as one int64 tensor ``[2, B, L]``
(ids, segment ids) plus plain Python values: one shared-memory hand-over per batch.

``segment_ids`` number the documents within each row from 0; a new segment starts right
after each EOS (EOS belongs to the document it ends), read from the ``doc_starts`` member.

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

import logging
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dlmtrain.data.format import DOCS, IDS, CorruptShard, NpyHeaderCache, iter_samples, open_url
from dlmtrain.errors import DataError

log = logging.getLogger("dlmtrain.data")


@dataclass(frozen=True)
class ShardRef:
    url: str
    name: str
    samples: int


@dataclass(frozen=True)
class StreamSpec:
    seq_len: int
    dtype: str
    vocab_size: int
    pad_id: int
    on_corrupt: str  # fail | skip


def worker_id() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def read_shard(ref: ShardRef, spec: StreamSpec, skip: int = 0, check_count: bool = True,
               cache: NpyHeaderCache | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """``(input_ids, doc_starts or None)`` of one shard, from sample ``skip`` on. Raises CorruptShard."""
    cache = cache or NpyHeaderCache()
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    L, V = spec.seq_len, spec.vocab_size
    try:
        f = open_url(ref.url, "rb")
    except Exception as e:
        raise CorruptShard(f"cannot open ({type(e).__name__}: {e})") from None
    n = skip
    try:
        try:
            for sample in iter_samples(f, skip=skip):
                raw = sample.get(IDS)
                if raw is None:
                    raise CorruptShard(f"sample {sample['__key__']} has no {IDS}")
                try:
                    ids = cache.decode(raw)
                    starts = cache.decode(sample[DOCS]) if DOCS in sample else None
                except (ValueError, KeyError) as e:
                    raise CorruptShard(f"sample {sample['__key__']}: {e}") from None
                if ids.dtype != dtype or len(ids) != L:
                    raise CorruptShard(f"sample {sample['__key__']}: {ids.dtype}[{len(ids)}], expected {dtype}[{L}]")
                if int(ids.max()) >= V:
                    raise CorruptShard(f"sample {sample['__key__']}: token id {int(ids.max())} >= vocab size {V}")
                if starts is not None and len(starts) and (starts[0] <= 0 or starts[-1] >= L or np.any(np.diff(starts) <= 0)):
                    raise CorruptShard(f"sample {sample['__key__']}: bad doc_starts")
                n += 1
                yield ids, starts
        except CorruptShard:
            raise
        except (OSError, EOFError, ValueError) as e:  # pipe exit status, I/O errors
            raise CorruptShard(f"read error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if check_count and n != ref.samples:
            raise CorruptShard(f"has {n} samples, the manifest says {ref.samples}")
    finally:
        try:
            f.close()
        except Exception:
            pass


def _segments(starts_list: list, B: int, L: int) -> np.ndarray:
    marks = np.zeros((B, L), dtype=np.int64)
    for i, s in enumerate(starts_list):
        if s is not None and len(s):
            marks[i, s] = 1
    return np.cumsum(marks, axis=1, out=marks)


def make_batch(rows: list[np.ndarray], starts: list, L: int, real: list[bool] | None = None, pos=None,
               fault: str | None = None) -> dict:
    """A batch as it leaves a worker: ids and segment ids in ONE int64 tensor ``[2, B, L]`` (one shared-memory
    transfer instead of several), the row mask, position and any fatal-data message as plain Python values.
    :func:`unpack` opens it."""
    B = len(rows)
    packed = np.empty((2, B, L), dtype=np.int64)
    np.stack(rows, out=packed[0])
    packed[1] = _segments(starts, B, L)
    return {"_packed": torch.from_numpy(packed), "_rows": real, "_pos": pos, "_fault": fault}


def unpack(batch: dict) -> tuple[dict, tuple | None, str | None]:
    """``(batch for the model, position, fault message)`` from a worker's batch (see :func:`make_batch`)."""
    packed = batch["_packed"]
    out = {"input_ids": packed[0], "segment_ids": packed[1]}
    if batch.get("_rows") is not None:
        out["attention_mask"] = torch.tensor(batch["_rows"], dtype=torch.bool)[:, None].expand(packed.shape[1:]).clone()
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

    def samples(self, g: int) -> Iterator[tuple[np.ndarray, np.ndarray | None, tuple[int, int]]]:
        """Worker ``g``'s samples with the position after each: ``(ids, starts, (q, offset))``."""
        W = self.total_workers
        q, off = self.starts.get(g, (g, 0))
        on_corrupt = _Corruption(self.spec, self.counter)
        cache = NpyHeaderCache()
        B = self.buffer
        failures = 0
        while True:
            ref = self.shards[self.shard_at(q)]
            c = ref.samples
            if off >= c:
                q, off = q + W, 0
                continue
            try:
                block = off // B
                rows: list = []
                for item in read_shard(ref, self.spec, skip=block * B, cache=cache):
                    rows.append(item)
                    end = min(c, (block + 1) * B)
                    if len(rows) == end - block * B:
                        order = self.block_order(q, block, len(rows))
                        for k in range(off - block * B, len(rows)):
                            ids, starts = rows[order[k]]
                            off += 1
                            nxt = (q, off) if off < c else (q + W, 0)
                            yield ids, starts, nxt
                        rows = []
                        block += 1
                failures = 0
            except CorruptShard as err:
                on_corrupt(ref, err, "train")
                failures += 1
                if failures > len(self.shards):
                    raise DataError("every train shard this worker tried is corrupt or unreadable; check the manifest's shards") from None
            q, off = q + W, 0

    def __iter__(self):
        w, nw = worker_id()
        if nw != self.num_workers and get_worker_info() is not None:
            raise RuntimeError(f"TrainStream built for {self.num_workers} workers runs in {nw}")
        g = self.rank * self.num_workers + w
        L, Bsz = self.spec.seq_len, self.batch_size
        rows, starts = [], []
        for ids, st, nxt in self.samples(g):
            rows.append(ids)
            starts.append(st)
            if len(rows) == Bsz:
                yield make_batch(rows, starts, L, pos=(g, nxt[0], nxt[1]))
                rows, starts = [], []


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

    def _read(self, lo: int, hi: int, faults: list) -> Iterator[tuple[np.ndarray, np.ndarray | None] | None]:
        """Samples ``lo..hi-1`` (global val index), ``None`` for unreadable ones (their messages
        go to ``faults`` under on_corrupt=fail)."""
        on_corrupt = _Corruption(self.spec, self.counter)
        cache = NpyHeaderCache()
        i = lo
        while i < hi:
            s = int(np.searchsorted(self.offsets, i, side="right")) - 1
            ref = self.shards[s]
            first, stop = i - int(self.offsets[s]), min(hi, int(self.offsets[s + 1])) - int(self.offsets[s])
            try:
                got = first
                for item in read_shard(ref, self.spec, skip=first, check_count=stop == ref.samples, cache=cache):
                    if got >= stop:
                        break
                    yield item
                    got += 1
                if got < stop:
                    raise CorruptShard(f"ends after {got} samples, the manifest says {ref.samples}")
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
            rows, starts, real = [], [], []
            for r in range(Bsz):
                slot = j * Bsz + r
                item = next(reader) if slot < n_real else None
                real.append(item is not None)
                rows.append(pad_row if item is None else item[0])
                starts.append(None if item is None else item[1])
            yield make_batch(rows, starts, L, real=real, fault=faults[0] if faults else None)
