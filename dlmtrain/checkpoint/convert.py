"""`dlmtrain convert SRC DST --to safetensors|lightning|fp32 [--raw] [--dtype bf16|fp32] [--from mdlm]`.

    dlmtrain convert runs/demo/checkpoints/last.ckpt export/demo --to safetensors     # .ckpt -> export dir
    dlmtrain convert runs/big/checkpoints/last.ckpt big-step9000.ckpt --to fp32         # sharded dir -> one .ckpt
    dlmtrain convert runs/big/checkpoints/last.ckpt export/big --to safetensors        # sharded dir -> export dir
    dlmtrain convert export/demo demo-init.ckpt --to lightning                         # export -> trainable .ckpt
    dlmtrain convert mdlm-owt/ export/mdlm-owt --from mdlm --tokenizer gpt2/tokenizer.json
    dlmtrain convert their.ckpt export/mdlm --from mdlm --data data/owt/manifest.json

--to fp32 takes a sharded checkpoint directory (strategy=deepspeed_zero1/2/3 or fsdp) and writes
one float32 Lightning checkpoint with everything a resume needs: weights, EMA, the AdamW state
consolidated for one process (left out, and said, where that cannot be done faithfully), LR
schedule, loops, data position (dlmtrain/checkpoint/fp32.py). It keeps both the training weights
and the EMA, as every .ckpt does, so --raw does not apply; --dtype can only be fp32.
--to safetensors also takes a sharded directory (consolidated in memory, then exported).

Mistakes (a file that is no checkpoint, an incomplete sharded directory, --to fp32 of a checkpoint
that already is one file, another architecture, an existing DST) are one line and exit 2,
checked before anything is written. Formats: dlmtrain/checkpoint/export.py, fp32.py, mdlm.py.
"""

from __future__ import annotations

from pathlib import Path

from dlmtrain.errors import ConfigError


def add_convert_arguments(p) -> None:
    p.add_argument("src", help="a dlmtrain .ckpt, a sharded checkpoint directory, an export directory, or (with --from mdlm) an MDLM .ckpt / "
                   "Hugging Face directory")
    p.add_argument("dst", help="the export directory (--to safetensors) or .ckpt file (--to lightning, fp32) to write")
    p.add_argument("--to", required=True, choices=("safetensors", "lightning", "fp32"),
                   help="safetensors: an export directory (model.safetensors, config.json, tokenizer) from a .ckpt or a "
                   "sharded checkpoint directory; lightning: an export directory -> a checkpoint to continue training "
                   "from (run.resume=DST; fresh optimizer); fp32: a sharded (DeepSpeed ZeRO / FSDP2) checkpoint "
                   "directory -> one float32 .ckpt with weights, EMA, AdamW state and loops (run.resume=DST on one "
                   "process)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--ema", dest="ema", action="store_true", default=True,
                   help="the EMA weights when the checkpoint has them (default)")
    w.add_argument("--raw", dest="ema", action="store_false", help="the raw training weights")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weights in the export (default: %(default)s; --to fp32: fp32 only)")
    p.add_argument("--from", dest="source", default="dlmtrain", choices=("dlmtrain", "mdlm"),
                   help="the source's codebase (default: %(default)s); mdlm: kuleshov-group/mdlm's Lightning .ckpt "
                   "or the mdlm-owt Hugging Face layout")
    p.add_argument("--data", metavar="MANIFEST", help="the data whose tokenizer goes into the export (default: the "
                   "checkpoint's); for --from mdlm also recorded as the model's data")
    p.add_argument("--tokenizer", metavar="PATH", help="--from mdlm: their tokenizer (a tokenizer.json or a "
                   "directory holding one, e.g. GPT-2's for mdlm-owt)")
    p.add_argument("--force", action="store_true", help="replace an existing DST (an export directory or a file)")


def _fp32(args, src: Path, dst: Path) -> int:
    from dlmtrain.checkpoint.export import check_destination, is_export_dir
    from dlmtrain.checkpoint.files import MANIFEST, BadCheckpoint, inspect
    from dlmtrain.checkpoint.fp32 import consolidate

    if args.dtype != "fp32":
        raise ConfigError(f"--to fp32 writes float32; --dtype {args.dtype} applies to --to safetensors")
    if not args.ema:
        raise ConfigError("--to fp32 keeps both the training weights and the EMA (as every .ckpt); --raw applies "
                          "to --to safetensors (or load_checkpoint(ema=False))")
    if args.source != "dlmtrain" or args.data or args.tokenizer:
        raise ConfigError("--from, --data and --tokenizer do not apply to --to fp32 (a dlmtrain sharded checkpoint "
                          "keeps its config and data position)")
    if src.is_file():
        try:
            info = inspect(src)
        except BadCheckpoint as e:
            raise ConfigError(f"{e}; --to fp32 takes a sharded checkpoint directory") from None
        raise ConfigError(f"{src} already is a single-file checkpoint ({info.describe()}, step {info.step}): resume "
                          "from it with run.resume=PATH, or export it with --to safetensors")
    if is_export_dir(src):
        raise ConfigError(f"{src} is an export directory (no optimizer or loop state); --to lightning turns it into "
                          "a checkpoint")
    if not (src / MANIFEST).is_file():
        raise ConfigError(f"{src} is a directory without {MANIFEST}: an interrupted save, or not a dlmtrain sharded "
                          "checkpoint")
    if dst.is_dir():
        raise ConfigError(f"{dst} is a directory; --to fp32 writes one .ckpt file")
    check_destination(dst, args.force)
    consolidate(src, dst, force=args.force)
    return 0


def run_convert(args) -> int:
    from dlmtrain.checkpoint.export import (
        check_destination, export_checkpoint, export_to_lightning, is_export_dir, refuse_sharded,
    )
    from dlmtrain.checkpoint.files import MANIFEST

    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise ConfigError(f"{src} does not exist")
    if src.resolve() == dst.resolve():
        raise ConfigError(f"SRC and DST are the same path ({src}); choose another DST")
    refuse_sharded(src)  # DeepSpeed / DCP files without dlmtrain's manifest: incomplete, or another program's
    if args.to == "fp32":
        return _fp32(args, src, dst)
    sharded = src.is_dir() and (src / MANIFEST).is_file()
    if args.to == "lightning" and dst.is_dir():
        raise ConfigError(f"{dst} is a directory; --to lightning writes a .ckpt file")
    if sharded and args.to == "lightning":
        raise ConfigError(f"{src} is a sharded checkpoint; --to fp32 makes it one .ckpt (with its optimizer state) "
                          "to resume from")
    if sharded and args.source == "mdlm":
        raise ConfigError(f"{src} is a dlmtrain sharded checkpoint, not an MDLM one; drop --from mdlm")
    check_destination(dst, args.force)
    if args.source == "mdlm":
        from dlmtrain.checkpoint.mdlm import convert_mdlm

        convert_mdlm(src, dst, args.to, ema=args.ema, dtype=args.dtype, force=args.force, tokenizer=args.tokenizer,
                     data=args.data)
        return 0
    if args.tokenizer:
        raise ConfigError("--tokenizer is for --from mdlm; a dlmtrain checkpoint's tokenizer comes from its data "
                          "(or --data MANIFEST)")
    if src.is_dir() and not sharded:
        if not is_export_dir(src):
            from dlmtrain.checkpoint.export import read_export

            read_export(src)  # raises with the reason (and the --from mdlm hint)
        if args.to != "lightning":
            raise ConfigError(f"{src} is already an export directory; --to lightning turns it into a checkpoint")
        if args.dtype != "fp32" or not args.ema or args.data:
            raise ConfigError("--dtype, --raw and --data apply when exporting a .ckpt; an export directory keeps "
                              "the weights it holds")
        export_to_lightning(src, dst, force=args.force)
        return 0
    if args.to == "lightning":
        raise ConfigError(f"{src} is a file; --to lightning converts an export directory (a dlmtrain .ckpt already is "
                          "a Lightning checkpoint: resume from it with run.resume=PATH)")
    export_checkpoint(src, dst, ema=args.ema, dtype=args.dtype, force=args.force, data=args.data)  # .ckpt or sharded
    return 0
