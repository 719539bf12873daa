"""`dlmtrain convert SRC DST --to safetensors|lightning [--raw] [--dtype bf16|fp32] [--from mdlm]`.

    dlmtrain convert runs/demo/checkpoints/last.ckpt export/demo --to safetensors     # .ckpt -> export dir
    dlmtrain convert export/demo demo-init.ckpt --to lightning                         # export -> trainable .ckpt
    dlmtrain convert mdlm-owt/ export/mdlm-owt --from mdlm --tokenizer gpt2/tokenizer.json
    dlmtrain convert their.ckpt export/mdlm --from mdlm --data data/owt/manifest.json

Mistakes (a file that is no checkpoint, another architecture, an existing DST) are one line and
exit 2, checked before anything is written. Formats: dlmtrain/checkpoint/export.py, mdlm.py.
"""

from __future__ import annotations

from pathlib import Path

from dlmtrain.errors import ConfigError


def add_convert_arguments(p) -> None:
    p.add_argument("src", help="a dlmtrain .ckpt, an export directory, or (with --from mdlm) an MDLM .ckpt / "
                   "Hugging Face directory")
    p.add_argument("dst", help="the export directory (--to safetensors) or .ckpt file (--to lightning) to write")
    p.add_argument("--to", required=True, choices=("safetensors", "lightning", "fp32"),
                   help="safetensors: an export directory (model.safetensors, config.json, tokenizer); lightning: a "
                   "checkpoint to continue training from (run.resume=DST; fresh optimizer); fp32: consolidate a "
                   "sharded checkpoint (not supported yet)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--ema", dest="ema", action="store_true", default=True,
                   help="the EMA weights when the checkpoint has them (default)")
    w.add_argument("--raw", dest="ema", action="store_false", help="the raw training weights")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="weights in the export (default: %(default)s)")
    p.add_argument("--from", dest="source", default="dlmtrain", choices=("dlmtrain", "mdlm"),
                   help="the source's codebase (default: %(default)s); mdlm: kuleshov-group/mdlm's Lightning .ckpt "
                   "or the mdlm-owt Hugging Face layout")
    p.add_argument("--data", metavar="MANIFEST", help="the data whose tokenizer goes into the export (default: the "
                   "checkpoint's); for --from mdlm also recorded as the model's data")
    p.add_argument("--tokenizer", metavar="PATH", help="--from mdlm: their tokenizer (a tokenizer.json or a "
                   "directory holding one, e.g. GPT-2's for mdlm-owt)")
    p.add_argument("--force", action="store_true", help="replace an existing DST (an export directory or a file)")


def run_convert(args) -> int:
    from dlmtrain.checkpoint.export import (
        check_destination, export_checkpoint, export_to_lightning, is_export_dir, refuse_sharded,
    )

    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise ConfigError(f"{src} does not exist")
    refuse_sharded(src)
    if args.to == "fp32":
        raise ConfigError("--to fp32 consolidates sharded (DeepSpeed/FSDP) checkpoints, which is not supported yet; "
                          "use --to safetensors or --to lightning")
    if src.resolve() == dst.resolve():
        raise ConfigError(f"SRC and DST are the same path ({src}); choose another DST")
    if args.to == "lightning" and dst.is_dir():
        raise ConfigError(f"{dst} is a directory; --to lightning writes a .ckpt file")
    check_destination(dst, args.force)
    if args.source == "mdlm":
        from dlmtrain.checkpoint.mdlm import convert_mdlm

        convert_mdlm(src, dst, args.to, ema=args.ema, dtype=args.dtype, force=args.force, tokenizer=args.tokenizer,
                     data=args.data)
        return 0
    if args.tokenizer:
        raise ConfigError("--tokenizer is for --from mdlm; a dlmtrain checkpoint's tokenizer comes from its data "
                          "(or --data MANIFEST)")
    if src.is_dir():
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
    export_checkpoint(src, dst, ema=args.ema, dtype=args.dtype, force=args.force, data=args.data)
    return 0
