"""Documents -> tokenizer -> packed webdataset shards + manifest.json (see dlmtrain/data/format.py).

The run makes one pass per split (validation first, it is small): read the documents
in input order, pick the split's documents (by a hash of their text, or all of a
``--val-input``), tokenize them in parallel (order kept), append EOS, pack them into
``seq_len`` sequences and write shards of about ``--shard-size`` bytes.

Nothing is lost or invented, and the manifest proves it per split::

    tokens_written + tokens_dropped_tail == document_tokens + eos_tokens

Resume: after each shard is committed (temp name, fsync, rename) the run records its
position in ``.prep-state.json`` (document index, tokens of that document consumed,
counters). Re-running the same command after an interruption continues from the last
committed shard of the split in progress; the result is byte-identical to an
uninterrupted run. Different inputs or settings restart cleanly (our shards are removed
first); an existing complete dataset is left alone unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from data_prep.pack import Packer
from data_prep.sources import ReadOptions, ReadStats, Source, discover, fingerprint_sources, iter_documents, source_size
from dlmtrain.data.format import FORMAT, FORMAT_VERSION, ShardWriter, write_json_atomic
from dlmtrain.data.tokenizer import ByteTokenizer, Tokenizer, file_sha256, hf_from_str, load_hf
from dlmtrain.errors import DataError

PREP_VERSION = 1
JOURNAL = ".prep-state.json"
_OURS = re.compile(r"^((train|val)-\d{6}\.tar|manifest\.json|tokenizer\.json)(\.tmp-\d+)?$|^\.prep-state\.json(\.tmp-\d+)?$")
_CHUNK_CHARS = 1 << 19  # text per tokenization task
_CHUNK_DOCS = 512


@dataclass
class PrepOptions:
    """Everything ``python -m data_prep`` takes (see ``--help``)."""

    inputs: list[str]
    out: str
    val_inputs: list[str] = _field(default_factory=list)
    val_fraction: float | None = None  # None: 0.01, or 0 with val_inputs
    glob: str = "*"
    exclude: list[str] = _field(default_factory=list)
    format: str = "auto"
    field: str = "text"
    column: str = "text"
    hf_split: str = ""
    split_on: str = "none"
    on_error: str = "fail"
    tokenizer: str | None = None  # path to tokenizer.json / directory, or "bytes"
    train_tokenizer: bool = False
    vocab_size: int = 0
    tokenizer_train_bytes: int = 1 << 30
    special_names: dict[str, str] = _field(default_factory=dict)  # e.g. {"eos": "</s>"}
    seq_len: int = 1024
    dtype: str = "auto"
    shard_size: int = 256 << 20
    workers: int = 0  # 0: all CPUs
    overwrite: bool = False
    progress: bool | None = None  # None: when stderr is a terminal
    quiet: bool = False


def parse_size(text: str | int) -> int:
    """``"256MB"``, ``"1GiB"``, ``"500k"`` or a plain number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", str(text).lower())
    if not m:
        raise DataError(f"cannot read size {text!r}; use bytes or a suffix like 64MB, 1GiB")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * mult)


# ----------------------------------------------------------------------------- helpers


def _say(opts: PrepOptions, msg: str) -> None:
    if not opts.quiet:
        print(msg, flush=True)


def _doc_hash(b: bytes) -> tuple[float, float]:
    """Two independent uniform numbers in [0, 1) from a document's bytes (split, tokenizer sample)."""
    d = hashlib.blake2b(b, digest_size=16).digest()
    return int.from_bytes(d[:8], "little") / 2.0**64, int.from_bytes(d[8:], "little") / 2.0**64


def _validate(o: PrepOptions) -> None:
    if o.seq_len < 2:
        raise DataError(f"--seq-len {o.seq_len}: a sequence needs at least 2 tokens")
    if o.val_fraction is not None and not 0 <= o.val_fraction < 1:
        raise DataError(f"--val-fraction {o.val_fraction} must lie in [0, 1)")
    if o.val_inputs and o.val_fraction:
        raise DataError("give either --val-input or --val-fraction, not both")
    if o.train_tokenizer and o.tokenizer:
        raise DataError("give either --tokenizer or --train-tokenizer, not both")
    if not o.train_tokenizer and not o.tokenizer:
        raise DataError("choose a tokenizer: --tokenizer PATH (tokenizer.json or its directory), --tokenizer bytes, "
                        "or --train-tokenizer --vocab-size N")
    if o.train_tokenizer and o.vocab_size < 260:
        raise DataError(f"--train-tokenizer needs --vocab-size >= 260 (256 bytes + 4 special tokens), got {o.vocab_size}")
    if o.dtype not in ("auto", "uint16", "uint32"):
        raise DataError(f"--dtype {o.dtype!r} is not one of: auto, uint16, uint32")
    if o.on_error not in ("fail", "skip"):
        raise DataError(f"--on-error {o.on_error!r} is not one of: fail, skip")
    if o.shard_size < 1:
        raise DataError("--shard-size must be positive")
    if o.workers < 0:
        raise DataError("--workers must be >= 0")


def _read_options(o: PrepOptions) -> ReadOptions:
    return ReadOptions(field=o.field, column=o.column, split_on=o.split_on, on_error=o.on_error, hf_split=o.hf_split)


def _clean(out: Path, everything: bool) -> None:
    """Remove what an earlier run of ours left: temp files always; shards, manifest, journal if ``everything``."""
    for p in out.iterdir():
        if not _OURS.match(p.name):
            continue
        if ".tmp-" in p.name or everything:
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- tokenizer


def _train_bpe(sources: list[Source], o: PrepOptions, val_fraction: float) -> Tokenizer:
    from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers, trainers

    from dlmtrain.data.tokenizer import DEFAULT_SPECIALS, SPECIAL_NAMES

    total = sum(source_size(s) for s in sources) or 1
    rate = min(1.0, o.tokenizer_train_bytes / total)
    budget = [o.tokenizer_train_bytes]
    stats = ReadStats()

    def texts() -> Iterator[str]:
        for text, _ in iter_documents(sources, _read_options(o), stats):
            if not text:
                continue
            b = text.encode("utf-8")
            split_u, sample_u = _doc_hash(b)
            if split_u < val_fraction or sample_u >= rate:
                continue
            yield text
            budget[0] -= len(b)
            if budget[0] <= 0:
                return

    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [DEFAULT_SPECIALS[n] for n in SPECIAL_NAMES]
    trainer = trainers.BpeTrainer(
        vocab_size=o.vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    return hf_from_str(tok.to_str(), {n: (DEFAULT_SPECIALS[n], tok.token_to_id(DEFAULT_SPECIALS[n])) for n in SPECIAL_NAMES})


def _tokenizer_spec(o: PrepOptions) -> dict:
    if o.train_tokenizer:
        return {"train": "bpe-bytelevel", "vocab_size": o.vocab_size, "train_bytes": o.tokenizer_train_bytes}
    if o.tokenizer == "bytes":
        return {"bytes": True}
    p = Path(o.tokenizer).expanduser()
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise DataError(f"tokenizer not found: {o.tokenizer}; pass a tokenizer.json, a directory holding one, "
                        "'bytes', or --train-tokenizer --vocab-size N")
    side = sorted((x.name, file_sha256(x)) for x in p.glob("*.json")) if p.is_dir() else []
    return {"file": str(f.resolve()), "sha256": file_sha256(f), "side": side, "names": dict(sorted(o.special_names.items()))}


# ----------------------------------------------------------------------------- tokenization workers

_WORKER_TOK: Tokenizer | None = None


def _init_worker(tok_json: str, specials: dict) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    global _WORKER_TOK
    _WORKER_TOK = hf_from_str(tok_json, specials)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    arrays = _WORKER_TOK.encode_batch(texts)
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)
    return flat.astype(np.uint32, copy=False), lengths


def _tokenized(docs: Iterator[tuple[int, str, int]], tok: Tokenizer, workers: int) -> Iterator[tuple[int, np.ndarray, int]]:
    """``(index, text, replaced)`` -> ``(index, token ids, replaced)``, in order."""
    if tok.kind == "bytes" or workers <= 1:
        for i, text, rep in docs:
            yield i, tok.encode_array(text), rep
        return
    ctx = mp.get_context("spawn")  # no fork: the tokenizers library may hold threads
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.to_str(), tok.specials)) as pool:
        pending: deque = deque()

        def drain():
            meta, res = pending.popleft()
            flat, lengths = res.get()
            ends = np.cumsum(lengths)
            for (i, rep), end, n in zip(meta, ends, lengths):
                yield i, flat[end - n : end], rep

        meta, texts, chars = [], [], 0
        for i, text, rep in docs:
            meta.append((i, rep))
            texts.append(text)
            chars += len(text)
            if chars >= _CHUNK_CHARS or len(texts) >= _CHUNK_DOCS:
                pending.append((meta, pool.apply_async(_encode_chunk, (texts,))))
                meta, texts, chars = [], [], 0
                while len(pending) >= 2 * workers:
                    yield from drain()
        if texts:
            pending.append((meta, pool.apply_async(_encode_chunk, (texts,))))
        while pending:
            yield from drain()


# ----------------------------------------------------------------------------- one split


def _after_commit(split: str, shard: dict) -> None:
    """Called after each committed shard and journal write (tests interrupt the run here)."""


_COUNTERS = ("documents", "document_tokens", "eos_tokens", "empty_documents_skipped", "replaced_bytes")


@dataclass
class _Ctx:
    out: Path
    opts: PrepOptions
    tok: Tokenizer
    dtype: str
    workers: int
    journal: dict
    bar: object
    t_tokens: list  # [document tokens tokenized in this run]


def _write_journal(ctx: _Ctx) -> None:
    write_json_atomic(ctx.out / JOURNAL, ctx.journal)


def _run_split(ctx: _Ctx, split: str, sources: list[Source], select: Callable[[bytes], bool] | None) -> dict:
    o = ctx.opts
    cur = ctx.journal.get("current") if (ctx.journal.get("current") or {}).get("split") == split else None
    cur = cur or {"split": split, "next_doc": 0, "skip_tokens": 0, "counters": {k: 0 for k in _COUNTERS},
                  "shards": [], "sample_index": 0}
    ctx.journal["current"] = cur
    for p in ctx.out.glob(f"{split}-*.tar"):  # shards past the journal's are stale
        if int(p.stem.split("-")[1]) >= len(cur["shards"]):
            p.unlink()
    start_doc, skip_tokens = cur["next_doc"], cur["skip_tokens"]
    counters = dict(cur["counters"])
    shards = list(cur["shards"])
    writer = ShardWriter(ctx.out, split, seq_len=o.seq_len, dtype=ctx.dtype, target_bytes=o.shard_size,
                         shard_index=len(shards), sample_index=cur["sample_index"])
    packer = Packer(o.seq_len, ctx.tok.eos_id)
    stats = ReadStats()

    def docs() -> Iterator[tuple[int, str, int]]:
        for i, (text, rep) in enumerate(iter_documents(sources, _read_options(o), stats)):
            if i < start_doc:
                continue
            if select is not None and not select(text.encode("utf-8")):
                continue
            yield i, text, rep

    bar = ctx.bar
    try:
        for i, toks, rep in _tokenized(docs(), ctx.tok, ctx.workers):
            before = dict(counters)
            if bar is not None:
                bar.update(1)
                if bar.n % 64 == 0:
                    bar.set_postfix_str(f"{ctx.t_tokens[0]:,} tokens", refresh=False)
            if len(toks) == 0:
                counters["empty_documents_skipped"] += 1
                continue
            counters["documents"] += 1
            counters["document_tokens"] += len(toks)
            counters["eos_tokens"] += 1
            counters["replaced_bytes"] += rep
            ctx.t_tokens[0] += len(toks)
            for ids, starts, (di, consumed) in packer.add(i, toks, skip_tokens if i == start_doc else 0):
                rec = writer.add(ids, starts)
                if rec is not None:
                    shards.append(rec)
                    cur.update(next_doc=di, skip_tokens=consumed, counters=before, shards=list(shards),
                               sample_index=writer.sample_index)
                    _write_journal(ctx)
                    _after_commit(split, rec)
        rec = writer.finish()
    except BaseException:
        writer.abort()
        raise
    if rec is not None:
        shards.append(rec)
    result = {
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "tokens_written": sum(s["tokens"] for s in shards),
        "tokens_dropped_tail": packer.pending,
        **counters,
        "bad_records_skipped": stats.bad_records,
    }
    if result["tokens_written"] + result["tokens_dropped_tail"] != result["document_tokens"] + result["eos_tokens"]:
        raise RuntimeError(f"token accounting failed for split {split}: {result}")  # a bug, not a user error
    if stats.examples and not o.quiet:
        print(f"data_prep: skipped {stats.bad_records} bad record(s) in the {split} pass, e.g. {stats.examples[0]}",
              file=sys.stderr)
    ctx.journal.setdefault("done", {})[split] = result
    ctx.journal["current"] = None
    _write_journal(ctx)
    return result


# ----------------------------------------------------------------------------- main entry


def prepare(opts: PrepOptions) -> dict:
    """Run data preparation; returns the manifest (also written to ``OUT/manifest.json``)."""
    t0 = time.time()
    o = opts
    _validate(o)
    train_sources = discover(o.inputs, o.glob, o.exclude, o.format)
    val_sources = discover(o.val_inputs, o.glob, o.exclude, o.format) if o.val_inputs else []
    val_fraction = 0.0 if o.val_inputs else (0.01 if o.val_fraction is None else o.val_fraction)
    out = Path(o.out).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {o.out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    ropts = _read_options(o)
    settings = {
        "prep_version": PREP_VERSION,
        "inputs": list(o.inputs), "val_inputs": list(o.val_inputs), "val_fraction": val_fraction,
        "glob": o.glob, "exclude": list(o.exclude), "format": o.format, "read": asdict(ropts),
        "seq_len": o.seq_len, "dtype": o.dtype, "shard_size": o.shard_size,
    }
    fp_input = {
        "settings": settings, "tokenizer": _tokenizer_spec(o),
        "train_sources": fingerprint_sources(train_sources), "val_sources": fingerprint_sources(val_sources),
    }
    fp = hashlib.sha256(json.dumps(fp_input, sort_keys=True).encode()).hexdigest()

    user_tok = load_hf(o.tokenizer, o.special_names) if o.tokenizer not in (None, "bytes") else None

    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not o.overwrite:
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = {}
        if old.get("fingerprint") != fp:
            raise DataError(f"{out} already holds a prepared dataset made from other inputs or settings; "
                            "pass --overwrite to replace it, or choose another --out")
        complete = all(
            (out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"]
            for sp in old["splits"].values() for s in sp["shards"]
        )
        if complete:
            _say(o, f"data_prep: {manifest_path} is up to date (same inputs and settings); nothing to do")
            return old
    journal = None
    if not o.overwrite and (out / JOURNAL).exists():
        try:
            journal = json.loads((out / JOURNAL).read_text())
        except ValueError:
            journal = None
        if journal is not None and journal.get("fingerprint") != fp:
            journal = None
    _clean(out, everything=journal is None)
    if journal is None:
        journal = {"fingerprint": fp, "tokenizer": None, "done": {}, "current": None}
    else:
        done = ", ".join(journal.get("done", {})) or "none"
        _say(o, f"data_prep: resuming the interrupted run in {out} (finished splits: {done})")

    # tokenizer
    tok_file = None
    if o.tokenizer == "bytes":
        tok: Tokenizer = ByteTokenizer()
    elif o.train_tokenizer:
        tfile = out / "tokenizer.json"
        saved = journal.get("tokenizer")
        if saved and tfile.is_file() and file_sha256(tfile) == saved["sha256"]:
            specials = {k: (v["token"], v["id"]) for k, v in saved["special_tokens"].items()}
            tok = hf_from_str(tfile.read_text(), specials)
        else:
            t = time.time()
            tok = _train_bpe(train_sources, o, val_fraction)
            _say(o, f"data_prep: trained a byte-level BPE of {tok.vocab_size} tokens in {time.time() - t:.1f} s")
        tok_file = "tokenizer.json"
    else:
        tok = user_tok
        tok_file = "tokenizer.json"
    if tok_file is not None:
        tpath = out / tok_file
        text = tok.to_str()
        if not tpath.is_file() or tpath.read_text() != text:
            tmp = tpath.with_name(f"{tpath.name}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, tpath)
        journal["tokenizer"] = {"sha256": file_sha256(tpath), **tok.describe()}
    else:
        journal["tokenizer"] = tok.describe()
    write_json_atomic(out / JOURNAL, journal)

    V = tok.vocab_size
    dtype = o.dtype if o.dtype != "auto" else ("uint16" if V <= 1 << 16 else "uint32")
    if dtype == "uint16" and V > 1 << 16:
        raise DataError(f"the vocabulary has {V} tokens, too many for --dtype uint16 (at most 65536); "
                        "use --dtype uint32 or auto")

    workers = o.workers or os.cpu_count() or 1
    bar = None
    show = o.progress if o.progress is not None else sys.stderr.isatty()
    if show and not o.quiet:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(unit=" docs", desc="data_prep", dynamic_ncols=True, smoothing=0.1,
                       bar_format="{desc}{n_fmt} docs{postfix} [{elapsed}, {rate_fmt}]")
            bar.set_postfix_str("0 tokens", refresh=False)
        except ImportError:
            bar = None
    ctx = _Ctx(out=out, opts=o, tok=tok, dtype=dtype, workers=workers, journal=journal, bar=bar, t_tokens=[0])
    t_start = time.time()
    try:
        results = {}
        if val_sources:
            plan = [("val", val_sources, None), ("train", train_sources, None)]
        elif val_fraction > 0:
            plan = [("val", train_sources, lambda b: _doc_hash(b)[0] < val_fraction),
                    ("train", train_sources, lambda b: _doc_hash(b)[0] >= val_fraction)]
        else:
            plan = [("train", train_sources, None)]
        for split, sources, select in plan:
            if split in journal.get("done", {}):
                results[split] = journal["done"][split]
                continue
            if bar is not None:
                bar.set_description(f"data_prep {split}")
            results[split] = _run_split(ctx, split, sources, select)
    finally:
        if bar is not None:
            bar.set_postfix_str(f"{ctx.t_tokens[0]:,} tokens", refresh=True)
            bar.close()
    elapsed = time.time() - t_start

    splits = {s: results.get(s, _empty_split()) for s in ("train", "val")}
    if splits["train"]["samples"] == 0:
        journal_path = out / JOURNAL
        journal_path.unlink(missing_ok=True)
        raise DataError(
            f"no training sequence could be made: {splits['train']['document_tokens'] + splits['train']['eos_tokens']} "
            f"training tokens are fewer than --seq-len {o.seq_len}; give more input or a smaller --seq-len"
        )
    totals = {k: splits["train"][k] + splits["val"][k] for k in (
        "documents", "document_tokens", "eos_tokens", "tokens_written", "tokens_dropped_tail", "samples",
        "empty_documents_skipped", "replaced_bytes")}
    totals["shards"] = len(splits["train"]["shards"]) + len(splits["val"]["shards"])
    totals["bad_records_skipped"] = splits["train"]["bad_records_skipped"] + (
        splits["val"]["bad_records_skipped"] if val_sources else 0)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created_by": "data_prep (dlmtrain)",
        "seq_len": o.seq_len,
        "dtype": dtype,
        "vocab_size": V,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "mask_id": tok.mask_id,
        "tokenizer": {"file": tok_file, **journal["tokenizer"]},
        "sample_format": {
            "key": "%09d: the sample's index within its split",
            "input_ids.npy": f"1-D {dtype} array of seq_len token ids; documents packed back to back, each ending in EOS",
            "doc_starts.npy": "1-D int32 positions (0 < p < seq_len) where a document begins; present only if any",
        },
        "splits": splits,
        "totals": totals,
        "accounting": "per split: tokens_written + tokens_dropped_tail == document_tokens + eos_tokens",
        "settings": settings,
        "fingerprint": fp,
    }
    write_json_atomic(manifest_path, manifest)
    (out / JOURNAL).unlink(missing_ok=True)
    rate = ctx.t_tokens[0] / elapsed if elapsed > 0 else 0.0
    tr, va = splits["train"], splits["val"]
    _say(o, (
        f"data_prep: {totals['documents']:,} documents ({tr['documents']:,} train, {va['documents']:,} val), "
        f"{totals['document_tokens']:,} tokens -> {totals['samples']:,} sequences of {o.seq_len} in {totals['shards']} "
        f"shards ({len(tr['shards'])} train, {len(va['shards'])} val), {dtype}; {rate:,.0f} tokens/s, "
        f"{time.time() - t0:.1f} s total"
    ))
    _say(o, (
        f"data_prep: dropped tail tokens {totals['tokens_dropped_tail']:,}, empty documents skipped "
        f"{totals['empty_documents_skipped']:,}, replaced undecodable bytes {totals['replaced_bytes']:,}, "
        f"bad records skipped {totals['bad_records_skipped']:,}; wrote {manifest_path}"
    ))
    if (val_fraction > 0 or val_sources) and splits["val"]["samples"] == 0 and not o.quiet:
        print(f"data_prep: warning: the validation split is empty ({splits['val']['documents']} documents, "
              f"{splits['val']['tokens_dropped_tail']} tokens < --seq-len); raise --val-fraction or pass --val-input",
              file=sys.stderr)
    return manifest


def _empty_split() -> dict:
    return {"shards": [], "samples": 0, "tokens_written": 0, "tokens_dropped_tail": 0,
            **{k: 0 for k in _COUNTERS}, "bad_records_skipped": 0}
