"""Shard sha256/size verification against the manifest: corrupt token bytes that every
other check accepts (same size, intact tar headers, valid token ids) never reach training."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dlmtrain.config import load_config
from dlmtrain.data import build_datamodule
from dlmtrain.data.datamodule import ShardDataModule
from dlmtrain.data.format import CorruptShard, iter_samples, read_manifest
from dlmtrain.data.stream import ShardRef, StreamSpec, read_shard, stream_shard
from dlmtrain.data.synthetic import write_synthetic
from dlmtrain.errors import DataError

L_SEQ = 64  # 128 bytes of uint16 tokens per sample: room for 64 zeroed bytes inside one sample
ZEROED = 32  # tokens zeroed by _zero_tokens (64 bytes)


def synth(tmp_path: Path, **kw) -> Path:
    kw.setdefault("seq_len", L_SEQ)
    kw.setdefault("vocab_size", 1000)
    kw.setdefault("mean_doc_tokens", 20)
    return write_synthetic(tmp_path / "shards", **kw)


def make_dm(manifest: Path, batch: int = 4, **kw) -> ShardDataModule:
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 4)
    kw.setdefault("pin_memory", False)
    return ShardDataModule(read_manifest(str(manifest)), micro_batch_size=batch, **kw)


def shard_rows(path: Path) -> list[bytes]:
    """Token bytes of every sample of a shard, read with tar header checks but no checksum."""
    with open(path, "rb") as f:
        return [bytes(np.frombuffer(s["input_ids.npy"], np.uint8)[-2 * L_SEQ:]) for s in iter_samples(f)]


def rows(batch) -> list[bytes]:
    ids = batch["input_ids"].numpy().astype(np.uint16)
    mask = batch.get("attention_mask")
    return [ids[i].tobytes() for i in range(len(ids)) if mask is None or bool(mask[i].any())]


def _zero_tokens(path: Path, sample: int) -> bytes:
    """Zero 64 bytes in the middle of ``sample``'s token data; returns that sample's new token bytes.

    Size, tar headers and .npy header stay intact and 0 is a valid token id: only the sha256 can tell."""
    size = path.stat().st_size
    with tarfile.open(path) as t:
        member = [m for m in t.getmembers() if m.name.endswith("input_ids.npy")][sample]
    start = member.offset_data + member.size - 2 * L_SEQ + L_SEQ // 2  # inside the token payload
    data = bytearray(path.read_bytes())
    assert any(data[start:start + 64])
    data[start:start + 64] = bytes(64)
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size
    got = shard_rows(path)  # headers intact: the old checks read it without complaint
    assert got[sample].count(b"\0" * 64) == 1
    return got[sample]


def _ref(manifest: Path, split: str, i: int) -> ShardRef:
    m = read_manifest(str(manifest))
    s = m["splits"][split]["shards"][i]
    return ShardRef(str(manifest.parent / s["name"]), s["name"], s["samples"], s["sha256"], s["bytes"])


SPEC = StreamSpec(seq_len=L_SEQ, dtype="uint16", vocab_size=1000, pad_id=0, on_corrupt="fail")


@pytest.mark.parametrize("via", ["file", "pipe"])
def test_zeroed_token_bytes_fail_names_shard_and_sha256(tmp_path, via):
    man = synth(tmp_path, train_shards=3, samples_per_shard=8, val_shards=1)
    ref = _ref(man, "train", 1)
    _zero_tokens(man.parent / "train-000001.tar", 4)
    hex16 = r"[0-9a-f]{16}\.\.\."
    with pytest.raises(CorruptShard, match=rf"^sha256 mismatch: manifest says {hex16}, file has {hex16}$"):
        read_shard(ref, SPEC)
    kw = {"shard_url": f"pipe:cat {man.parent}/{{name}}"} if via == "pipe" else {}
    dm = make_dm(man, on_corrupt="fail", **kw)
    it = iter(dm.train_dataloader())
    with pytest.raises(DataError) as ei:
        for _ in range(6):  # one epoch is 6 batches: the bad shard is reached
            next(it)
    msg = str(ei.value)
    assert "train-000001.tar" in msg and "sha256 mismatch" in msg and "on_corrupt=skip" in msg and "\n" not in msg


def test_zeroed_shard_skipped_counted_and_none_of_its_samples_yielded(tmp_path):
    man = synth(tmp_path, train_shards=3, samples_per_shard=8, val_shards=1)
    bad_path = man.parent / "train-000001.tar"
    bad = set(shard_rows(bad_path))
    good = set(shard_rows(man.parent / "train-000000.tar")) | set(shard_rows(man.parent / "train-000002.tar"))
    bad.add(_zero_tokens(bad_path, 4))
    dm = make_dm(man, on_corrupt="skip")
    loader = dm.train_dataloader()
    it = iter(loader)
    got = [r for _ in range(10) for r in rows(next(it))]  # 40 samples: 2.5 epochs of the 16 good ones
    assert not set(got) & bad  # not even the 7 intact samples of the bad shard
    assert set(got) == good and len(got) == 40
    q, _ = dm._positions[0]  # the bad shard was tried (and skipped) at each earlier position that holds it
    assert dm.skipped_shards == sum(loader.dataset.shard_at(p) == 1 for p in range(q)) >= 2


def test_resume_inside_a_shard_verifies_the_whole_shard(tmp_path):
    man = synth(tmp_path, train_shards=2, samples_per_shard=8, val_shards=1)
    dm = make_dm(man, batch=2, on_corrupt="fail")
    loader = dm.train_dataloader()
    take = iter(loader)
    for _ in range(3):
        next(take)
    state = dm.state_dict()
    q, off = state["positions"]["0"]
    assert off == 6  # resume at block 1 (samples 4..7) of the first shard
    ts = loader.dataset
    name = f"train-{ts.shard_at(q):06d}.tar"
    _zero_tokens(man.parent / name, 1)  # in block 0: before the resume point, never read again
    with pytest.raises(CorruptShard, match="sha256 mismatch"):
        read_shard(_ref(man, "train", ts.shard_at(q)), SPEC, skip=6)
    dm2 = make_dm(man, batch=2, on_corrupt="fail")
    dm2.load_state_dict(state)
    with pytest.raises(DataError, match=f"{name}: sha256 mismatch"):
        next(iter(dm2.train_dataloader()))
    dm3 = make_dm(man, batch=2, on_corrupt="skip")
    dm3.load_state_dict(state)
    other = set(shard_rows(man.parent / f"train-{ts.shard_at(q + 1):06d}.tar"))
    assert set(rows(next(iter(dm3.train_dataloader())))) <= other and dm3.skipped_shards == 1


def test_verify_checksums_false_trains_on_the_corrupt_shard(tmp_path):
    """The opt-out, from the config through build_datamodule: the zeroed sample is read as data."""
    man = synth(tmp_path, train_shards=1, samples_per_shard=8, val_shards=1)
    zeroed = _zero_tokens(man.parent / "train-000000.tar", 4)
    cfg = load_config(None, [f"data.manifest={man}", "data.num_workers=0", "data.shuffle_buffer=4"])
    assert cfg.data.verify_checksums is True and build_datamodule(cfg, 4).spec.verify is True
    cfg = load_config(None, [f"data.manifest={man}", "data.num_workers=0", "data.shuffle_buffer=4",
                             "data.verify_checksums=false"])
    dm = build_datamodule(cfg, 4)
    assert dm.spec.verify is False
    it = iter(dm.train_dataloader())
    got = rows(next(it)) + rows(next(it))
    assert zeroed in got and len(set(got)) == 8
    assert sum(r.count(b"\0\0") >= ZEROED for r in got) == 1


def test_manifest_without_sha256_reads_unverified(tmp_path):
    man = synth(tmp_path, train_shards=2, samples_per_shard=8, val_shards=1)
    zeroed = _zero_tokens(man.parent / "train-000001.tar", 2)
    m = json.loads(man.read_text())
    for s in m["splits"]["train"]["shards"]:  # as an older manifest: no checksums, no sizes
        del s["sha256"], s["bytes"]
    man.write_text(json.dumps(m))
    dm = make_dm(man, on_corrupt="fail")
    it = iter(dm.train_dataloader())
    got = [r for _ in range(4) for r in rows(next(it))]
    both = set(shard_rows(man.parent / "train-000000.tar")) | set(shard_rows(man.parent / "train-000001.tar"))
    assert set(got) == both
    assert zeroed in got
    ref = ShardRef(str(man.parent / "train-000001.tar"), "train-000001.tar", 8)
    assert len(read_shard(ref, SPEC)) == 8


def test_unhashed_shard_still_has_tar_header_checks(tmp_path):
    man = synth(tmp_path, train_shards=1, samples_per_shard=8, val_shards=0)
    path = man.parent / "train-000000.tar"
    with tarfile.open(path) as t:
        offset = [m for m in t.getmembers()][5].offset  # a header in the middle
    data = bytearray(path.read_bytes())
    data[offset + 10] ^= 0x20  # flip a bit of the member's name
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShard, match="^bad tar header checksum$"):
        read_shard(ShardRef(str(path), path.name, 8), SPEC)
    with pytest.raises(CorruptShard, match="^sha256 mismatch"):
        read_shard(_ref(man, "train", 0), SPEC)


def test_size_mismatch_named(tmp_path):
    man = synth(tmp_path, train_shards=1, samples_per_shard=8, val_shards=0)
    path = man.parent / "train-000000.tar"
    n = path.stat().st_size
    with open(path, "ab") as f:
        f.write(bytes(10240))  # more end-of-archive padding: every other check passes
    with pytest.raises(CorruptShard, match=f"^size mismatch: manifest says {n} bytes, file has {n + 10240}$"):
        read_shard(_ref(man, "train", 0), SPEC)
    assert len(read_shard(_ref(man, "train", 0), dataclasses.replace(SPEC, verify=False))) == 8


def test_val_verifies_whole_shards_not_partly_read_ones(tmp_path):
    man = synth(tmp_path, train_shards=1, samples_per_shard=8, val_shards=2, val_samples_per_shard=6)
    zeroed = _zero_tokens(man.parent / "val-000000.tar", 1)
    second = set(shard_rows(man.parent / "val-000001.tar"))
    dm = make_dm(man, batch=4, on_corrupt="skip")
    val = [r for b in dm.val_dataloader() for r in rows(b)]
    assert set(val) == second and len(val) == 6 and dm.skipped_shards == 1  # the whole bad shard is padding
    # max_val_samples=4 reads only part of the bad shard: streamed, its checksum unchecked (documented)
    dm = make_dm(man, batch=4, on_corrupt="skip", max_val_samples=4)
    val = [r for b in dm.val_dataloader() for r in rows(b)]
    assert len(val) == 4 and zeroed in val and dm.skipped_shards == 0
    assert [x[0].tobytes() for x in stream_shard(_ref(man, "val", 0), SPEC, skip=1, stop=2)] == [zeroed]


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def test_a_reader_holds_one_shard_in_memory(tmp_path, monkeypatch):
    """No view into a shard's buffer outlives it when the next shard is read (batches crossing shards included)."""
    import gc
    import weakref

    import dlmtrain.data.stream as stream

    real, buffers = stream.read_shard, []

    def spy(*args, **kw):
        gc.collect()
        assert sum(b() is not None for b in buffers) == 0
        items = real(*args, **kw)
        buffers.append(weakref.ref(_root(items[0][0])))
        return items

    monkeypatch.setattr(stream, "read_shard", spy)
    man = synth(tmp_path, train_shards=3, samples_per_shard=10, val_shards=3)  # 10 samples: batches of 4 cross shards
    dm = make_dm(man, batch=4)
    it = iter(dm.train_dataloader())
    for _ in range(9):
        next(it)
    assert len(buffers) == 4
    buffers.clear()
    assert sum(len(rows(b)) for b in dm.val_dataloader()) == 30 and len(buffers) == 3
