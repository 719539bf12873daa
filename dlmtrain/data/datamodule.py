"""The streaming LightningDataModule: manifest -> train/val DataLoaders, with a resumable position.

Resume granularity: one sample per DataLoader worker. Every train batch carries the
position after its last sample (shard-sequence index ``q`` + offset in that shard's
block-shuffled order); the main process records a batch's position when Lightning
hands that batch to the training step (``on_before_batch_transfer``), not when the
loader prefetched it, so a checkpoint holds exactly what was trained on. ``state_dict``
gathers the positions of every rank's workers (an ``all_gather_object`` when
torch.distributed is initialised: Lightning calls it on all ranks while saving).

On restore with the same ranks x workers, each worker continues at its first unseen
sample. With a different topology the positions cannot be mapped one to one: the
stream restarts at the shard after the furthest one any worker had reached (no replay;
the unread rest of the partly read shards is skipped for this epoch), with a warning.
With a different set of train shards the stream starts afresh, with a warning.

``data/skipped_shards``: ``dm.skipped_shards`` counts corrupt shards skipped by this
rank (train and val, all workers; a shared counter), restored from checkpoints; the
:class:`DataMetrics` callback logs its sum over ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import warnings
from collections import deque

import lightning as L
import torch
from torch.utils.data import DataLoader

from dlmtrain.data.format import join_url, open_url
from dlmtrain.data.stream import ShardRef, StreamSpec, TrainStream, ValStream, unpack
from dlmtrain.data.tokenizer import Tokenizer, from_manifest
from dlmtrain.errors import DataError

log = logging.getLogger("dlmtrain.data")
STATE_VERSION = 1
# ValStream's __len__ is exact for any number of workers (it splits batches, not samples, between them).
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def dist_info() -> tuple[int, int]:
    """(rank, world size): torch.distributed when initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _worker_message(e: Exception) -> str:
    """The original one-line message of an error re-raised by a DataLoader worker."""
    msg = str(e)
    if not msg.startswith("Caught "):
        return msg
    lines = [ln for ln in msg.splitlines() if ln.strip()]
    last = lines[-1] if lines else msg
    name = type(e).__name__
    for prefix in (f"{type(e).__module__}.{name}: ", f"{name}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


def _quiet_worker(worker_id: int) -> None:
    """DataLoader workers ignore stop signals: Ctrl-C (the whole process group) or Slurm's
    --signal (every process of the step) would otherwise kill them mid-batch, and the main
    process could not finish its step and save. The main process shuts them down."""
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


class _TrackedIter:
    def __init__(self, it, loader: "TrackedLoader"):
        self._it = it
        self._loader = loader
        self._last = None  # the last batch handed out

    def __iter__(self):
        return self

    def _shutdown(self) -> None:
        # stop the workers now: left to garbage collection, torch waits 5 s per worker after a worker error
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:
                pass

    def __next__(self):
        dm = self._loader.owner
        if dm is not None and self._loader.split == "val" and dm.stop_eval:
            self._shutdown()
            raise StopIteration  # a stop was agreed: end validation here on every rank
        if self._loader.split == "train" and self._last is not None and dm is not None and dm.data_fault:
            raise DataError(dm.data_fault)  # the stop handler should have stopped before asking again
        try:
            batch = next(self._it)
        except StopIteration:
            raise
        except Exception as e:
            self._shutdown()
            if not isinstance(e, DataError):
                raise
            msg = _worker_message(e)
            if dm is None or not dm.defer_faults or self._loader.split != "train" or self._last is None:
                raise DataError(msg) from None
            # Defer: Lightning fetches one batch ahead, so the batch already handed out is still
            # to be trained. Answer with a stand-in (never trained: the stop handler sees
            # data_fault at the end of the current batch and all ranks save and stop there).
            # Not StopIteration: Lightning would take the current batch as the epoch's last and
            # step the optimizer on a partial gradient accumulation.
            dm.data_fault = msg
            return self._last
        batch, pos, fault = unpack(batch)
        if fault:  # a corrupt val shard under on_corrupt=fail: its rows arrived as padding
            if dm is None or not dm.defer_faults:
                self._shutdown()
                raise DataError(fault)
            dm.data_fault = dm.data_fault or fault
        if pos is not None and self._loader.on_fetch is not None:
            self._loader.on_fetch(pos)
        self._last = batch
        return batch


class TrackedLoader(DataLoader):
    """A DataLoader over TrainStream/ValStream: unpacks the workers' batches into
    ``input_ids``/``segment_ids`` (+ ``attention_mask`` for val and for prompt-conditioned data,
    + ``prompt_mask`` for the latter), hands each train batch's
    position to ``on_fetch``, and turns worker DataErrors back into one line. With an
    ``owner`` DataModule, a data error after the first train batch is recorded in
    ``owner.data_fault`` and ends the stream (see ``_TrackedIter``)."""

    def __init__(self, *args, on_fetch=None, owner=None, split: str = "train", **kw):
        kw.setdefault("worker_init_fn", _quiet_worker)
        super().__init__(*args, **kw)
        self.on_fetch = on_fetch
        self.owner = owner
        self.split = split

    def __iter__(self):
        if self.owner is not None and self.split == "train" and self.owner.data_fault:
            raise DataError(self.owner.data_fault)
        return _TrackedIter(super().__iter__(), self)


class ShardDataModule(L.LightningDataModule):
    """Batches from a shard manifest. See the module docstring and dlmtrain/data/stream.py."""

    def __init__(self, manifest: dict, *, micro_batch_size: int, num_workers: int = 1, shuffle_buffer: int = 1000,
                 on_corrupt: str = "fail", max_val_samples: int = 0, seed: int = 0, shard_url: str = "",
                 pin_memory: bool | None = None, verify_checksums: bool = True):
        super().__init__()
        if micro_batch_size < 1:
            raise DataError(f"micro batch size must be >= 1, got {micro_batch_size}")
        if on_corrupt not in ("fail", "skip"):
            raise DataError(f"data.on_corrupt={on_corrupt!r} is not one of: fail, skip")
        self.manifest = manifest
        self.manifest_url = manifest.get("_where", "")
        self._shard_url = shard_url
        self.seq_len: int = int(manifest["seq_len"])
        self.vocab_size: int = int(manifest["vocab_size"])
        self.eos_id: int = int(manifest["eos_id"])
        self.bos_id: int | None = manifest.get("bos_id")
        self.pad_id: int | None = manifest.get("pad_id")
        self.mask_id: int | None = manifest.get("mask_id")
        # prompt/answer pairs: batches carry prompt_mask and attention_mask (dlmtrain/data/format.py)
        self.prompt_conditioned: bool = bool(manifest.get("prompt_conditioned", False))
        self.micro_batch_size = micro_batch_size
        self.num_workers = max(0, int(num_workers))
        self.shuffle_buffer = shuffle_buffer
        self.on_corrupt = on_corrupt
        self.max_val_samples = max_val_samples
        self.seed = int(seed)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.tokenizer: Tokenizer = from_manifest(manifest, self._read_text)
        self.train_shards = self._refs("train")
        self.val_shards = self._refs("val")
        if not self.train_shards:
            raise DataError(f"{self.manifest_url} lists no train shards")
        self.spec = StreamSpec(
            seq_len=self.seq_len, dtype=manifest["dtype"], vocab_size=self.vocab_size,
            pad_id=self.pad_id if self.pad_id is not None else self.eos_id, on_corrupt=on_corrupt,
            verify=bool(verify_checksums), prompts=self.prompt_conditioned,
        )
        names = [(s["name"], s.get("sha256", "")) for s in manifest["splits"]["train"]["shards"]]
        self.data_fingerprint = hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]
        self._counter = mp.Value("q", 0)  # corrupt shards skipped by this rank's workers
        self._skipped_base = 0
        self._positions: dict[int, tuple[int, int]] = {}  # committed, global worker id -> (q, offset)
        self._topology: tuple[int, int] | None = None  # (world, workers) the positions belong to
        self._fetched: deque = deque()
        self._samples_consumed = 0
        self._warned = False
        # Positions as of the last completed optimizer step (see _commit): what a checkpoint
        # saved in the middle of a step (gradient accumulation, a fault) must hold.
        self._step_positions: dict[int, tuple[int, int]] = {}
        self._step_consumed = 0
        self._snap_step = -1
        # Set by a stop handler that agrees on stops across ranks (dlmtrain.callbacks.stop.StopHandler):
        # then a fatal data error is recorded in data_fault and handled at the end of the step.
        self.defer_faults = False
        self.data_fault: str | None = None
        self.stop_eval = False  # set when a stop is agreed during validation

    def __getstate__(self):  # pickling/deepcopy: the skip counter's value travels, not the shared memory
        state = dict(self.__dict__)
        state["_counter"] = int(self._counter.value)
        return state

    def __setstate__(self, state):
        value = state.pop("_counter")
        self.__dict__.update(state)
        self._counter = mp.Value("q", value)

    # ------------------------------------------------------------------ manifest helpers

    def resolve(self, name: str) -> str:
        if self._shard_url:
            return self._shard_url.replace("{name}", name)
        return join_url(self.manifest_url, name)

    def _read_text(self, name: str) -> str:
        url = self.resolve(name)
        try:
            with open_url(url, "rb") as f:
                return f.read().decode("utf-8")
        except Exception as e:
            raise DataError(f"cannot read {url} (named by {self.manifest_url}): {e}") from None

    def _refs(self, split: str) -> list[ShardRef]:
        shards = self.manifest["splits"].get(split, {}).get("shards", [])
        return [ShardRef(self.resolve(s["name"]), s["name"], int(s["samples"]), s.get("sha256") or "",
                         int(s.get("bytes") or 0)) for s in shards if s["samples"] > 0]

    @property
    def val_samples(self) -> int:
        total = sum(s.samples for s in self.val_shards)
        return min(total, self.max_val_samples) if self.max_val_samples > 0 else total

    @property
    def skipped_shards(self) -> int:
        """Corrupt shards skipped by this rank so far (train and val, all workers)."""
        return self._skipped_base + int(self._counter.value)

    # ------------------------------------------------------------------ loaders

    def _workers(self) -> int:
        return max(1, self.num_workers)

    def _starts(self, rank: int, world: int) -> dict[int, tuple[int, int]]:
        nw = self._workers()
        mine = range(rank * nw, (rank + 1) * nw)
        if self._topology == (world, nw) and all(g in self._positions for g in mine):
            return {g: self._positions[g] for g in mine}
        if self._positions and self._topology is not None:
            base = max(q for q, _ in self._positions.values()) + 1
            if not self._warned:
                log.warning(
                    "data: the checkpoint's train position was saved with %d rank(s) x %d worker(s), now %d x %d; "
                    "continuing at shard position %d (no replay; the rest of partly read shards is skipped)",
                    self._topology[0], self._topology[1], world, nw, base)
                self._warned = True
            return {g: (base + g, 0) for g in mine}
        return {g: (g, 0) for g in mine}

    def train_dataloader(self) -> DataLoader:
        rank, world = dist_info()
        nw = self._workers()
        starts = self._starts(rank, world)
        self._positions = {**{g: p for g, p in self._positions.items() if self._topology == (world, nw)}, **starts}
        self._topology = (world, nw)
        self._fetched.clear()
        if len(self.train_shards) < world * nw:
            log.warning("data: %d train shards for %d rank(s) x %d worker(s): workers will read the same shards "
                        "at the same time; prepare more, smaller shards (data_prep --shard-size)",
                        len(self.train_shards), world, nw)
        ds = TrainStream(
            self.train_shards, self.spec, batch_size=self.micro_batch_size, seed=self.seed,
            buffer=self.shuffle_buffer, rank=rank, world=world, num_workers=nw, starts=starts, counter=self._counter,
        )
        return TrackedLoader(
            ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            on_fetch=self._on_fetch, persistent_workers=False, owner=self, split="train",
        )

    def val_dataloader(self) -> DataLoader:
        rank, world = dist_info()
        if not self.val_shards:
            raise DataError(f"{self.manifest_url} has no validation split; prepare with --val-fraction or --val-input")
        ds = ValStream(self.val_shards, self.spec, batch_size=self.micro_batch_size, total=self.val_samples,
                       rank=rank, world=world, counter=self._counter)
        # not persistent: a validation cut short by a stop shuts its workers down
        return TrackedLoader(
            ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, owner=self, split="val",
        )

    # ------------------------------------------------------------------ position tracking

    def _commit(self, pos: tuple[int, int, int]) -> None:
        step = self.trainer.global_step if self.trainer is not None else -1
        if step > self._snap_step:  # the first batch of a new optimizer step: snapshot the step boundary
            self._step_positions, self._step_consumed = dict(self._positions), self._samples_consumed
            self._snap_step = step
        g, q, off = (int(x) for x in pos)
        self._positions[g] = (q, off)
        self._samples_consumed += self.micro_batch_size

    def _saved_positions(self) -> tuple[dict[int, tuple[int, int]], int]:
        """Positions for a checkpoint: the current ones, unless batches of an optimizer step
        still in progress were committed (then the step boundary before them)."""
        if self.trainer is not None and self.trainer.global_step == self._snap_step:
            return self._step_positions, self._step_consumed
        return self._positions, self._samples_consumed

    def _on_fetch(self, pos: tuple[int, int, int]) -> None:
        if self.trainer is None:  # iterated by hand: fetched == consumed
            self._commit(pos)
        else:  # Lightning prefetches; commit when the batch reaches the training step
            self._fetched.append(pos)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if trainer is not None and trainer.training and self._fetched:
            self._commit(self._fetched.popleft())
        return batch

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict:
        rank, world = dist_info()
        nw = self._workers()
        saved, consumed = self._saved_positions()
        if self._topology != (world, nw):
            positions = self._starts(rank, world)
        else:
            mine = range(rank * nw, (rank + 1) * nw)
            positions = {g: saved.get(g, (g, 0)) for g in mine}
        local = {
            "rank": rank,
            "positions": {str(g): [int(q), int(o)] for g, (q, o) in positions.items()},
            "skipped_shards": self.skipped_shards,
            "samples_consumed": consumed,
        }
        gathered = [local]
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, local)
        merged: dict[str, list[int]] = {}
        for item in gathered:
            merged.update(item["positions"])
        return {
            "version": STATE_VERSION,
            "granularity": "sample, per DataLoader worker (shard-sequence position + offset)",
            "data_fingerprint": self.data_fingerprint,
            "seed": self.seed,
            "world": world,
            "num_workers": nw,
            "positions": merged,
            "skipped_shards": [int(item["skipped_shards"]) for item in gathered],
            "samples_consumed": [int(item["samples_consumed"]) for item in gathered],
        }

    def load_state_dict(self, state: dict) -> None:
        if not state or state.get("version") != STATE_VERSION:
            log.warning("data: no usable data position in the checkpoint; the train stream starts afresh")
            return
        rank, world = dist_info()
        skipped = state.get("skipped_shards", [])
        consumed = state.get("samples_consumed", [])
        same_world = len(skipped) == world
        self._skipped_base = int(skipped[rank]) if same_world else int(sum(skipped) // max(1, world))
        self._samples_consumed = int(consumed[rank]) if len(consumed) == world else 0
        if state.get("data_fingerprint") != self.data_fingerprint:
            log.warning("data: the train shards differ from the checkpoint's; the train stream starts afresh")
            return
        self.seed = int(state["seed"])  # keep the order the run started with
        self._positions = {int(g): (int(q), int(o)) for g, (q, o) in state["positions"].items()}
        self._topology = (int(state["world"]), int(state["num_workers"]))
        self._fetched.clear()
        self._snap_step = -1


class DataMetrics(L.Callback):
    """Logs ``data/skipped_shards`` (summed over ranks) every training step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "skipped_shards"):
            return
        pl_module.log("data/skipped_shards", float(dm.skipped_shards), on_step=True, on_epoch=False,
                      sync_dist=trainer.world_size > 1, reduce_fx="sum")
