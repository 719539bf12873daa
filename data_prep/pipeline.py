"""Documents -> tokenizer -> packed webdataset shards + manifest.json (see dlmtrain/data/format.py).

The run makes one pass per split (validation first, it is small): read the documents
in input order, pick the split's documents (by a hash of their text, or all of a
``--val-input``), tokenize them in parallel (order kept), append EOS, pack them into
``seq_len`` sequences and write shards of about ``--shard-size`` bytes.

Nothing is lost or invented, and the manifest proves it per split::

    tokens_written + tokens_dropped_tail == document_tokens + eos_tokens

Prompt/answer pairs (``--prompt-field``, JSONL): each pair is tokenized as prompt and answer
separately and written as prompt tokens, answer tokens, EOS. Pairs are packed whole (never
split between sequences, data_prep/pack.py), the rest of a sequence is padding, and each
sample records its pairs (``pairs.npy``, dlmtrain/data/format.py); pairs longer than
``seq_len`` are skipped and counted. The manifest says ``"prompt_conditioned": true``, and
the accounting gains the padding: ``tokens_written == document_tokens + eos_tokens +
pad_tokens`` (nothing is dropped: the last sequence is padded).

Resume: after each shard is committed (temp name, fsync, rename) the run records its
position in ``.prep-state.json`` (document index, tokens of that document consumed,
counters). Re-running the same command after an interruption continues from the last
committed shard of the split in progress; the result is byte-identical to an
uninterrupted run. Different inputs or settings restart cleanly (our shards are removed
first).

A finished dataset is never deleted before its replacement is complete. A rerun checks the
inputs (data_prep/inputs.py: resolved paths and contents) and settings against the
manifest: if they differ it refuses, saying what changed, unless ``--overwrite``; if they
match it checks every shard's size and sha256 (a full read; ``--no-verify`` checks sizes
only) and, when some differ, says which and rebuilds. Both rebuilds are written to
``OUT/.prep-new/`` and swapped in when complete (data_prep/outdir.py).
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

from data_prep import outdir
from data_prep.inputs import binary_reason, changes, identity, scan_inputs
from data_prep.pack import Packer, PairPacker
from data_prep.sources import ReadOptions, ReadStats, Source, discover, iter_documents, source_size
from dlmtrain.data.format import FORMAT, FORMAT_VERSION, PAIRS_VERSION, ShardWriter, write_json_atomic
from dlmtrain.data.tokenizer import ByteTokenizer, Tokenizer, file_sha256, hf_from_str, load_hf
from dlmtrain.errors import DataError, UserError

PREP_VERSION = 2  # 2: fingerprint of resolved paths + contents, binary files skipped
JOURNAL = ".prep-state.json"
INPUTS = "inputs.json"  # one record per input file (data_prep/inputs.py)
_PROVENANCE = ("inputs", "val_inputs", "glob", "exclude", "format")  # settings the input records already cover
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
    prompt_field: str = ""  # JSONL prompt/answer pairs: the prompt's field (--field holds the answer)
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
    max_undecodable: float = 0.01  # text files with more non-UTF-8 bytes than this fraction are skipped
    overwrite: bool = False
    verify: bool = True  # on a rerun, check shards' sha256 (else sizes only)
    progress: bool | None = None  # None: a bar when stderr is a terminal, else lines; False: nothing
    progress_every: float = 15.0  # seconds between progress lines when not on a terminal
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
    if o.prompt_field and o.prompt_field == o.field:
        raise DataError(f"--prompt-field and --field are both {o.field!r}; name the prompt's and the answer's fields")
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
    if not 0 <= o.max_undecodable <= 1:
        raise DataError(f"--max-undecodable {o.max_undecodable} must lie in [0, 1]")
    if o.progress_every < 0:
        raise DataError("--progress-every must be >= 0 seconds")


def _read_options(o: PrepOptions) -> ReadOptions:
    return ReadOptions(field=o.field, column=o.column, split_on=o.split_on, on_error=o.on_error, hf_split=o.hf_split,
                       prompt_field=o.prompt_field)


def _read_settings(o: PrepOptions) -> dict:
    """The reading settings as recorded (and fingerprinted): without prompt_field when unused,
    so datasets made before pairs existed stay up to date."""
    read = asdict(_read_options(o))
    if not read["prompt_field"]:
        del read["prompt_field"]
    return read


def _doc_bytes(doc) -> bytes:
    """A document's bytes for hashing (split, tokenizer sample): a pair as prompt NUL answer."""
    return doc.encode("utf-8") if isinstance(doc, str) else b"\0".join(d.encode("utf-8") for d in doc)


def _clean(out: Path, everything: bool) -> None:
    """Remove what an earlier run of ours left: temp files always; shards, manifest, journal if ``everything``."""
    for p in out.iterdir():
        if not outdir.OURS.match(p.name):
            continue
        if ".tmp-" in p.name or everything:
            p.unlink(missing_ok=True)


def _load_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}


class _Progress:
    """A tqdm bar on a terminal; elsewhere (logs, SLURM) one line on stderr every ``every`` seconds
    and at each committed shard (at most one a second), so a long run is never silent."""

    def __init__(self, o: PrepOptions):
        self.bar, self.every, self.last, self.tokens = None, None, time.monotonic(), 0
        if o.quiet or o.progress is False:
            return
        if o.progress or sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(unit=" docs", desc="data_prep", dynamic_ncols=True, smoothing=0.1,
                                bar_format="{desc}{n_fmt} docs{postfix} [{elapsed}, {rate_fmt}]")
                return
            except ImportError:
                pass
        self.every = o.progress_every

    def line(self, text: Callable[[], str], gap: float | None = None) -> None:
        """Print ``text()`` if ``gap`` (default: ``every``) seconds passed since the last line."""
        if self.every is None:
            return
        now = time.monotonic()
        if now - self.last >= (self.every if gap is None else min(gap, self.every)):
            self.last = now
            print(f"data_prep: {text()}", file=sys.stderr, flush=True)

    def doc(self, text: Callable[[], str], tokens: int) -> None:
        self.tokens = tokens
        if self.bar is not None:
            self.bar.update(1)
            if self.bar.n % 64 == 0:
                self.bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)
        self.line(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens:,} tokens", refresh=True)
            self.bar.close()


# ----------------------------------------------------------------------------- tokenizer


def _train_bpe(sources: list[Source], o: PrepOptions, val_fraction: float, prog: _Progress) -> Tokenizer:
    from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers, trainers

    from dlmtrain.data.tokenizer import DEFAULT_SPECIALS, SPECIAL_NAMES

    total = sum(source_size(s) for s in sources) or 1
    rate = min(1.0, o.tokenizer_train_bytes / total)
    budget = [o.tokenizer_train_bytes]
    stats = ReadStats()

    def line() -> str:
        return (f"training the tokenizer: {stats.files_done}/{len(sources)} files, {stats.bytes_read() / 1e6:,.1f} MB "
                f"read, {(o.tokenizer_train_bytes - budget[0]) / 1e6:,.1f} MB of text sampled")

    def texts() -> Iterator[str]:
        for doc, _ in iter_documents(sources, _read_options(o), stats):
            prog.line(line)
            if not doc:
                continue
            b = _doc_bytes(doc)
            split_u, sample_u = _doc_hash(b)
            if split_u < val_fraction or sample_u >= rate:
                continue
            yield from ([doc] if isinstance(doc, str) else doc)
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
_PAIR_COUNTERS = ("prompt_tokens", "pad_tokens", "pairs_too_long_skipped")  # documents are pairs


@dataclass
class _Ctx:
    out: Path
    opts: PrepOptions
    tok: Tokenizer
    dtype: str
    workers: int
    journal: dict
    prog: _Progress
    t_tokens: list  # [document tokens tokenized in this run]
    t_start: float


def _write_journal(ctx: _Ctx) -> None:
    write_json_atomic(ctx.out / JOURNAL, ctx.journal)


def _run_split(ctx: _Ctx, split: str, sources: list[Source], select: Callable[[bytes], bool] | None) -> dict:
    o = ctx.opts
    pairs = bool(o.prompt_field)
    names = _COUNTERS + (_PAIR_COUNTERS if pairs else ())
    cur = ctx.journal.get("current") if (ctx.journal.get("current") or {}).get("split") == split else None
    cur = cur or {"split": split, "next_doc": 0, "skip_tokens": 0, "counters": {k: 0 for k in names},
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
    tok = ctx.tok
    if pairs:
        packer = PairPacker(o.seq_len, tok.eos_id, tok.pad_id if tok.pad_id is not None else tok.eos_id)
    else:
        packer = Packer(o.seq_len, tok.eos_id)
    stats = ReadStats()

    def docs() -> Iterator[tuple[int, str, int]]:
        for i, (doc, rep) in enumerate(iter_documents(sources, _read_options(o), stats)):
            if i < start_doc:
                continue
            if select is not None and not select(_doc_bytes(doc)):
                continue
            if pairs:  # tokenized separately, in order: prompt, then answer
                yield i, doc[0], rep
                yield i, doc[1], 0
            else:
                yield i, doc, rep

    def tokenized():
        it = _tokenized(docs(), tok, ctx.workers)
        if not pairs:
            yield from it
            return
        for (i, prompt, rep), (_, answer, _) in zip(it, it):
            yield i, (prompt, answer), rep

    n_files = len(sources)

    def line() -> str:
        rate = ctx.t_tokens[0] / max(time.time() - ctx.t_start, 1e-9)
        return (f"{split}: {stats.files_done}/{n_files} files, {stats.bytes_read() / 1e6:,.1f} MB read, "
                f"{counters['documents']:,} {'pairs' if pairs else 'documents'}, {ctx.t_tokens[0]:,} tokens, "
                f"{rate:,.0f} tokens/s, {len(shards)} shards")

    def write(seq, before: dict | None) -> dict | None:
        """One sequence to the writer; after a committed shard, the journal (``before``: the
        counters at the resume position, None at the end)."""
        ids, starts, prs, pad, position = seq
        if pairs:  # padding belongs to written sequences: counted at the resume position too
            counters["pad_tokens"] += pad
            if before is not None:
                before["pad_tokens"] += pad
        rec = writer.add(ids, starts, prs)
        if rec is not None:
            shards.append(rec)
            if before is not None:
                cur.update(next_doc=position[0], skip_tokens=position[1], counters=before, shards=list(shards),
                           sample_index=writer.sample_index)
                _write_journal(ctx)
            ctx.prog.line(lambda: f"wrote {rec['name']} ({rec['bytes'] / 1e6:,.1f} MB); {line()}", gap=1.0)
            if before is not None:
                _after_commit(split, rec)
        return rec

    try:
        for i, toks, rep in tokenized():
            before = dict(counters)
            ctx.prog.doc(line, ctx.t_tokens[0])
            n = len(toks[0]) + len(toks[1]) if pairs else len(toks)
            if n == 0:
                counters["empty_documents_skipped"] += 1
                continue
            if pairs and not packer.fits(*toks):
                counters["pairs_too_long_skipped"] += 1
                continue
            counters["documents"] += 1
            counters["document_tokens"] += n
            counters["eos_tokens"] += 1
            counters["replaced_bytes"] += rep
            ctx.t_tokens[0] += n
            skip = skip_tokens if i == start_doc else 0
            if pairs:
                counters["prompt_tokens"] += len(toks[0])
                seqs = packer.add(i, *toks) if not skip else ()  # skip: this pair is already written
            else:
                seqs = ((ids, starts, None, 0, pos) for ids, starts, pos in packer.add(i, toks, skip))
            for seq in seqs:
                write(seq, before)
        last = packer.finish() if pairs else None
        if last is not None:  # pairs: the last sequence, padded; nothing is dropped
            write(last, None)
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
        "bad_records_first": stats.examples[0] if stats.examples else None,
    }
    if (result["tokens_written"] + result["tokens_dropped_tail"]
            != result["document_tokens"] + result["eos_tokens"] + result.get("pad_tokens", 0)):
        raise RuntimeError(f"token accounting failed for split {split}: {result}")  # a bug, not a user error
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
    out = Path(o.out).expanduser().resolve()
    outdir.check_out(out, o.out, o.inputs + o.val_inputs)
    if outdir.recover(out):
        _say(o, f"data_prep: installed the complete dataset an interrupted run left in {out / outdir.NEW}")
    prog = _Progress(o)
    try:
        return _prepare(o, out, train_sources, val_sources, val_fraction, prog, t0)
    finally:
        prog.close()


def _scan(o: PrepOptions, out: Path, sources: dict[str, list[Source]], prog: _Progress) -> dict[str, list[dict]]:
    """Input records per split (see data_prep/inputs.py), marking text files skipped as binary."""
    cache = {}
    for d in (out, out / outdir.NEW):
        for recs in _load_json(d / INPUTS).values():
            cache.update({r["path"]: r for r in recs if isinstance(r, dict) and "path" in r})
    t, done = time.time(), [0, 0]

    def tick(n_bytes: int) -> None:
        done[0] += 1
        done[1] += n_bytes
        prog.line(lambda: f"fingerprinting inputs: {done[0]:,} files, {done[1] / 1e6:,.1f} MB read")

    records = {split: scan_inputs(srcs, cache, tick) for split, srcs in sources.items()}
    if time.time() - t >= 1:
        _say(o, f"data_prep: read {done[0]:,} input files ({done[1] / 1e6:,.1f} MB) to fingerprint them "
                f"in {time.time() - t:.1f} s")
    for recs in records.values():
        for r in recs:
            r["skipped"] = binary_reason(r, o.max_undecodable)
    return records


def _without_binary(sources: list[Source], records: list[dict], what: str) -> list[Source]:
    skip = {r["path"] for r in records if r["skipped"]}
    kept = [s for s in sources if s.kind != "text" or str(Path(s.path).resolve()) not in skip]
    if sources and not kept:
        first = next(r for r in records if r["skipped"])
        raise DataError(f"every {what} file was skipped as binary ({len(skip)} file(s); first: {first['path']}: "
                        f"{first['skipped']}); give text files, or raise --max-undecodable")
    return kept


def _fingerprint(settings: dict, records: dict[str, list[dict]]) -> str:
    key = {"settings": {k: v for k, v in settings.items() if k not in _PROVENANCE},
           "inputs": {split: identity(recs) for split, recs in records.items()}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _refusal(o: PrepOptions, out: Path, old: dict, settings: dict, records: dict) -> str:
    """The one-line refusal to replace a dataset made otherwise, saying what differs."""
    old_settings = old.get("settings") or {}
    if not old_settings:
        what = ["its manifest.json is unreadable or not written by data_prep"]
    elif old_settings.get("prep_version") != PREP_VERSION:
        what = [f"it was made by data_prep format {old_settings.get('prep_version')}, this is {PREP_VERSION}"]
    else:
        a, b = _flat(old_settings), _flat(settings)
        what = [f"{k} {json.dumps(a.get(k))[:60]} -> {json.dumps(b.get(k))[:60]}" for k in sorted(set(a) | set(b))
                if k.split(".")[0] not in _PROVENANCE and a.get(k) != b.get(k)]
        old_records = _load_json(out / INPUTS)
        what += changes(old_records, records) if old_records else []
        what = what or ["inputs differ"]
    msg = (f"{o.out} already holds a dataset made from other inputs or settings ({'; '.join(what[:4])}); pass "
           "--overwrite to replace it (the old one is kept until the new one is complete), or choose another --out")
    if (out / outdir.NEW / JOURNAL).is_file():
        msg += f"; an interrupted --overwrite run waits in {out / outdir.NEW}: re-run it with --overwrite to resume"
    return msg


def _prepare(o: PrepOptions, out: Path, train_sources: list[Source], val_sources: list[Source], val_fraction: float,
             prog: _Progress, t0: float) -> dict:
    records = _scan(o, out, {"train": train_sources, "val": val_sources}, prog)
    train_sources = _without_binary(train_sources, records["train"], "input")
    val_sources = _without_binary(val_sources, records["val"], "--val-input")
    binary = [f"{r['path']}: {r['skipped']}" for recs in records.values() for r in recs if r["skipped"]]
    settings = {
        "prep_version": PREP_VERSION,
        "inputs": [str(Path(i).expanduser().resolve()) for i in o.inputs],
        "val_inputs": [str(Path(i).expanduser().resolve()) for i in o.val_inputs],
        "glob": o.glob, "exclude": list(o.exclude), "format": o.format,
        "val_fraction": val_fraction, "read": _read_settings(o), "seq_len": o.seq_len, "dtype": o.dtype,
        "shard_size": o.shard_size, "max_undecodable": o.max_undecodable, "tokenizer_source": _tokenizer_spec(o),
    }
    fp = _fingerprint(settings, records)
    user_tok = load_hf(o.tokenizer, o.special_names) if o.tokenizer not in (None, "bytes") else None

    # where to build: OUT itself, or OUT/.prep-new when a finished dataset must stay until its replacement is whole
    manifest_path = out / "manifest.json"
    build = out
    if manifest_path.exists():
        old = _load_json(manifest_path)
        if old.get("fingerprint") != fp and not o.overwrite:
            raise DataError(_refusal(o, out, old, settings, records))
        if not o.overwrite:
            bad, read, secs = outdir.verify(out, old, full=o.verify, tick=lambda i, n, b: prog.line(
                lambda: f"checking shards against the manifest: {i}/{n} files, {b / 1e6:,.1f} MB read"))
            checked = (f"sha256 of {read / 1e6:,.1f} MB of shards checked in {secs:.2f} s" if o.verify
                       else "shard sizes checked, not their sha256 (--no-verify)")
            if not bad:
                if _load_json(out / INPUTS) != records:  # e.g. touched files: save their mtimes, saving rereads
                    write_json_atomic(out / INPUTS, records)
                _say(o, f"data_prep: {manifest_path} is up to date (same inputs and settings; {checked}); nothing to do")
                return old
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            print(f"data_prep: {len(bad)} file(s) in {out} differ from its manifest ({'; '.join(bad[:3])}{more}; "
                  f"{checked}); rebuilding the dataset in {out / outdir.NEW}, swapped in when complete",
                  file=sys.stderr, flush=True)
        build = out / outdir.NEW
        build.mkdir(exist_ok=True)
    try:
        manifest, rate = _build(o, build, train_sources, val_sources, val_fraction, prog, settings, records, fp, user_tok,
                          binary)
    except UserError:
        if build != out:  # a failed replacement leaves the old dataset exactly as it was
            outdir.remove_ours(build, rmdir=True)
        raise
    if build != out:
        outdir.install(out, build)
    manifest_path = out / "manifest.json"
    _summary(o, manifest, manifest_path, val_fraction > 0 or bool(val_sources), binary, rate, t0)
    return manifest


def _build(o: PrepOptions, out: Path, train_sources: list[Source], val_sources: list[Source], val_fraction: float,
           prog: _Progress, settings: dict, records: dict, fp: str, user_tok, binary: list[str]) -> tuple[dict, float]:
    """Write the dataset into ``out`` (resuming a journal of the same fingerprint); returns the manifest, tokens/s."""
    journal = _load_json(out / JOURNAL) or None
    if journal is not None and journal.get("fingerprint") != fp:
        journal = None
    _clean(out, everything=journal is None)
    if journal is None:
        journal = {"fingerprint": fp, "tokenizer": None, "done": {}, "current": None}
    else:
        done = ", ".join(journal.get("done", {})) or "none"
        _say(o, f"data_prep: resuming the interrupted run in {out} (finished splits: {done})")
    write_json_atomic(out / INPUTS, records)

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
            tok = _train_bpe(train_sources, o, val_fraction, prog)
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
    ctx = _Ctx(out=out, opts=o, tok=tok, dtype=dtype, workers=workers, journal=journal, prog=prog, t_tokens=[0],
               t_start=time.time())
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
        if prog.bar is not None:
            prog.bar.set_description(f"data_prep {split}")
        results[split] = _run_split(ctx, split, sources, select)
    elapsed = time.time() - ctx.t_start

    pairs = bool(o.prompt_field)
    splits = {s: results.get(s, _empty_split(pairs)) for s in ("train", "val")}
    if splits["train"]["samples"] == 0:
        (out / JOURNAL).unlink(missing_ok=True)
        if pairs:
            raise DataError(f"no training pair could be written ({splits['train']['pairs_too_long_skipped']} were longer "
                            f"than --seq-len {o.seq_len} with their EOS); give more input or a larger --seq-len")
        raise DataError(
            f"no training sequence could be made: {splits['train']['document_tokens'] + splits['train']['eos_tokens']} "
            f"training tokens are fewer than --seq-len {o.seq_len}; give more input or a smaller --seq-len"
        )
    totals = {k: splits["train"][k] + splits["val"][k] for k in (
        "documents", "document_tokens", "eos_tokens", "tokens_written", "tokens_dropped_tail", "samples",
        "empty_documents_skipped", "replaced_bytes") + (_PAIR_COUNTERS if pairs else ())}
    totals["shards"] = len(splits["train"]["shards"]) + len(splits["val"]["shards"])
    # with --val-fraction both passes read the same records: count them once
    totals["bad_records_skipped"] = splits["train"]["bad_records_skipped"] + (
        splits["val"]["bad_records_skipped"] if val_sources else 0)
    totals["binary_files_skipped"] = len(binary)
    manifest = {
        "format": FORMAT,
        "version": PAIRS_VERSION if pairs else FORMAT_VERSION,
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
            **({"pairs.npy": "1-D int32 (start, answer_start, end) per prompt/answer pair: prompt at [start, "
                             "answer_start), answer + EOS at [answer_start, end); other positions are padding"}
               if pairs else {}),
        },
        **({"prompt_conditioned": True} if pairs else {}),
        "splits": splits,
        "totals": totals,
        "binary_files_skipped": binary[:5],  # the first few; inputs.json marks every one
        "accounting": "per split: tokens_written + tokens_dropped_tail == document_tokens + eos_tokens"
                      + (" + pad_tokens" if pairs else ""),
        "settings": settings,
        "fingerprint": fp,
    }
    write_json_atomic(out / "manifest.json", manifest)
    (out / JOURNAL).unlink(missing_ok=True)
    return manifest, (ctx.t_tokens[0] / elapsed if elapsed > 0 else 0.0)


def _summary(o: PrepOptions, m: dict, manifest_path: Path, has_val: bool, binary: list[str], rate: float,
             t0: float) -> None:
    if o.quiet:
        return
    totals, tr, va = m["totals"], m["splits"]["train"], m["splits"]["val"]
    val_docs = f", {va['documents']:,} val" if has_val else "; no validation split: --val-fraction 0"
    val_shards = f", {len(va['shards'])} val" if has_val else ""
    print(f"data_prep: {totals['documents']:,} documents ({tr['documents']:,} train{val_docs}), "
          f"{totals['document_tokens']:,} tokens -> {totals['samples']:,} sequences of {m['seq_len']} in "
          f"{totals['shards']} shards ({len(tr['shards'])} train{val_shards}), {m['dtype']}; "
          f"{rate:,.0f} tokens/s, {time.time() - t0:.1f} s total", flush=True)
    print(f"data_prep: dropped tail tokens {totals['tokens_dropped_tail']:,}, empty documents skipped "
          f"{totals['empty_documents_skipped']:,}, replaced undecodable bytes {totals['replaced_bytes']:,}, "
          f"bad records skipped {totals['bad_records_skipped']:,}, binary files skipped {len(binary):,}; "
          f"wrote {manifest_path}", flush=True)
    if m.get("prompt_conditioned"):
        print(f"data_prep: prompt/answer pairs: {totals['prompt_tokens']:,} prompt tokens, "
              f"{totals['document_tokens'] - totals['prompt_tokens']:,} answer tokens, {totals['pad_tokens']:,} "
              f"padding tokens", flush=True)
        if totals["pairs_too_long_skipped"]:
            print(f"data_prep: skipped {totals['pairs_too_long_skipped']:,} pair(s) longer than --seq-len "
                  f"{m['seq_len']} (with EOS); raise --seq-len to keep them", file=sys.stderr, flush=True)
    if binary:
        print(f"data_prep: skipped {len(binary)} binary file(s) (first: {binary[0]}); {INPUTS} lists them",
              file=sys.stderr, flush=True)
    first_bad = tr["bad_records_first"] or va["bad_records_first"]
    if totals["bad_records_skipped"]:
        print(f"data_prep: skipped {totals['bad_records_skipped']} bad record(s) (first: {first_bad})",
              file=sys.stderr, flush=True)
    if has_val and va["samples"] == 0:
        print(f"data_prep: warning: the validation split is empty ({va['documents']} documents, "
              f"{va['tokens_dropped_tail']} tokens < --seq-len); raise --val-fraction or pass --val-input",
              file=sys.stderr, flush=True)


def _empty_split(pairs: bool = False) -> dict:
    return {"shards": [], "samples": 0, "tokens_written": 0, "tokens_dropped_tail": 0,
            **{k: 0 for k in _COUNTERS + (_PAIR_COUNTERS if pairs else ())}, "bad_records_skipped": 0,
            "bad_records_first": None}
