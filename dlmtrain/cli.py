"""`dlmtrain train|eval|sample|sweep|convert|bench`: the one entry point.

User mistakes (dlmtrain.errors.UserError) end with one line on stderr and their
exit code (2 for bad input); everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from dlmtrain.errors import UserError


def _train(args) -> int:
    import shlex

    from dlmtrain.config import load_config
    from dlmtrain.train import train

    cfg = load_config(args.config, args.overrides)
    command = shlex.join(["dlmtrain", "train", args.config, *[o for o in args.overrides if not o.startswith(("run.resume=", "optim.lr="))]])
    result = train(cfg, command=command)
    return int(result.get("exit_code", 0))


def _bench(args) -> int:
    return args.bench_run(args)


EXAMPLES = """\
examples:
  dlmtrain train configs/demo.yaml                           # a tiny MDLM on the embedded corpus (CPU)
  dlmtrain train configs/demo.yaml model=small trainer=gpu optim.lr=1e-3
  dlmtrain train configs/demo.yaml data.manifest=data/web/manifest.json run.name=web
  dlmtrain sweep configs/sweeps/lr.yaml --dry-run             # list the runs of a sweep; drop --dry-run to run them
  dlmtrain submit --nodes 2 --gpus-per-node 8 --time 24:00:00 configs/demo.yaml trainer=gpu   # a SLURM job
  dlmtrain bench model --size small --seq-len 1024 --batch-size 16
  dlmtrain bench train configs/demo.yaml trainer.devices=2 strategy=fsdp --steps 10

prepare your own data first (text, JSONL, Parquet -> tokenized shards + manifest):
  python -m data_prep corpus/ --out data/web --train-tokenizer --vocab-size 32768 --seq-len 1024

load a trained model in Python:  dlmtrain.load_checkpoint("runs/demo/checkpoints/last.ckpt")
export it (safetensors + config + tokenizer):  dlmtrain convert runs/demo/checkpoints/last.ckpt export/demo --to safetensors
  then  dlmtrain.load_pretrained("export/demo")
"""


def build_parser() -> argparse.ArgumentParser:
    from dlmtrain import __version__
    from dlmtrain.train import EXIT_CODES

    p = argparse.ArgumentParser(prog="dlmtrain", description="Pretrain diffusion language models.", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"dlmtrain {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    tr = sub.add_parser(
        "train",
        help="train from a config",
        description="Train from CONFIG (a YAML under configs/) with key=value overrides, e.g. "
        "`dlmtrain train configs/demo.yaml model=small optim.lr=1e-3`. Re-running resumes from the run's last.ckpt; "
        "the first Ctrl-C (or SIGTERM / SIGUSR1) saves last.ckpt at the end of the step and stops.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tr.add_argument("config", help="YAML config file (path, or relative to configs/)")
    tr.add_argument("overrides", nargs="*", help="group=name or dotted.key=value")
    tr.set_defaults(func=_train)

    from dlmtrain.eval import commands as evalcmd

    ev = sub.add_parser("eval", help="likelihood bound of a checkpoint (NELBO, perplexity bound, bits/token, bits/byte)",
                        description="The NELBO of a checkpoint on a validation split, with Monte Carlo standard errors.")
    evalcmd.add_eval_arguments(ev)
    ev.set_defaults(func=evalcmd.run_eval)
    sa = sub.add_parser("sample", help="draw samples from a checkpoint",
                        description="Draw samples from a checkpoint and print them (EMA weights unless --raw).")
    evalcmd.add_sample_arguments(sa)
    sa.set_defaults(func=evalcmd.run_sample)

    from dlmtrain import sweep as sweepcmd

    sw = sub.add_parser("sweep", help="run a grid / random search over config overrides, or summarize it",
                        description="Expand a sweep file into runs (validated before the first starts) and run them "
                        "one after another; --dry-run lists them, --summary tabulates their final metrics.")
    sweepcmd.add_arguments(sw)
    sw.set_defaults(func=sweepcmd.run_command)

    from dlmtrain.launch import submit as submitcmd

    sb = sub.add_parser("submit", help="submit training as a SLURM job (multi-node, requeued on preemption), or run "
                        "it here with --local", description=submitcmd.__doc__.split("\n\n")[0].strip("` ") + ": "
                        "a SLURM batch job that trains CONFIG, saves last.ckpt before its time limit, requeues itself "
                        "and resumes.", epilog=submitcmd.__doc__.split("\n\n", 1)[1],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    submitcmd.add_arguments(sb)
    sb.set_defaults(func=submitcmd.run_submit)

    from dlmtrain.checkpoint import convert as convcmd

    cv = sub.add_parser("convert", help="checkpoint conversion: sharded -> fp32 .ckpt, .ckpt <-> export directory (safetensors), MDLM import",
                        description="Convert checkpoints: a sharded (DeepSpeed/FSDP2) checkpoint directory to one fp32 "
                        ".ckpt (--to fp32); a dlmtrain .ckpt or sharded directory to an export directory "
                        "(model.safetensors, config.json, tokenizer) and back to a trainable .ckpt; import MDLM "
                        "checkpoints (--from mdlm).",
                        epilog=convcmd.__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    convcmd.add_convert_arguments(cv)
    cv.set_defaults(func=convcmd.run_convert)

    be = sub.add_parser("bench", help="benchmarks (model throughput/MFU, data loader)")
    bsub = be.add_subparsers(dest="bench", required=True)
    from dlmtrain.bench import data as bench_data
    from dlmtrain.bench import model as bench_model
    from dlmtrain.bench import sample as bench_sample
    from dlmtrain.bench import train as bench_train

    for name, mod, text in (("model", bench_model, "forward+backward tokens/s and MFU"), ("data", bench_data, "shard reading tokens/s per worker"),
                            ("sample", bench_sample, "sampler tokens/s and network evaluations"),
                            ("train", bench_train, "steady-state training step of a config: tokens/s, step time, "
                                                   "peak memory, MFU")):
        sp = bsub.add_parser(name, help=text, description=text)
        mod.add_arguments(sp)
        sp.set_defaults(func=_bench, bench_run=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] in (["train"], ["submit"]) and "--dry-run" not in args_in:
        from dlmtrain.stopsignals import hold

        hold()  # a stop signal during the imports below stops the run cleanly instead of killing it
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`dlmtrain sample CKPT --num 4 sampling.top_p=0.9`)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"dlmtrain: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("dlmtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
