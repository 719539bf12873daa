"""data_prep as users hit it: reruns, --overwrite, binary inputs, damaged shards, bad --out, progress lines."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from test_prep import check_round_trip, make_docs, opts, write_files

import data_prep.outdir as outdir_mod
import data_prep.pipeline as prep_mod
from data_prep import prepare
from data_prep.cli import main
from dlmtrain.data.tokenizer import ByteTokenizer
from dlmtrain.errors import DataError


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def snapshot(d: Path) -> dict[str, str]:
    """Every file of a directory tree with its sha256 (hidden ones included)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. --out vs inputs, --overwrite


@pytest.mark.parametrize("out", ["corpus", "corpus/shards", "corpus/sub/shards"])
def test_out_inside_an_input_directory_is_refused(tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    write_files(tmp_path / "corpus", make_docs(10))
    (tmp_path / "corpus" / "sub").mkdir()
    before = snapshot(tmp_path / "corpus")
    rc, _, err = run(capsys, "./corpus", "--out", out, "--tokenizer", "bytes", "--seq-len", "16")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"--out {out} {'is' if out == 'corpus' else 'lies inside'} the input directory ./corpus" in err
    assert snapshot(tmp_path / "corpus") == before  # nothing created, nothing deleted


def test_overwrite_keeps_the_old_dataset_until_the_new_one_is_complete(tmp_path, monkeypatch):
    write_files(tmp_path / "in", make_docs(120, seed=11))
    out, ref = tmp_path / "out", tmp_path / "ref"
    old = prepare(opts([tmp_path / "in"], out, seq_len=32, shard_size=16 << 10))
    old_files = snapshot(out)
    new_ref = prepare(opts([tmp_path / "in"], ref, seq_len=16, shard_size=16 << 10))
    assert len(new_ref["splits"]["train"]["shards"]) >= 4

    # interrupted after its 2nd train shard: the old dataset is untouched, a plain rerun still finds it whole
    commits = []

    def interrupt(split, shard):
        commits.append((split, shard["name"]))
        if [c for c in commits if c[0] == "train"] == [("train", "train-000000.tar"), ("train", "train-000001.tar")]:
            raise KeyboardInterrupt

    monkeypatch.setattr(prep_mod, "_after_commit", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(opts([tmp_path / "in"], out, seq_len=16, shard_size=16 << 10, overwrite=True))
    assert {k: v for k, v in snapshot(out).items() if not k.startswith(".prep-new/")} == old_files
    assert prepare(opts([tmp_path / "in"], out, seq_len=32, shard_size=16 << 10)) == old
    with pytest.raises(DataError, match=r"seq_len 32 -> 16.*interrupted --overwrite run waits in .*\.prep-new"):
        prepare(opts([tmp_path / "in"], out, seq_len=16, shard_size=16 << 10))

    # the same --overwrite command resumes in .prep-new; then the swap is interrupted after two renames
    commits.clear()
    monkeypatch.setattr(prep_mod, "_after_commit", lambda split, shard: commits.append(shard["name"]))
    real_replace, moves = os.replace, []

    def flaky_replace(a, b):  # the swap's renames: a finished file of .prep-new into OUT
        if ".prep-new" in str(a) and ".tmp-" not in str(a):
            moves.append(Path(b).name)
            if len(moves) == 3:
                raise KeyboardInterrupt
        real_replace(a, b)

    monkeypatch.setattr(outdir_mod.os, "replace", flaky_replace)
    with pytest.raises(KeyboardInterrupt):
        prepare(opts([tmp_path / "in"], out, seq_len=16, shard_size=16 << 10, overwrite=True))
    assert commits[0] == "train-000002.tar"  # resumed, not restarted
    assert not (out / "manifest.json").exists()  # mid-swap: readers see no dataset rather than a mix
    monkeypatch.setattr(outdir_mod.os, "replace", real_replace)
    # any next run first finishes the swap; the result is byte-identical to a fresh build
    assert prepare(opts([tmp_path / "in"], out, seq_len=16, shard_size=16 << 10)) == new_ref
    assert snapshot(out) == snapshot(ref)

    # a failing overwrite (no sequence fits) leaves the dataset as it was and no .prep-new behind
    now = snapshot(out)
    with pytest.raises(DataError, match="no training sequence"):
        prepare(opts([tmp_path / "in"], out, seq_len=10**6, overwrite=True))
    assert snapshot(out) == now and not (out / ".prep-new").exists()


# ----------------------------------------------------------------------------- 2. binary files


def test_binary_text_files_are_skipped_and_counted(tmp_path, capsys):
    docs = make_docs(30, seed=12)
    write_files(tmp_path / "docs", docs)
    (tmp_path / "docs" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 8)
    (tmp_path / "docs" / "latin1.txt").write_bytes(("caf\xe9 na\xefve " * 50).encode("latin-1"))  # 2 in 11 not UTF-8
    (tmp_path / "docs" / "mostly.txt").write_bytes(b"fine text " * 30 + b"\xff")  # 1 of 301 bytes (0.3%): kept
    (tmp_path / "app.bin").write_bytes(b"\x7fELF\x02\x01\x01\0" + os.urandom(4000))  # given directly
    (tmp_path / "r.jsonl").write_text(json.dumps({"text": "a record with \0 a NUL"}) + "\n")  # records are not judged
    argv = [tmp_path / "docs", tmp_path / "app.bin", tmp_path / "r.jsonl", "--tokenizer", "bytes", "--seq-len", "8",
            "--val-fraction", "0", "--no-progress"]
    rc, out, err = run(capsys, *argv, "--out", tmp_path / "o")
    assert rc == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["totals"]["binary_files_skipped"] == 3 and m["totals"]["documents"] == 30 + 1 + 1
    assert m["totals"]["replaced_bytes"] == 1
    assert "binary files skipped 3" in out
    assert f"skipped 3 binary file(s) (first: {tmp_path / 'docs' / 'latin1.txt'}: 18.2% of its bytes are not UTF-8" in err
    assert m["binary_files_skipped"][1] == f"{tmp_path / 'docs' / 'logo.png'}: NUL bytes in its first 8 KB"
    inputs = json.loads((tmp_path / "o" / "inputs.json").read_text())["train"]
    assert sum(bool(r["skipped"]) for r in inputs) == 3
    # directory order by name: doc0000.txt ... doc0029.txt, (latin1.txt, logo.png), mostly.txt; then r.jsonl
    check_round_trip(tmp_path / "o", m, ByteTokenizer(),
                     {"train": [*docs, "fine text " * 30 + "\ufffd", "a record with \0 a NUL"]})
    # --max-undecodable 1 keeps the Latin-1 file; NUL files stay out
    rc, _, _ = run(capsys, *argv, "--max-undecodable", "1", "--out", tmp_path / "o2")
    m2 = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert rc == 0 and m2["totals"]["binary_files_skipped"] == 2 and m2["totals"]["replaced_bytes"] == 1 + 100
    # only binary inputs: one line, exit 2
    rc, _, err = run(capsys, tmp_path / "app.bin", "--tokenizer", "bytes", "--out", tmp_path / "o3")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"every input file was skipped as binary (1 file(s); first: {tmp_path / 'app.bin'}: NUL bytes" in err


# ----------------------------------------------------------------------------- 3. fingerprint: paths and contents


def test_rerun_with_respelled_or_touched_inputs_is_up_to_date_and_changes_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    docs = make_docs(40, seed=13)
    Path("a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    Path("b.txt").write_text("another document")
    common = ["--tokenizer", "bytes", "--seq-len", "16", "--out", "out", "--no-progress"]
    assert run(capsys, "./a.jsonl", *common)[0] == 0
    first = (tmp_path / "out" / "manifest.json").read_bytes()
    os.utime("a.jsonl", ns=(1, 1))  # touched: new mtime, same content
    for spelled in ("a.jsonl", str(tmp_path / "a.jsonl"), "sub/../a.jsonl"):
        Path("sub").mkdir(exist_ok=True)
        rc, out, err = run(capsys, spelled, *common)
        assert rc == 0 and "is up to date" in out, (spelled, err)
    assert (tmp_path / "out" / "manifest.json").read_bytes() == first
    # an edit of the same size is a change, named in the refusal, as are an added input and a setting
    data = Path("a.jsonl").read_bytes()
    Path("a.jsonl").write_bytes(data.replace(b"alpha", b"ALPHA", 1))
    assert len(data) == Path("a.jsonl").stat().st_size
    rc, _, err = run(capsys, "a.jsonl", "b.txt", *common, "--seq-len", "8")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "seq_len 16 -> 8" in err
    assert f"input added: {tmp_path / 'b.txt'}" in err and f"input modified: {tmp_path / 'a.jsonl'}" in err
    assert "--overwrite" in err


# ----------------------------------------------------------------------------- 4. damaged shards


def test_rerun_finds_a_damaged_shard_and_rebuilds_it(tmp_path, capsys):
    write_files(tmp_path / "in", make_docs(60, seed=14))
    argv = [tmp_path / "in", "--out", tmp_path / "out", "--tokenizer", "bytes", "--seq-len", "256",
            "--shard-size", "8KB", "--no-progress"]
    assert run(capsys, *argv)[0] == 0
    good = snapshot(tmp_path / "out")
    shard = tmp_path / "out" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    mid = next(i for i in range(len(data) // 2, 0, -64) if any(data[i : i + 64]))  # token ids, not tar padding
    data[mid : mid + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    rc, out, _ = run(capsys, *argv, "--no-verify")  # sizes only: the damage goes unseen, as documented
    assert rc == 0 and "up to date" in out and "--no-verify" in out
    rc, out, err = run(capsys, *argv)
    assert rc == 0 and "up to date" not in out
    assert "1 file(s) in" in err and "train-000001.tar has another sha256 than the manifest" in err
    assert snapshot(tmp_path / "out") == good  # rebuilt byte for byte
    rc, out, _ = run(capsys, *argv)
    assert rc == 0 and "up to date" in out and "sha256 of" in out and "checked in" in out


# ----------------------------------------------------------------------------- 5. bad records reported once


def test_skipped_bad_record_is_reported_once(tmp_path, capsys):
    lines = [json.dumps({"text": d}) for d in make_docs(60, seed=15)]
    lines.insert(7, '{"text": "never closed}')
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    argv = [tmp_path / "d.jsonl", "--tokenizer", "bytes", "--seq-len", "16", "--val-fraction", "0.3", "--no-progress"]
    rc, _, err = run(capsys, *argv, "--out", tmp_path / "o1")
    assert rc == 2 and "d.jsonl:8: not valid JSON (" in err
    assert "at column" in err and "at at" not in err  # json's message ends in "at" itself
    rc, out, err = run(capsys, *argv, "--on-error", "skip", "--out", tmp_path / "o2")
    assert rc == 0
    assert (out + err).count("d.jsonl:8:") == 1 and "bad records skipped 1," in out
    m = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert m["totals"]["bad_records_skipped"] == 1 and m["splits"]["val"]["documents"] > 0


# ----------------------------------------------------------------------------- 6. progress without a terminal


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    write_files(tmp_path / "in", make_docs(50, seed=16))
    base = [tmp_path / "in", "--tokenizer", "bytes", "--seq-len", "32", "--shard-size", "8KB", "--val-fraction", "0"]
    rc, _, err = run(capsys, *base, "--progress-every", "0", "--out", tmp_path / "o1")
    lines = [x for x in err.splitlines() if x.startswith("data_prep: train:") or "wrote train-" in x]
    assert rc == 0 and len(lines) >= 50  # every document and every shard with --progress-every 0
    assert "data_prep: wrote train-000000.tar (" in err
    last = [x for x in lines if "train:" in x][-1]
    assert "/50 files" in last and "MB read" in last and "tokens/s" in last and "shards" in last
    rc, _, err = run(capsys, *base, "--no-progress", "--out", tmp_path / "o2")
    assert rc == 0 and err == ""
    rc, _, err = run(capsys, *base, "--out", tmp_path / "o3")  # every 15 s: a short run prints no heartbeat
    assert rc == 0 and "data_prep: train:" not in err


# ----------------------------------------------------------------------------- 7. --out that cannot be written


@pytest.mark.parametrize("case", ["proc", "below_file", "read_only"])
def test_unwritable_out_is_one_line_exit_2(tmp_path, capsys, case):
    (tmp_path / "t.txt").write_text("hello world " * 20)
    if case == "proc":
        out = Path("/proc/dlmtrain-test")
    elif case == "below_file":
        (tmp_path / "file.txt").write_text("x")
        out = tmp_path / "file.txt" / "sub"
    else:
        if os.geteuid() == 0:
            pytest.skip("running as root: chmod 0555 does not stop root from writing; proc/below_file cover this path")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "out"
    before = snapshot(tmp_path)
    rc, _, err = run(capsys, tmp_path / "t.txt", "--tokenizer", "bytes", "--seq-len", "8", "--out", out)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("data_prep: error:")
    assert "Traceback" not in err and str(out) in err
    assert not out.exists() and snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- 8. no validation split


def test_val_fraction_zero_says_no_validation_split(tmp_path, capsys):
    write_files(tmp_path / "in", make_docs(20, seed=17))
    rc, out, err = run(capsys, tmp_path / "in", "--tokenizer", "bytes", "--seq-len", "16", "--val-fraction", "0",
                       "--no-progress", "--out", tmp_path / "o")
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert rc == 0 and "(20 train; no validation split: --val-fraction 0)" in out
    assert "validation split is empty" not in err  # that warning is for a requested split that came out empty
    val = m["splits"]["val"]
    assert (val["shards"], val["samples"], val["documents"], m["splits"]["train"]["documents"]) == ([], 0, 0, 20)
