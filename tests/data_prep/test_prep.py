"""data_prep: text -> shards round trip, token accounting, inputs, errors, determinism, resume."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data_prep.pipeline as prep_mod
from data_prep import PrepOptions, prepare
from data_prep.cli import build_parser, main
from data_prep.pipeline import _doc_hash
from dlmtrain.data.format import iter_samples
from dlmtrain.data.stream import ShardRef, StreamSpec, read_shard
from dlmtrain.data.tokenizer import ByteTokenizer, hf_from_str
from dlmtrain.errors import DataError

WORDS = ["alpha", "beta", "gamma", "delta", "über", "naïve", "café", "日本語", "λ", "x", "def", "return", "[EOS]", "\t", "😀"]


def make_docs(n: int, seed: int = 0, max_words: int = 120) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        k = rng.randint(1, max_words)
        words = [rng.choice(WORDS) for _ in range(k)]
        text = ""
        for w in words:
            text += w + rng.choice([" ", " ", " ", "\n", ", "])
        docs.append(text.rstrip(" "))
    return docs


def write_files(root: Path, docs: list[str]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, d in enumerate(docs):
        p = root / f"doc{i:04d}.txt"
        p.write_bytes(d.encode("utf-8"))
        paths.append(p)
    return paths


def opts(inputs, out, **kw) -> PrepOptions:
    kw.setdefault("tokenizer", "bytes")
    kw.setdefault("seq_len", 32)
    kw.setdefault("shard_size", 8 << 10)
    kw.setdefault("workers", 1)
    kw.setdefault("quiet", True)
    kw.setdefault("progress", False)
    return PrepOptions(inputs=[str(i) for i in inputs], out=str(out), **kw)


def split_stream(out: Path, manifest: dict, split: str) -> np.ndarray:
    """All tokens of a split's shards, in order."""
    spec = StreamSpec(seq_len=manifest["seq_len"], dtype=manifest["dtype"], vocab_size=manifest["vocab_size"],
                      pad_id=0, on_corrupt="fail")
    parts = []
    for s in manifest["splits"][split]["shards"]:
        for ids, starts, _ in read_shard(ShardRef(str(out / s["name"]), s["name"], s["samples"]), spec):
            eos_after = np.flatnonzero(ids[:-1] == manifest["eos_id"]) + 1
            assert list(eos_after) == (list(starts) if starts is not None else [])  # boundaries explicit == EOS
            parts.append(ids.astype(np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def expected_stream(tok, docs: list[str]) -> np.ndarray:
    parts = []
    for d in docs:
        ids = tok.encode_array(d)
        if len(ids):
            parts.append(np.append(ids.astype(np.int64), tok.eos_id))
    return np.concatenate(parts)


def check_round_trip(out: Path, manifest: dict, tok, docs_by_split: dict[str, list[str]]) -> None:
    for split, docs in docs_by_split.items():
        info = manifest["splits"][split]
        got = split_stream(out, manifest, split)
        want = expected_stream(tok, docs)
        # nothing lost or invented: written + dropped tail == tokenizer count + EOS
        assert info["tokens_written"] == len(got) == info["samples"] * manifest["seq_len"]
        assert info["tokens_written"] + info["tokens_dropped_tail"] == len(want)
        assert info["document_tokens"] + info["eos_tokens"] == len(want)
        assert info["tokens_dropped_tail"] < manifest["seq_len"]
        np.testing.assert_array_equal(got, want[: len(got)])
        # text level: every document whose EOS was written decodes to the input document
        pieces = np.split(got, np.flatnonzero(got == manifest["eos_id"]) + 1)
        complete = [p[:-1] for p in pieces if len(p) and p[-1] == manifest["eos_id"]]
        nonempty = [d for d in docs if d]
        assert len(complete) <= len(nonempty)  # the rest lies in the recorded tail (checked on tokens above)
        for ids, d in zip(complete, nonempty):
            assert tok.decode(ids) == d


def by_split(docs: list[str], frac: float) -> dict[str, list[str]]:
    val = [d for d in docs if _doc_hash(d.encode())[0] < frac]
    train = [d for d in docs if _doc_hash(d.encode())[0] >= frac]
    return {"train": train, "val": val}


def test_round_trip_bytes_and_accounting(tmp_path):
    docs = make_docs(120) + [""]  # one empty document
    write_files(tmp_path / "in", docs)
    pad = " bytes" * 40  # 2 undecodable bytes in 245: under --max-undecodable 0.01, so kept
    (tmp_path / "in" / "bad.txt").write_bytes(b"ok \xff\xfe" + pad.encode())
    m = prepare(opts([tmp_path / "in"], tmp_path / "out", val_fraction=0.2))
    out = tmp_path / "out"
    # directory order is sorted by name: bad.txt first
    all_docs = ["ok \ufffd\ufffd" + pad] + docs
    check_round_trip(out, m, ByteTokenizer(), by_split(all_docs, 0.2))
    t = m["totals"]
    assert t["empty_documents_skipped"] == 1
    assert t["replaced_bytes"] == 2
    assert t["documents"] == len(all_docs) - 1
    assert t["tokens_written"] + t["tokens_dropped_tail"] == t["document_tokens"] + t["eos_tokens"]
    assert m["splits"]["val"]["documents"] > 0 and m["splits"]["train"]["documents"] > 0
    assert m["dtype"] == "uint16" and m["vocab_size"] == 260
    assert m["eos_id"] == 258 and m["mask_id"] == 259 and m["pad_id"] == 256 and m["bos_id"] == 257
    assert m["tokenizer"]["special_tokens"]["mask"] == {"token": "[MASK]", "id": 259}
    assert len(m["splits"]["train"]["shards"]) > 1
    for s in m["splits"]["train"]["shards"] + m["splits"]["val"]["shards"]:
        data = (out / s["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
        assert s["tokens"] == s["samples"] * 32
    assert not list(out.glob("*.tmp-*")) and not (out / ".prep-state.json").exists()


def test_trained_bpe_round_trip_and_determinism_across_workers(tmp_path):
    docs = make_docs(150, seed=1)
    write_files(tmp_path / "in", docs)
    m1 = prepare(opts([tmp_path / "in"], tmp_path / "a", tokenizer=None, train_tokenizer=True, vocab_size=300,
                      val_fraction=0.1, workers=1))
    m2 = prepare(opts([tmp_path / "in"], tmp_path / "b", tokenizer=None, train_tokenizer=True, vocab_size=300,
                      val_fraction=0.1, workers=2))
    tfile = tmp_path / "a" / "tokenizer.json"
    assert tfile.read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    specials = {k: (v["token"], v["id"]) for k, v in m1["tokenizer"]["special_tokens"].items()}
    assert set(specials) == {"pad", "bos", "eos", "mask"}
    tok = hf_from_str(tfile.read_text(), specials)
    assert tok.vocab_size == m1["vocab_size"] <= 300
    check_round_trip(tmp_path / "a", m1, tok, by_split(docs, 0.1))
    sha = lambda m: [s["sha256"] for sp in ("train", "val") for s in m["splits"][sp]["shards"]]  # noqa: E731
    assert sha(m1) == sha(m2)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_two_runs_identical_sha256(tmp_path):
    docs = make_docs(80, seed=2)
    write_files(tmp_path / "in", docs)
    m1 = prepare(opts([tmp_path / "in"], tmp_path / "r1", val_fraction=0.1))
    m2 = prepare(opts([tmp_path / "in"], tmp_path / "r2", val_fraction=0.1))
    for sp in ("train", "val"):
        for a, b in zip(m1["splits"][sp]["shards"], m2["splits"][sp]["shards"], strict=True):
            assert a == b
            assert (tmp_path / "r1" / a["name"]).read_bytes() == (tmp_path / "r2" / b["name"]).read_bytes()


def test_shards_are_plain_webdataset_tars(tmp_path):
    import tarfile

    write_files(tmp_path / "in", make_docs(30))
    m = prepare(opts([tmp_path / "in"], tmp_path / "out", val_fraction=0.0))
    s = m["splits"]["train"]["shards"][0]
    with tarfile.open(tmp_path / "out" / s["name"]) as tf:
        names = tf.getnames()
    assert names[0] == "000000000.input_ids.npy"
    assert all(n.split(".", 1)[1] in ("input_ids.npy", "doc_starts.npy") for n in names)
    with open(tmp_path / "out" / s["name"], "rb") as f:
        samples = list(iter_samples(f))
    assert len(samples) == s["samples"]
    import io

    arr = np.load(io.BytesIO(samples[0]["input_ids.npy"]))
    assert arr.dtype == np.uint16 and arr.shape == (32,)
    assert m["splits"]["val"]["shards"] == []
    # webdataset itself reads them
    import webdataset as wds

    urls = [str(tmp_path / "out" / x["name"]) for x in m["splits"]["train"]["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False).decode()
    got = list(ds)
    assert len(got) == m["splits"]["train"]["samples"]
    np.testing.assert_array_equal(got[0]["input_ids.npy"], arr)
    with_docs = [x for x in got if "doc_starts.npy" in x]
    assert with_docs and all(x["doc_starts.npy"].dtype == np.int32 for x in with_docs)


def test_jsonl_gz_nested_field_and_bad_lines(tmp_path, capsys):
    docs = make_docs(40, seed=3)
    lines = [json.dumps({"meta": {"body": d}, "id": i}) for i, d in enumerate(docs)]
    lines.insert(5, "{not json")
    lines.insert(9, json.dumps({"meta": {}}))
    lines.insert(12, "")
    p = tmp_path / "data.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    rc = main([str(p), "--out", str(tmp_path / "o1"), "--field", "meta.body", "--tokenizer", "bytes",
               "--seq-len", "16", "--no-progress", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"{p}:6: not valid JSON" in err and "--on-error skip" in err
    rc = main([str(p), "--out", str(tmp_path / "o2"), "--field", "meta.body", "--tokenizer", "bytes",
               "--seq-len", "16", "--on-error", "skip", "--val-fraction", "0", "--no-progress", "--quiet"])
    assert rc == 0
    m = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert m["totals"]["bad_records_skipped"] == 2
    check_round_trip(tmp_path / "o2", m, ByteTokenizer(), {"train": docs})


def test_parquet_column_and_unreadable_parquet(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = make_docs(50, seed=4)
    pq.write_table(pa.table({"content": docs + [None], "n": list(range(51))}), tmp_path / "c.parquet", row_group_size=7)
    m = prepare(opts([tmp_path / "c.parquet"], tmp_path / "out", column="content", val_fraction=0.0))
    check_round_trip(tmp_path / "out", m, ByteTokenizer(), {"train": docs})
    assert m["totals"]["empty_documents_skipped"] == 1
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    rc = main([str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "o"), "--tokenizer", "bytes", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "cannot read Parquet file" in err and "bad.parquet" in err
    with pytest.raises(DataError, match="no column 'text'"):
        prepare(opts([tmp_path / "c.parquet"], tmp_path / "o3"))


def test_hf_saved_dataset_read_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    docs = make_docs(30, seed=5)
    root = tmp_path / "hf"
    root.mkdir()
    table = pa.table({"text": docs})
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table, max_chunksize=8)
    (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (root / "dataset_info.json").write_text("{}")
    m = prepare(opts([root], tmp_path / "out", val_fraction=0.0))
    check_round_trip(tmp_path / "out", m, ByteTokenizer(), {"train": docs})


def test_split_on_blank_and_line(tmp_path):
    text = "first para\nline two\n\n\n  \nsecond\r\n\nthird\n"
    (tmp_path / "t.txt").write_text(text)
    m = prepare(opts([tmp_path / "t.txt"], tmp_path / "b", split_on="blank", seq_len=4, val_fraction=0.0))
    check_round_trip(tmp_path / "b", m, ByteTokenizer(), {"train": ["first para\nline two", "second", "third"]})
    m = prepare(opts([tmp_path / "t.txt"], tmp_path / "l", split_on="line", seq_len=4, val_fraction=0.0))
    assert m["totals"]["documents"] == 5 and m["totals"]["empty_documents_skipped"] == 3
    check_round_trip(tmp_path / "l", m, ByteTokenizer(),
                     {"train": ["first para", "line two", "", "", "  ", "second", "", "third"]})


def test_directory_glob_exclude_and_gzip_text(tmp_path):
    root = tmp_path / "tree"
    (root / "a" / "site-packages").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a" / "one.py").write_text("one")
    (root / "a" / "site-packages" / "skip.py").write_text("skipped")
    (root / ".hidden" / "h.py").write_text("hidden")
    (root / "b.py").write_text("bee")
    (root / "c.txt").write_text("not py")
    with gzip.open(root / "z.py.gz", "wb") as f:  # glob matches the name, gzip is read through
        f.write(b"zipped")
    m = prepare(opts([root], tmp_path / "out", glob="*.py*", exclude=["site-packages"], seq_len=2, val_fraction=0.0))
    check_round_trip(tmp_path / "out", m, ByteTokenizer(), {"train": ["one", "bee", "zipped"]})


def test_separate_val_input(tmp_path):
    tr, va = make_docs(40, seed=6), make_docs(10, seed=7)
    write_files(tmp_path / "tr", tr)
    write_files(tmp_path / "va", va)
    m = prepare(opts([tmp_path / "tr"], tmp_path / "out", val_inputs=[str(tmp_path / "va")]))
    check_round_trip(tmp_path / "out", m, ByteTokenizer(), {"train": tr, "val": va})
    with pytest.raises(DataError, match="not both"):
        prepare(opts([tmp_path / "tr"], tmp_path / "o2", val_inputs=[str(tmp_path / "va")], val_fraction=0.1))


def _tokenizer_json(path: Path, vocab_words: int, eos: str | None = "</s>") -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0}
    for i in range(vocab_words):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos:
        tok.add_special_tokens([eos])
    tok.save(str(path))
    return path


def test_user_tokenizer_specials_and_dtype(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("w1 w2 w3 </s> w4 " * 20 + "w5")
    tj = _tokenizer_json(tmp_path / "tok.json", 100)
    m = prepare(opts([tmp_path / "t.txt"], tmp_path / "o", tokenizer=str(tj), seq_len=2, val_fraction=0.0))
    assert m["eos_id"] == 101 and m["tokenizer"]["special_tokens"]["eos"]["token"] == "</s>"
    assert m["mask_id"] is None and m["dtype"] == "uint16"
    got = split_stream(tmp_path / "o", m, "train")
    # "</s>" inside the text is text (-> <unk> here), not an end of document: one document, one EOS
    assert (got == 101).sum() == 1 and (got == 0).sum() == 20
    # a tokenizer without EOS gets [EOS] added
    tj2 = _tokenizer_json(tmp_path / "noeos.json", 10, eos=None)
    m2 = prepare(opts([tmp_path / "t.txt"], tmp_path / "o2", tokenizer=str(tj2), seq_len=8, val_fraction=0.0))
    assert m2["tokenizer"]["special_tokens"]["eos"] == {"token": "[EOS]", "id": 11}
    # a vocabulary too large for uint16
    big = _tokenizer_json(tmp_path / "big.json", 70000)
    m3 = prepare(opts([tmp_path / "t.txt"], tmp_path / "o3", tokenizer=str(big), seq_len=2, val_fraction=0.0))
    assert m3["dtype"] == "uint32"
    assert split_stream(tmp_path / "o3", m3, "train").max() == 70001  # the EOS
    rc = main([str(tmp_path / "t.txt"), "--out", str(tmp_path / "o4"), "--tokenizer", str(big), "--dtype", "uint16",
               "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "too many for --dtype uint16" in err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["{tmp}/missing.txt", "--tokenizer", "bytes"], "input not found"),
        (["{tmp}/t.txt", "--tokenizer", "bytes", "--seq-len", "1"], "--seq-len 1"),
        (["{tmp}/t.txt"], "choose a tokenizer"),
        (["{tmp}/t.txt", "--train-tokenizer", "--vocab-size", "100"], "--vocab-size >= 260"),
        (["{tmp}/t.txt", "--tokenizer", "{tmp}/nope.json"], "tokenizer not found"),
        (["{tmp}/t.txt", "--tokenizer", "bytes", "--seq-len", "100000"], "no training sequence"),
        (["{tmp}/t.txt", "--tokenizer", "bytes", "--shard-size", "lots"], "cannot read size"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, capsys, args, needle):
    (tmp_path / "t.txt").write_text("hello world")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--out", str(tmp_path / "o"), "--quiet"]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("data_prep: error:") and needle in err


def test_interrupted_run_resumes_to_identical_output(tmp_path, monkeypatch):
    docs = make_docs(200, seed=8)
    write_files(tmp_path / "in", docs)
    ref = prepare(opts([tmp_path / "in"], tmp_path / "ref", val_fraction=0.2, shard_size=64 << 10))
    n_train = len(ref["splits"]["train"]["shards"])
    assert n_train >= 4
    calls = []

    def interrupt(split, shard):
        calls.append((split, shard["name"]))
        if split == "train" and len([c for c in calls if c[0] == "train"]) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(prep_mod, "_after_commit", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(opts([tmp_path / "in"], tmp_path / "out", val_fraction=0.2, shard_size=64 << 10))
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists()  # a loader finds nothing half-done
    assert not list(out.glob("*.tmp-*"))
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    monkeypatch.setattr(prep_mod, "_after_commit", lambda split, shard: calls.append(("resumed", shard["name"])))
    m = prepare(opts([tmp_path / "in"], out, val_fraction=0.2, shard_size=64 << 10))
    resumed = [c[1] for c in calls if c[0] == "resumed"]
    assert resumed[0] == "train-000002.tar"  # continued; val was not redone
    assert m["splits"] == ref["splits"] and m["totals"] == ref["totals"]
    for s in m["splits"]["train"]["shards"]:
        assert (out / s["name"]).read_bytes() == (tmp_path / "ref" / s["name"]).read_bytes()


def test_up_to_date_other_settings_and_overwrite(tmp_path, capsys):
    write_files(tmp_path / "in", make_docs(20, seed=9))
    m1 = prepare(opts([tmp_path / "in"], tmp_path / "out", quiet=False))
    capsys.readouterr()
    m2 = prepare(opts([tmp_path / "in"], tmp_path / "out", quiet=False))
    assert "up to date" in capsys.readouterr().out and m1 == m2
    with pytest.raises(DataError, match="--overwrite"):
        prepare(opts([tmp_path / "in"], tmp_path / "out", seq_len=16))
    m3 = prepare(opts([tmp_path / "in"], tmp_path / "out", seq_len=16, overwrite=True))
    assert m3["seq_len"] == 16
    names = {s["name"] for sp in m3["splits"].values() for s in sp["shards"]}
    assert {p.name for p in (tmp_path / "out").glob("*.tar")} == names  # stale shards gone


def test_help_documents_every_flag():
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings
    r = subprocess.run([sys.executable, "-m", "data_prep", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--out", "--field", "--column", "--split-on", "--train-tokenizer", "--vocab-size", "--workers",
                 "--seq-len", "--val-fraction", "--val-input", "--on-error", "--glob", "--shard-size", "--dtype",
                 "--max-undecodable", "--no-verify", "--progress-every", "--overwrite"):
        assert flag in r.stdout
