"""data_prep --prompt-field: JSONL prompt/answer pairs -> shards with pairs.npy -> batches with prompt_mask."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

import data_prep.pipeline as prep_mod
from data_prep import PrepOptions, prepare
from data_prep.cli import main
from data_prep.pipeline import _doc_bytes, _doc_hash
from dlmtrain.data.datamodule import ShardDataModule
from dlmtrain.data.format import read_manifest
from dlmtrain.data.stream import ShardRef, StreamSpec, read_shard
from dlmtrain.data.tokenizer import ByteTokenizer
from dlmtrain.errors import DataError

TOK = ByteTokenizer()
L = 48


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = ["why", "sky", "blue", "café", "λ", "is", "the", "answer", "42", "ok"]
    pairs = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(0, 5)))
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(0, 4)))
        pairs.append((prompt, answer))
    pairs.append(("x" * 30, "y" * 30))  # 61 tokens with EOS: longer than L, skipped
    return pairs


def write_jsonl(path: Path, pairs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p, a in pairs:
            f.write(json.dumps({"q": {"text": p}, "a": a, "other": 1}, ensure_ascii=False) + "\n")
    return path


def opts(inputs, out, **kw) -> PrepOptions:
    kw.setdefault("tokenizer", "bytes")
    kw.setdefault("seq_len", L)
    kw.setdefault("shard_size", 4 << 10)
    kw.setdefault("workers", 1)
    kw.setdefault("quiet", True)
    kw.setdefault("progress", False)
    kw.setdefault("prompt_field", "q.text")
    kw.setdefault("field", "a")
    kw.setdefault("val_fraction", 0.2)
    return PrepOptions(inputs=[str(i) for i in inputs], out=str(out), **kw)


def samples(out: Path, m: dict, split: str):
    spec = StreamSpec(seq_len=m["seq_len"], dtype=m["dtype"], vocab_size=m["vocab_size"], pad_id=0, on_corrupt="fail")
    for s in m["splits"][split]["shards"]:
        yield from read_shard(ShardRef(str(out / s["name"]), s["name"], s["samples"]), spec)


def test_pairs_round_trip_prompt_boundaries_padding_and_accounting(tmp_path):
    pairs = make_pairs(150)
    m = prepare(opts([write_jsonl(tmp_path / "sft.jsonl", pairs)], tmp_path / "out"))
    assert m["prompt_conditioned"] is True and m["version"] == 2 and "pairs.npy" in m["sample_format"]
    assert m["settings"]["read"]["prompt_field"] == "q.text"
    for split in ("train", "val"):
        want = [(p, a) for p, a in pairs if (_doc_hash(_doc_bytes((p, a)))[0] < 0.2) == (split == "val")]
        fits = [(p, a) for p, a in want if (p or a) and len(p.encode()) + len(a.encode()) + 1 <= L]
        got, pad = [], 0
        for ids, starts, prs in samples(tmp_path / "out", m, split):
            triples = prs.reshape(-1, 3)
            covered = np.zeros(L, dtype=bool)
            for s, a, e in triples:
                got.append((TOK.decode(ids[s:a].tolist()), TOK.decode(ids[a:e - 1].tolist())))
                assert ids[e - 1] == TOK.eos_id
                covered[s:e] = True
            # the padding lies after the last pair, is the pad id, and starts a segment like any post-EOS position
            end = triples[-1, 2]
            assert covered[:end].all() and not covered[end:].any()
            assert (ids[end:] == TOK.pad_id).all()
            pad += L - end
            want_starts = [s for s in triples[:, 0] if s > 0] + ([end] if end < L else [])
            assert list(starts if starts is not None else []) == want_starts
        assert got == fits  # every pair that fits, whole and in order, prompt boundary exact
        info = m["splits"][split]
        assert info["documents"] == len(fits)
        assert info["prompt_tokens"] == sum(len(p.encode()) for p, _ in fits)
        assert info["document_tokens"] == sum(len(p.encode()) + len(a.encode()) for p, a in fits)
        assert info["pad_tokens"] == pad and info["tokens_dropped_tail"] == 0
        assert info["tokens_written"] == info["document_tokens"] + info["eos_tokens"] + pad
        assert info["empty_documents_skipped"] == sum(1 for p, a in want if not (p or a))
        assert info["pairs_too_long_skipped"] == len(want) - len(fits) - info["empty_documents_skipped"]
    assert m["totals"]["pairs_too_long_skipped"] == 1


def test_loader_passes_prompt_mask_and_padding_train_and_val(tmp_path):
    m = prepare(opts([write_jsonl(tmp_path / "sft.jsonl", make_pairs(150, seed=1))], tmp_path / "out"))
    dm = ShardDataModule(read_manifest(str(tmp_path / "out")), micro_batch_size=4, num_workers=0, pin_memory=False)
    assert dm.prompt_conditioned
    roles = {}
    for split in ("train", "val"):
        for ids, _, prs in samples(tmp_path / "out", m, split):
            pm, am = np.zeros(L, bool), np.zeros(L, bool)
            for s, a, e in prs.reshape(-1, 3):
                pm[s:a], am[s:e] = True, True
            roles[ids.tobytes()] = (pm, am)
    n_val = m["splits"]["val"]["samples"]
    assert n_val % 4  # so the last val batch has padding rows
    seen = 0
    for batch in dm.val_dataloader():
        for i in range(4):
            key = batch["input_ids"][i].numpy().astype(m["dtype"]).tobytes()
            if key in roles and seen < n_val:
                pm, am = roles[key]
                assert np.array_equal(batch["prompt_mask"][i].numpy(), pm)
                assert np.array_equal(batch["attention_mask"][i].numpy(), am)
                seen += 1
            else:  # a padding row: nothing real, no prompt
                assert not batch["attention_mask"][i].any() and not batch["prompt_mask"][i].any()
    assert seen == n_val
    batch = next(iter(dm.train_dataloader()))
    for i in range(4):
        pm, am = roles[batch["input_ids"][i].numpy().astype(m["dtype"]).tobytes()]
        assert np.array_equal(batch["prompt_mask"][i].numpy(), pm)
        assert np.array_equal(batch["attention_mask"][i].numpy(), am)


def test_text_datasets_are_unchanged(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("plain text " * 40)
    m = prepare(opts([tmp_path / "in"], tmp_path / "out", prompt_field="", field="text", val_fraction=0))
    assert m["version"] == 1 and "prompt_conditioned" not in m and "prompt_field" not in m["settings"]["read"]
    assert "pad_tokens" not in m["splits"]["train"]
    assert all(prs is None for _, _, prs in samples(tmp_path / "out", m, "train"))
    dm = ShardDataModule(read_manifest(str(tmp_path / "out")), micro_batch_size=2, num_workers=0, pin_memory=False)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "segment_ids"}


# random lengths: shards end where a pair did not fit (resume at that pair); exact: two pairs of 24
# tokens fill each sequence, so shards end right after a pair (resume past it)
@pytest.mark.parametrize("kind", ["random", "exact"])
def test_interrupted_pairs_run_resumes_to_identical_output(tmp_path, monkeypatch, kind):
    pairs = make_pairs(200, seed=2) if kind == "random" else [(f"p{i:04d}", "a" * 18) for i in range(120)]
    src = write_jsonl(tmp_path / "sft.jsonl", pairs)
    ref = prepare(opts([src], tmp_path / "ref", shard_size=2 << 10))
    assert len(ref["splits"]["train"]["shards"]) >= 4
    calls = []

    def interrupt(split, shard):
        calls.append(split)
        if calls.count("train") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(prep_mod, "_after_commit", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(opts([src], tmp_path / "out", shard_size=2 << 10))
    monkeypatch.setattr(prep_mod, "_after_commit", lambda split, shard: None)
    m = prepare(opts([src], tmp_path / "out", shard_size=2 << 10))
    assert m["splits"] == ref["splits"] and m["totals"] == ref["totals"]
    for s in m["splits"]["train"]["shards"]:
        assert (tmp_path / "out" / s["name"]).read_bytes() == (tmp_path / "ref" / s["name"]).read_bytes()


def test_pairs_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello")
    rc = main([str(tmp_path / "t.txt"), "--prompt-field", "q", "--tokenizer", "bytes", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "JSONL only" in err
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"q": "p"}) + "\n")
    rc = main([str(src), "--prompt-field", "q", "--field", "a", "--tokenizer", "bytes", "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no field 'a'" in err and "--field" in err
    with pytest.raises(DataError, match="longer"):
        prepare(opts([write_jsonl(tmp_path / "long.jsonl", [("p" * 40, "a" * 40)])], tmp_path / "o3", val_fraction=0))
