"""Inputs -> a deterministic stream of documents (str).

Kinds, chosen by file name (``--format`` forces one):

* text (any other file): the whole file is one document, or ``--split-on line`` (each
  line, without its line ending) or ``--split-on blank`` (paragraphs separated by one
  or more blank lines; a paragraph keeps its inner line breaks, not its last one).
* JSONL (``.jsonl``, ``.ndjson``): one document per line, the string at ``--field``
  (dotted for nesting: ``meta.body``). Blank lines are ignored. With ``--prompt-field``
  each line is a prompt/answer pair instead: ``(prompt, answer)`` from the two fields
  (JSONL only).
* Parquet (``.parquet``, ``.pq``): one document per row of ``--column`` (nulls are empty
  documents).
* a Hugging Face dataset directory written by ``save_to_disk`` (``--column``; read with
  ``datasets`` when installed, else straight from its Arrow files with pyarrow).
* ``.gz`` compressed variants of all of the above.

Directories are walked recursively in sorted order, keeping files whose name matches
``--glob`` and skipping hidden entries and ``--exclude`` matches.

Bytes that are not UTF-8 are replaced by U+FFFD and counted; so are lone surrogates
from JSON escapes (the tokenizers need valid UTF-8). Text files that look binary are
dropped before reading (data_prep/inputs.py).
"""

from __future__ import annotations

import codecs
import fnmatch
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dlmtrain.errors import DataError

KINDS = ("auto", "text", "jsonl", "parquet", "hf")
SPLIT_ON = ("none", "line", "blank")
_replaced = [0]


def _count_replace(err: UnicodeError):
    if isinstance(err, UnicodeDecodeError):
        _replaced[0] += err.end - err.start
        return "\ufffd", err.end
    if isinstance(err, UnicodeEncodeError):  # lone surrogates
        _replaced[0] += err.end - err.start
        return "\ufffd" * (err.end - err.start), err.end
    raise err


codecs.register_error("dlmtrain-count", _count_replace)


def count_replaced(decode_fn) -> int:
    """How many bytes were replaced while ``decode_fn()`` decoded with ``errors="dlmtrain-count"``."""
    before = _replaced[0]
    decode_fn()
    return _replaced[0] - before


def decode(data: bytes) -> tuple[str, int]:
    """UTF-8 text and the number of bytes that had to be replaced."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        before = _replaced[0]
        text = data.decode("utf-8", errors="dlmtrain-count")
        return text, _replaced[0] - before


def clean(text: str) -> tuple[str, int]:
    """Replace lone surrogates (not encodable as UTF-8); returns the text and how many."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        out = []
        n = 0
        for ch in text:
            if "\ud800" <= ch <= "\udfff":
                out.append("\ufffd")
                n += 1
            else:
                out.append(ch)
        return "".join(out), n


@dataclass(frozen=True)
class Source:
    path: str
    kind: str  # text | jsonl | parquet | hf
    gz: bool = False


@dataclass
class ReadOptions:
    field: str = "text"
    column: str = "text"
    split_on: str = "none"
    on_error: str = "fail"  # fail | skip (bad JSONL records)
    hf_split: str = ""
    prompt_field: str = ""  # JSONL prompt/answer pairs: documents are (prompt, answer) tuples


@dataclass
class ReadStats:
    bad_records: int = 0
    examples: list = field(default_factory=list)  # the first few bad-record messages
    files_done: int = 0  # sources read to the end (progress lines)
    bytes_done: int = 0  # their sizes on disk
    reading: object = None  # the raw file being read, for bytes_read()

    def bytes_read(self) -> int:
        try:
            return self.bytes_done + (self.reading.tell() if self.reading is not None else 0)
        except (OSError, ValueError):  # closed meanwhile
            return self.bytes_done


def _is_hf_dir(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def _classify(p: Path, fmt: str) -> Source:
    name = p.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if fmt != "auto":
        return Source(str(p), fmt, gz)
    if name.endswith((".jsonl", ".ndjson")):
        return Source(str(p), "jsonl", gz)
    if name.endswith((".parquet", ".pq")):
        return Source(str(p), "parquet", gz)
    return Source(str(p), "text", gz)


def _excluded(rel: Path, patterns: list[str]) -> bool:
    parts = rel.parts
    if any(part.startswith(".") for part in parts):
        return True
    for pat in patterns:
        if fnmatch.fnmatch(rel.as_posix(), pat) or any(fnmatch.fnmatch(part, pat) for part in parts):
            return True
    return False


def discover(inputs: list[str], glob: str = "*", exclude: list[str] | None = None, fmt: str = "auto") -> list[Source]:
    """Expand inputs into an ordered list of sources; missing paths raise DataError."""
    if fmt not in KINDS:
        raise DataError(f"--format {fmt!r} is not one of: {', '.join(KINDS)}")
    exclude = list(exclude or [])
    out: list[Source] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if not p.exists():
            raise DataError(f"input not found: {raw}")
        if p.is_dir():
            if fmt == "hf" or (fmt == "auto" and _is_hf_dir(p)):
                out.append(Source(str(p), "hf"))
                continue
            files = []
            for f in p.rglob(glob):
                rel = f.relative_to(p)
                if f.is_file() and not _excluded(rel, exclude):
                    files.append((rel.as_posix(), f))
            if not files:
                raise DataError(f"no files matching --glob {glob!r} under {raw}" + (f" (excluding {exclude})" if exclude else ""))
            out.extend(_classify(f, fmt) for _, f in sorted(files))
        else:
            if fmt == "hf":
                raise DataError(f"--format hf needs a directory written by save_to_disk, got the file {raw}")
            out.append(_classify(p, fmt))
    return out


def source_size(src: Source) -> int:
    p = Path(src.path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def _open(src: Source, stats: ReadStats):
    try:
        f = gzip.open(src.path, "rb") if src.gz else open(src.path, "rb")
    except OSError as e:
        raise DataError(f"cannot open {src.path}: {e.strerror or e}") from None
    stats.reading = getattr(f, "fileobj", f)  # for gzip: the compressed file, so progress counts bytes on disk
    return f


def _read_guard(src: Source):
    """Turn low-level read errors (permission, bad gzip) into one-line DataErrors."""

    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, et, ev, tb):
            if ev is None or isinstance(ev, (DataError, GeneratorExit, KeyboardInterrupt)):
                return False
            if isinstance(ev, (OSError, EOFError, gzip.BadGzipFile, ValueError)):
                msg = str(ev).splitlines()[0] if str(ev) else type(ev).__name__
                raise DataError(f"cannot read {src.path}: {msg}") from None
            return False

    return _Guard()


def _strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


def _text_docs(src: Source, opts: ReadOptions, stats: ReadStats) -> Iterator[tuple[str, int]]:
    with _read_guard(src), _open(src, stats) as f:
        if opts.split_on == "none":
            yield decode(f.read())
        elif opts.split_on == "line":
            for line in f:
                yield decode(_strip_eol(line))
        else:  # blank
            para: list[bytes] = []
            for line in f:
                if line.strip():
                    para.append(line)
                elif para:
                    para[-1] = _strip_eol(para[-1])
                    yield decode(b"".join(para))
                    para = []
            if para:
                para[-1] = _strip_eol(para[-1])
                yield decode(b"".join(para))


def _bad(stats: ReadStats, opts: ReadOptions, msg: str) -> None:
    if opts.on_error != "skip":
        raise DataError(f"{msg}; pass --on-error skip to count and skip such records")
    stats.bad_records += 1
    if len(stats.examples) < 5:
        stats.examples.append(msg)


def _get_field(rec, dotted: str):
    cur = rec
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _jsonl_docs(src: Source, opts: ReadOptions, stats: ReadStats) -> Iterator[tuple]:
    """``(text, replaced)`` per record; with ``opts.prompt_field``: ``((prompt, answer), replaced)``."""
    names = [(opts.prompt_field, "--prompt-field")] if opts.prompt_field else []
    names.append((opts.field, "--field"))
    with _read_guard(src), _open(src, stats) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            text, rep = decode(raw)
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                # json's own messages may end in "at" ("Unterminated string starting at"): say it once
                _bad(stats, opts, f"{src.path}:{lineno}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
                continue
            values = []
            for name, flag in names:
                value = _get_field(rec, name)
                if not isinstance(value, str):
                    what = "no field" if value is None else f"a {type(value).__name__}, not a string, in field"
                    _bad(stats, opts, f"{src.path}:{lineno}: record has {what} {name!r} (choose it with {flag})")
                    break
                value, rep2 = clean(value)
                values.append(value)
                rep += rep2
            else:
                yield (tuple(values) if opts.prompt_field else values[0]), rep


def _arrow_strings(column, where: str) -> Iterator[tuple[str, int]]:
    import pyarrow as pa

    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{where}: column has type {column.type}, not string")
    for v in column.to_pylist():
        if v is None:
            yield "", 0
        else:
            yield clean(v)


def _parquet_docs(src: Source, opts: ReadOptions) -> Iterator[tuple[str, int]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading Parquet ({src.path}) needs pyarrow: pip install pyarrow") from None
    try:
        if src.gz:
            with gzip.open(src.path, "rb") as g:
                pf = pq.ParquetFile(pa.BufferReader(g.read()))
        else:
            pf = pq.ParquetFile(src.path)
        names = pf.schema_arrow.names
    except Exception as e:
        raise DataError(f"cannot read Parquet file {src.path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if opts.column not in names:
        raise DataError(f"Parquet file {src.path} has no column {opts.column!r} (it has: {', '.join(names)}); choose one with --column")
    it = pf.iter_batches(batch_size=1024, columns=[opts.column])
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"cannot read Parquet file {src.path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        yield from _arrow_strings(batch.column(0), f"{src.path} column {opts.column!r}")


def _hf_docs(src: Source, opts: ReadOptions) -> Iterator[tuple[str, int]]:
    root = Path(src.path)
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        split = opts.hf_split or ("train" if "train" in splits else "")
        if split not in splits:
            raise DataError(f"{src.path} is a DatasetDict with splits {splits}; choose one with --hf-split")
        root = root / split
    try:
        import datasets  # noqa: F401
    except ImportError:
        datasets = None
    if datasets is not None:
        ds = datasets.load_from_disk(str(root))
        if opts.column not in ds.column_names:
            raise DataError(f"{src.path} has no column {opts.column!r} (it has: {', '.join(ds.column_names)}); choose one with --column")
        for batch in ds.iter(batch_size=1024):
            for v in batch[opts.column]:
                yield ("", 0) if v is None else clean(v)
        return
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(f"reading the saved dataset {src.path} needs `datasets` or pyarrow: pip install datasets") from None
    try:
        state = json.loads((root / "state.json").read_text())
        files = [root / d["filename"] for d in state["_data_files"]]
    except Exception as e:
        raise DataError(f"cannot read {root}/state.json ({e}); is {src.path} a save_to_disk directory?") from None
    for fpath in files:
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(fpath)))
            names = reader.schema.names
        except Exception as e:
            raise DataError(f"cannot read Arrow file {fpath}: {str(e).splitlines()[0]}") from None
        if opts.column not in names:
            raise DataError(f"{src.path} has no column {opts.column!r} (it has: {', '.join(names)}); choose one with --column")
        for batch in reader:
            yield from _arrow_strings(batch.column(names.index(opts.column)), f"{fpath} column {opts.column!r}")


def iter_documents(sources: list[Source], opts: ReadOptions, stats: ReadStats) -> Iterator[tuple]:
    """Every document of every source, in order: ``(text, replaced_bytes)``; with ``opts.prompt_field``
    ``((prompt, answer), replaced_bytes)``."""
    if opts.split_on not in SPLIT_ON:
        raise DataError(f"--split-on {opts.split_on!r} is not one of: {', '.join(SPLIT_ON)}")
    for src in sources:
        if opts.prompt_field and src.kind != "jsonl":
            raise DataError(f"--prompt-field reads prompt/answer pairs from JSONL only, but {src.path} is read as "
                            f"{src.kind}; give .jsonl files (or --format jsonl)")
        if src.kind == "text":
            yield from _text_docs(src, opts, stats)
        elif src.kind == "jsonl":
            yield from _jsonl_docs(src, opts, stats)
        elif src.kind == "parquet":
            yield from _parquet_docs(src, opts)
        elif src.kind == "hf":
            yield from _hf_docs(src, opts)
        else:  # pragma: no cover
            raise DataError(f"unknown input kind {src.kind}")
        stats.reading = None
        stats.files_done += 1
        stats.bytes_done += source_size(src)


__all__ = ["Source", "ReadOptions", "ReadStats", "discover", "iter_documents", "decode", "clean"]
