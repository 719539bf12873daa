"""The streaming DataModule: batches, exact val partition, resume without replay, corrupt shards."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dlmtrain.data import build_datamodule
from dlmtrain.data.datamodule import DataMetrics, ShardDataModule
from dlmtrain.data.format import read_manifest
from dlmtrain.data.stream import ShardRef, StreamSpec, read_shard
from dlmtrain.data.synthetic import write_synthetic
from dlmtrain.errors import DataError

L_SEQ = 16


def synth(tmp_path: Path, **kw) -> Path:
    kw.setdefault("seq_len", L_SEQ)
    kw.setdefault("vocab_size", 1000)
    kw.setdefault("mean_doc_tokens", 6)
    return write_synthetic(tmp_path / "shards", **kw)


def make_dm(manifest: Path, batch: int = 4, **kw) -> ShardDataModule:
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 8)
    kw.setdefault("pin_memory", False)  # pinning touches CUDA, which a forked test process must not
    return ShardDataModule(read_manifest(str(manifest)), micro_batch_size=batch, **kw)


def rows(batch, real_only=True) -> list[bytes]:
    ids = batch["input_ids"].numpy().astype(np.uint16)
    mask = batch.get("attention_mask")
    keep = range(len(ids)) if mask is None or not real_only else [i for i in range(len(ids)) if bool(mask[i].any())]
    return [ids[i].tobytes() for i in keep]


def all_rows(manifest: Path, split: str) -> list[bytes]:
    m = read_manifest(str(manifest))
    spec = StreamSpec(seq_len=m["seq_len"], dtype=m["dtype"], vocab_size=m["vocab_size"], pad_id=0, on_corrupt="fail")
    out = []
    for s in m["splits"][split]["shards"]:
        ref = ShardRef(str(Path(m["_where"]).parent / s["name"]), s["name"], s["samples"])
        out.extend(ids.astype(np.uint16).tobytes() for ids, _, _ in read_shard(ref, spec))
    return out


def take(loader_iter, n: int) -> list:
    return [next(loader_iter) for _ in range(n)]


@pytest.fixture
def ranks(monkeypatch):
    def set_rank(rank: int, world: int):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))

    return set_rank


def test_build_datamodule_attributes_and_batches(tmp_path):
    import data_prep

    (tmp_path / "t").mkdir()
    docs = [f"document {i} " + "word " * (i % 13) for i in range(60)]
    for i, d in enumerate(docs):
        (tmp_path / "t" / f"{i:03d}.txt").write_text(d)
    data_prep.prepare(data_prep.PrepOptions(inputs=[str(tmp_path / "t")], out=str(tmp_path / "p"), tokenizer="bytes",
                                            seq_len=24, val_fraction=0.2, quiet=True, progress=False, workers=1))
    cfg = OmegaConf.create({"data": {"kind": "shards", "manifest": str(tmp_path / "p"), "num_workers": 1,
                                     "shuffle_buffer": 10, "on_corrupt": "fail", "max_val_samples": 0, "shard_url": ""},
                            "trainer": {"seed": 3}})
    dm = build_datamodule(cfg, 5)
    assert (dm.vocab_size, dm.eos_id, dm.mask_id, dm.pad_id, dm.bos_id, dm.seq_len) == (260, 258, 259, 256, 257, 24)
    assert dm.tokenizer.decode(dm.tokenizer.encode("héllo")) == "héllo"
    b = next(iter(dm.train_dataloader()))
    assert set(b) == {"input_ids", "segment_ids"}
    assert b["input_ids"].shape == b["segment_ids"].shape == (5, 24) and b["input_ids"].dtype == torch.long
    for ids, seg in zip(b["input_ids"], b["segment_ids"]):  # a new segment starts right after each EOS
        eos = ids[:-1] == dm.eos_id
        assert torch.equal(seg[1:] - seg[:-1], eos.long()) and seg[0] == 0
    # the validation stream in order reproduces the val documents exactly (the round trip, through the loader)
    toks = torch.cat([r for vb in dm.val_dataloader() for r, m in zip(vb["input_ids"], vb["attention_mask"][:, 0])
                      if m]).numpy()
    pieces = np.split(toks, np.flatnonzero(toks == dm.eos_id) + 1)
    texts = [dm.tokenizer.decode(p[:-1]) for p in pieces if len(p) and p[-1] == dm.eos_id]
    assert texts and all(t in docs for t in texts)
    from data_prep.pipeline import _doc_hash

    val_docs = [d for d in docs if _doc_hash(d.encode())[0] < 0.2]
    assert texts == val_docs[: len(texts)] and len(texts) >= len(val_docs) - 2


def test_train_stream_covers_each_sample_once_per_epoch(tmp_path):
    man = synth(tmp_path, train_shards=3, samples_per_shard=20, val_shards=1)
    dm = make_dm(man, batch=4, shuffle_buffer=7)
    got = [r for b in take(iter(dm.train_dataloader()), 15) for r in rows(b)]
    want = all_rows(man, "train")
    assert sorted(got) == sorted(want) and got != want  # a permutation of the epoch, shuffled


def test_two_ranks_two_workers_split_train_shards(tmp_path, ranks):
    man = synth(tmp_path, train_shards=4, samples_per_shard=8, val_shards=1)
    seen = []
    for r in range(2):
        ranks(r, 2)
        dm = make_dm(man, batch=4, num_workers=2)
        seen += [x for b in take(iter(dm.train_dataloader()), 4) for x in rows(b)]
    assert sorted(seen) == sorted(all_rows(man, "train"))  # one epoch across 2 x 2 workers, no overlap


@pytest.mark.parametrize("total", [0, 17])
def test_val_partition_two_ranks_two_workers_exact(tmp_path, ranks, total):
    man = synth(tmp_path, train_shards=2, samples_per_shard=8, val_shards=3, val_samples_per_shard=7)  # 21 val
    want = all_rows(man, "val")[: total or None]
    seen, shapes = [], []
    for r in range(2):
        ranks(r, 2)
        dm = make_dm(man, batch=4, num_workers=2, max_val_samples=total)
        batches = list(dm.val_dataloader())
        assert len(batches) == len(dm.val_dataloader())  # reported length is exact
        shapes.append(len(batches))
        for b in batches:
            assert b["input_ids"].shape == (4, L_SEQ) and b["attention_mask"].dtype == torch.bool
            m = b["attention_mask"]
            assert torch.equal(m.all(1), m.any(1))  # a row is all real or all padding
            pad = ~m[:, 0]
            assert (b["input_ids"][pad] == dm.pad_id).all() and (b["segment_ids"][pad] == 0).all()
        seen += [x for b in batches for x in rows(b)]
    assert shapes[0] == shapes[1]  # same number of batches on every rank (no collective hangs)
    assert sorted(seen) == sorted(want) and len(seen) == len(set(seen)) == len(want)
    # deterministic: the same again
    ranks(0, 2)
    dm = make_dm(man, batch=4, num_workers=2, max_val_samples=total)
    assert [rows(b) for b in dm.val_dataloader()] == [rows(b) for b in dm.val_dataloader()]


def test_manual_resume_continues_exactly(tmp_path):
    man = synth(tmp_path, train_shards=3, samples_per_shard=24, val_shards=1)
    ref = make_dm(man, batch=4, num_workers=2)
    stream = [rows(b) for b in take(iter(ref.train_dataloader()), 14)]
    dm = make_dm(man, batch=4, num_workers=2)
    first = [rows(b) for b in take(iter(dm.train_dataloader()), 6)]
    state = dm.state_dict()
    assert state["samples_consumed"] == [24] and set(state["positions"]) == {"0", "1"}
    dm2 = make_dm(man, batch=4, num_workers=2)
    dm2.load_state_dict(state)
    rest = [rows(b) for b in take(iter(dm2.train_dataloader()), 8)]
    assert first + rest == stream
    assert not set(sum(first, [])) & set(sum(rest, []))  # no replay


def test_resume_with_other_worker_count_does_not_replay(tmp_path, caplog):
    man = synth(tmp_path, train_shards=6, samples_per_shard=12, val_shards=1)
    dm = make_dm(man, batch=4, num_workers=2)
    first = [x for b in take(iter(dm.train_dataloader()), 5) for x in rows(b)]
    state = dm.state_dict()
    dm2 = make_dm(man, batch=4, num_workers=1)
    dm2.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="dlmtrain.data"):
        rest = [x for b in take(iter(dm2.train_dataloader()), 6) for x in rows(b)]
    assert "saved with 1 rank(s) x 2 worker(s)" in caplog.text
    assert not set(first) & set(rest)


class _Recorder:
    """A tiny LightningModule that records the rows it trains on."""

    @staticmethod
    def make():
        import lightning as L

        class Rec(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))
                self.seen: list[list[bytes]] = []

            def training_step(self, batch, batch_idx):
                assert set(batch) == {"input_ids", "segment_ids"}
                self.seen.append(rows(batch))
                return (self.w * batch["input_ids"].float().mean()).sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        return Rec()


def _trainer(tmp_path: Path, max_steps: int, callbacks=()):
    import lightning as L

    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                     default_root_dir=str(tmp_path), callbacks=list(callbacks), use_distributed_sampler=False)


@pytest.mark.filterwarnings("ignore:.*validation_step.*", "ignore:.*callbacks used to create the checkpoint.*")
def test_lightning_checkpoint_resume_without_replay(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    man = synth(tmp_path, train_shards=4, samples_per_shard=16, val_shards=1)
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1, filename="s{step}",
                         auto_insert_metric_name=False)
    full = _Recorder.make()
    _trainer(tmp_path, 10, [ck]).fit(full, datamodule=make_dm(man, batch=4, num_workers=2))
    ckpt = tmp_path / "ck" / "s4.ckpt"
    assert ckpt.exists()
    state = torch.load(ckpt, weights_only=False)["ShardDataModule"]
    assert sum(state["samples_consumed"]) == 16  # what was trained on, not what the loader prefetched
    resumed = _Recorder.make()
    trainer = _trainer(tmp_path, 10, [DataMetrics()])
    trainer.fit(resumed, datamodule=make_dm(man, batch=4, num_workers=2), ckpt_path=str(ckpt))
    assert resumed.seen == full.seen[4:10]
    assert float(trainer.callback_metrics["data/skipped_shards"]) == 0.0
    assert not {x for b in full.seen[:4] for x in b} & {x for b in resumed.seen for x in b}


def _ddp_worker(rank: int, man: str, out: str, port: str):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        dm = make_dm(Path(man), batch=2, num_workers=0)
        it = iter(dm.train_dataloader())
        take(it, 3)
        state = dm.state_dict()  # gathers every rank's position
        nxt = rows(next(it))
        if rank == 0:
            torch.save(state, os.path.join(out, "state.pt"))
        torch.save(nxt, os.path.join(out, f"next{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_state_gathers_positions_of_all_ranks(tmp_path, ranks):
    import torch.multiprocessing as tmp_mp

    man = synth(tmp_path, train_shards=4, samples_per_shard=10, val_shards=1)
    import socket

    with socket.socket() as s:  # a free port, not a guess
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    tmp_mp.start_processes(_ddp_worker, args=(str(man), str(tmp_path), port), nprocs=2, start_method="fork")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["world"] == 2 and set(state["positions"]) == {"0", "1"}
    for r in range(2):  # each rank restores its own position from the one checkpoint rank 0 wrote
        ranks(r, 2)
        dm = make_dm(man, batch=2, num_workers=0)
        dm.load_state_dict(state)
        assert rows(next(iter(dm.train_dataloader()))) == torch.load(tmp_path / f"next{r}.pt", weights_only=False)


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        rng = np.random.default_rng(0)
        mid = len(data) // 3
        path.write_bytes(data[:mid] + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes() + data[mid + 3000:])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncate", "garbage", "missing"])
def test_corrupt_train_shard_fail_stops_with_one_line(tmp_path, how):
    man = synth(tmp_path, train_shards=3, samples_per_shard=8, val_shards=1)
    _corrupt(man.parent / "train-000001.tar", how)
    dm = make_dm(man, batch=4, num_workers=1, on_corrupt="fail")
    with pytest.raises(DataError) as ei:
        take(iter(dm.train_dataloader()), 6)
    msg = str(ei.value)
    assert "train-000001.tar" in msg and "on_corrupt=skip" in msg and "\n" not in msg


def test_corrupt_shards_skipped_logged_and_counted(tmp_path, caplog):
    man = synth(tmp_path, train_shards=3, samples_per_shard=8, val_shards=2, val_samples_per_shard=6)
    good = all_rows(man, "train")
    _corrupt(man.parent / "train-000001.tar", "truncate")
    _corrupt(man.parent / "val-000000.tar", "missing")
    dm = make_dm(man, batch=4, num_workers=0, on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="dlmtrain.data"):
        got = [x for b in take(iter(dm.train_dataloader()), 4) for x in rows(b)]  # one epoch of the 2 good shards
    assert "skipping corrupt train shard" in caplog.text and "train-000001.tar" in caplog.text
    assert set(got) <= set(good) and len(set(got)) == 16  # the two good shards (blocks of the bad one are dropped)
    assert dm.skipped_shards == 1
    val = list(dm.val_dataloader())  # the missing val shard's rows are padding; the good shard is all there
    assert len(val) == 3 and sum(int(b["attention_mask"][:, 0].sum()) for b in val) == 6
    assert dm.skipped_shards == 2
    # counted in worker processes too, and kept in the checkpoint state
    dm2 = make_dm(man, batch=4, num_workers=2, on_corrupt="skip")
    take(iter(dm2.train_dataloader()), 6)
    assert dm2.skipped_shards >= 1
    dm3 = make_dm(man, batch=4, on_corrupt="skip")
    dm3.load_state_dict(dm2.state_dict())
    assert dm3.skipped_shards == dm2.skipped_shards


def test_pipe_urls_via_shard_url_template(tmp_path):
    man = synth(tmp_path, train_shards=2, samples_per_shard=8, val_shards=1)
    direct = [rows(b) for b in make_dm(man).val_dataloader()]
    dm = make_dm(man, shard_url=f"pipe:cat {man.parent}/{{name}}")
    assert dm.val_shards[0].url.startswith("pipe:cat ")
    assert [rows(b) for b in dm.val_dataloader()] == direct
    # resuming mid-shard through a pipe (not seekable) skips by reading
    ref = [rows(b) for b in take(iter(make_dm(man).train_dataloader()), 3)]
    first = [rows(b) for b in take(iter(dm.train_dataloader()), 1)]
    dm2 = make_dm(man, shard_url=f"pipe:cat {man.parent}/{{name}}")
    dm2.load_state_dict(dm.state_dict())
    assert first + [rows(b) for b in take(iter(dm2.train_dataloader()), 2)] == ref


def test_datamodule_pickles_with_its_counter(tmp_path):
    import copy
    import pickle

    man = synth(tmp_path, train_shards=1, samples_per_shard=8, val_shards=1)
    dm = make_dm(man)
    dm._counter.value = 3
    assert pickle.loads(pickle.dumps(dm)).skipped_shards == 3 and copy.deepcopy(dm).skipped_shards == 3


def test_missing_manifest_and_no_val_split(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_manifest(str(tmp_path / "nope.json"))
    man = synth(tmp_path, train_shards=1, samples_per_shard=8, val_shards=0)
    with pytest.raises(DataError, match="no validation split"):
        make_dm(man).val_dataloader()


def test_embedded_default_builds_once_from_a_small_tree(tmp_path, capfd):
    from dlmtrain.data.default import ensure_default

    src = tmp_path / "lib"
    (src / "site-packages").mkdir(parents=True)
    (src / "site-packages" / "x.py").write_text("import nothing\n" * 1000)
    for i in range(12):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 40)
    cfg = OmegaConf.create({"cache_dir": str(tmp_path / "cache"), "seq_len": 32, "vocab_size": 300, "val_fraction": 0.2})
    man = ensure_default(cfg, source=src)
    m = read_manifest(str(man))
    assert m["vocab_size"] <= 300 and m["seq_len"] == 32 and m["totals"]["documents"] == 12
    assert "preparing the embedded default corpus" in capfd.readouterr().out
    assert ensure_default(cfg, source=src) == man  # cached: no second build
    assert "preparing" not in capfd.readouterr().out


def test_embedded_default_stdlib_corpus(tmp_path):
    cfg = OmegaConf.create({"data": {"kind": "shards", "manifest": "", "cache_dir": str(tmp_path), "seq_len": 128,
                                     "vocab_size": 2048, "val_fraction": 0.02, "num_workers": 1, "shuffle_buffer": 100,
                                     "on_corrupt": "fail", "max_val_samples": 0, "shard_url": ""},
                            "trainer": {"seed": 0}})
    dm = build_datamodule(cfg, 8)
    assert dm.vocab_size == 2048 and dm.seq_len == 128 and dm.mask_id is not None
    assert dm.manifest["totals"]["documents"] > 1000
    b = next(iter(dm.val_dataloader()))
    assert b["input_ids"].shape == (8, 128)
    assert "def " in dm.tokenizer.decode(b["input_ids"][0])


def test_bench_data_runs(capsys):
    import argparse

    from dlmtrain.bench import data as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--seq-len", "64", "--shards", "2", "--samples-per-shard", "64", "--seconds", "0.2",
                         "--num-workers", "1", "--batch-size", "8"])
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "tokens/s per worker" in out and "DataLoader, 1 workers" in out
