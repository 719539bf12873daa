"""``python -m data_prep INPUT... --out DIR``: argument parsing and one-line errors."""

from __future__ import annotations

import argparse
import os
import sys

from dlmtrain.errors import UserError

EXAMPLES = """\
examples:
  # the Python standard library, a BPE of 8192 trained on it, sequences of 1024
  python -m data_prep /usr/lib/python3.11 --glob '*.py' --exclude site-packages \\
      --train-tokenizer --vocab-size 8192 --seq-len 1024 --out data/stdlib
  # JSONL (field "text"), an existing tokenizer, a separate validation file
  python -m data_prep train.jsonl.gz --val-input val.jsonl.gz --tokenizer gpt2/tokenizer.json --out data/web
  # prompt/answer pairs for supervised fine-tuning (SFT): JSONL {"prompt": ..., "response": ...}
  python -m data_prep sft.jsonl --prompt-field prompt --field response --tokenizer gpt2/tokenizer.json \
      --seq-len 1024 --out data/sft
  # Parquet column "content", byte-level tokens, paragraphs of text files as documents
  python -m data_prep corpus.parquet --column content --tokenizer bytes --out data/bytes

rerunning: the same command on a finished --out checks the inputs (resolved paths and contents)
and settings; if they match it checks every shard's sha256 against manifest.json (a full read;
--no-verify: sizes only) and rebuilds the dataset if any differ; if they differ it refuses, saying
what changed. --overwrite and such rebuilds write the new dataset to OUT/.prep-new/ and swap it in
when complete, so the old one stays intact if the run fails or is interrupted.

exit codes: 0 done (or already up to date), 2 bad input (one line on stderr), 130 interrupted
(re-run the same command to resume from the last finished shard).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Tokenize documents, pack them into fixed-length sequences and write webdataset .tar shards "
        "plus a manifest.json that dlmtrain's data module reads (data.manifest=DIR/manifest.json).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="text files, directories (searched recursively), .jsonl, .parquet, .gz variants of these, "
                        "or a Hugging Face dataset directory written by save_to_disk")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (created if missing; not inside an input directory)")

    g = p.add_argument_group("reading")
    g.add_argument("--glob", default="*", metavar="PATTERN",
                   help="in directories, keep files whose name matches PATTERN (default: %(default)s; e.g. '*.txt')")
    g.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="in directories, skip files or folders matching PATTERN (repeatable); hidden ones are always skipped")
    g.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet", "hf"],
                   help="input kind; auto decides by file name: .jsonl/.ndjson, .parquet/.pq, else text (default: %(default)s)")
    g.add_argument("--field", default="text", metavar="NAME",
                   help="JSONL: the field holding the document, dotted for nesting (default: %(default)s)")
    g.add_argument("--prompt-field", default="", metavar="NAME",
                   help="JSONL prompt/answer pairs (SFT): the field holding the prompt; --field then holds the "
                        "answer. Each pair is written as prompt tokens, answer tokens, EOS; whole pairs are packed "
                        "into --seq-len sequences (never split; the rest of a sequence is padding) and pairs longer "
                        "than --seq-len are skipped and counted. The shards record where each prompt and answer lie "
                        "(pairs.npy) and the manifest says prompt_conditioned: training then never masks or scores "
                        "the prompt, and val/nelbo is per answer token (default: off, plain documents)")
    g.add_argument("--column", default="text", metavar="NAME",
                   help="Parquet / Hugging Face dataset: the column holding the document (default: %(default)s)")
    g.add_argument("--hf-split", default="", metavar="NAME",
                   help="Hugging Face DatasetDict: which split to read (default: train)")
    g.add_argument("--split-on", default="none", choices=["none", "line", "blank"],
                   help="text files: none = the file is one document; line = each line; blank = paragraphs separated "
                        "by blank lines (default: %(default)s)")
    g.add_argument("--on-error", default="fail", choices=["fail", "skip"],
                   help="a JSONL line that is not JSON or lacks the field: fail (exit 2, naming file and line) or "
                        "skip and count it (default: %(default)s)")
    g.add_argument("--max-undecodable", type=float, default=0.01, metavar="F",
                   help="text files (not JSONL/Parquet): skip a file as binary when more than this fraction of its "
                        "bytes are not UTF-8, or when its first 8 KB hold a NUL byte; counted in the manifest and "
                        "listed in OUT/inputs.json (default: %(default)s; 1 keeps all but NUL files)")

    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", metavar="PATH|bytes",
                   help="a tokenizer.json (Hugging Face tokenizers) or a directory holding one; or 'bytes' for a "
                        "byte-level tokenizer (256 bytes + [PAD] [BOS] [EOS] [MASK])")
    g.add_argument("--train-tokenizer", action="store_true",
                   help="train a byte-level BPE on the training documents; saved as DIR/tokenizer.json")
    g.add_argument("--vocab-size", type=int, default=0, metavar="N",
                   help="vocabulary size for --train-tokenizer, special tokens included (>= 260)")
    g.add_argument("--tokenizer-train-bytes", default="1GB", metavar="SIZE",
                   help="train the BPE on at most this much text, sampled evenly by document hash (default: %(default)s)")
    for name in ("eos", "bos", "pad", "mask"):
        g.add_argument(f"--{name}-token", default=None, metavar="TOKEN",
                       help=f"spelling of the {name.upper()} token in --tokenizer (default: found by common names"
                            + ("; [EOS] is added if the tokenizer has none)" if name == "eos" else ")"))

    g = p.add_argument_group("packing and output")
    g.add_argument("--seq-len", type=int, default=1024, metavar="N",
                   help="tokens per packed sequence, >= 2 (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"],
                   help="token storage; auto = uint16 when the vocabulary fits (<= 65536), else uint32")
    g.add_argument("--shard-size", default="256MB", metavar="SIZE",
                   help="target bytes per .tar shard, e.g. 64MB, 1GiB (default: %(default)s)")
    g.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help="fraction of documents, chosen by a hash of their text, for validation "
                        "(default: 0.01; 0 without --val-input means no validation split)")
    g.add_argument("--val-input", action="append", default=[], metavar="PATH",
                   help="inputs for the validation split instead of --val-fraction (repeatable)")
    g.add_argument("--workers", type=int, default=0, metavar="N",
                   help="tokenizer processes (default: all %d CPUs)" % (os.cpu_count() or 1))
    g.add_argument("--overwrite", action="store_true",
                   help="replace a dataset already in --out that was made from other inputs or settings; the new one "
                        "is built in OUT/.prep-new/ and swapped in when complete (not needed to resume an "
                        "interrupted run)")
    g.add_argument("--no-verify", action="store_true",
                   help="on a rerun over a finished dataset, check only the shards' sizes, not their sha256 "
                        "(which reads every shard)")
    g.add_argument("--progress-every", type=float, default=15.0, metavar="S",
                   help="when stderr is not a terminal (logs, batch jobs): print a progress line every S seconds "
                        "and at each finished shard (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def options_from_args(a: argparse.Namespace):
    from data_prep.pipeline import PrepOptions, parse_size

    names = {n: getattr(a, f"{n}_token") for n in ("eos", "bos", "pad", "mask") if getattr(a, f"{n}_token")}
    return PrepOptions(
        inputs=a.inputs, out=a.out, val_inputs=a.val_input, val_fraction=a.val_fraction, glob=a.glob,
        exclude=a.exclude, format=a.format, field=a.field, prompt_field=a.prompt_field, column=a.column, hf_split=a.hf_split,
        split_on=a.split_on, on_error=a.on_error, tokenizer=a.tokenizer, train_tokenizer=a.train_tokenizer,
        vocab_size=a.vocab_size, tokenizer_train_bytes=parse_size(a.tokenizer_train_bytes), special_names=names,
        seq_len=a.seq_len, dtype=a.dtype, shard_size=parse_size(a.shard_size), workers=a.workers,
        max_undecodable=a.max_undecodable, overwrite=a.overwrite, verify=not a.no_verify,
        progress=False if a.no_progress else None, progress_every=a.progress_every, quiet=a.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from data_prep.pipeline import prepare

        prepare(options_from_args(args))
        return 0
    except UserError as e:
        print(f"data_prep: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("data_prep: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions changed mid-run, ...: what is written so far stays resumable
        where = f" ({e.filename})" if e.filename else ""
        print(f"data_prep: error: {e.strerror or e}{where}; fix that and re-run the same command to resume",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
