"""`dlmtrain bench sample`: sampling throughput and network evaluations (NFE) per sampler.

Times ``dlmtrain.sampling.sample`` for each sampler and step count on a model of a named
size with random weights (or a trained checkpoint), e.g.::

    dlmtrain bench sample --size tiny --vocab-size 2048 --seq-len 128 --num-samples 16 --steps 128 1024
    dlmtrain bench sample --objective bd3lm --set objective.block_size=16 --samplers first_hitting first_hitting_nocache
    python -m dlmtrain.bench.sample --checkpoint runs/demo/checkpoints/last.ckpt --json

tokens_per_s counts generated tokens (num_samples x seq_len) over the wall time of the
sampling loops; one untimed warm-up call comes first. ``ancestral`` runs cached and
uncached; ``*_nocache`` variants pass cache=False, which for bd3lm turns off its KV cache of
the clean prefix. Samplers the objective does not support are skipped. Random weights are
fine for speed, except that the cached ancestral NFE depends only on the reveal draws, not
on the model.
"""

from __future__ import annotations

import argparse
import json

import torch

from dlmtrain.bench.model import SIZES, _device, _device_name
from dlmtrain.errors import UserError

# (label, sampler, extra arguments)
VARIANTS = {
    "ancestral": ("ancestral", {"cache": True}),
    "ancestral_nocache": ("ancestral", {"cache": False}),
    "first_hitting": ("first_hitting", {}),
    "first_hitting_nocache": ("first_hitting", {"cache": False}),
    "confidence": ("confidence", {}),
    "confidence_nocache": ("confidence", {"cache": False}),
    "semi_ar": ("semi_ar", {}),
}
DEFAULT = ["ancestral", "ancestral_nocache", "first_hitting", "confidence", "semi_ar"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=SIZES, default="tiny", help="configs/model/<size>.yaml (random weights)")
    parser.add_argument("--checkpoint", default=None, help="a trained .ckpt instead of random weights")
    parser.add_argument("--objective", default="mdlm", help="objective of the random-weight model (mdlm, bd3lm, ...)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides of the random-weight model, e.g. objective.block_size=4")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=16, help="drawn together as one batch")
    parser.add_argument("--steps", type=int, nargs="+", default=[128, 1024], help="one or more step counts")
    parser.add_argument("--samplers", nargs="+", choices=list(VARIANTS), default=DEFAULT)
    parser.add_argument("--block-len", type=int, default=32, help="semi_ar block length")
    parser.add_argument("--inner", default="ancestral", help="semi_ar inner sampler")
    parser.add_argument("--float32-draws", action="store_true", help="the peers' float32 Gumbel draws")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object per line instead of a table")


def _module(args, device):
    import dlmtrain

    if args.checkpoint:
        return dlmtrain.load_checkpoint(args.checkpoint, map_location=str(device))
    cfg = dlmtrain.load_config(None, [f"objective={args.objective}", f"model={args.size}",
                                      f"model.vocab_size={args.vocab_size}", "optim.ema=0", *args.set])
    torch.manual_seed(args.seed)
    return dlmtrain.build_module(cfg).to(device)


def run(args: argparse.Namespace) -> int:
    from dlmtrain.sampling import sample, supported_samplers

    if min(args.steps) < 1 or args.seq_len < 1 or args.num_samples < 1 or args.threads < 0:
        raise UserError("--steps, --seq-len and --num-samples must be >= 1 and --threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    module = _module(args, device)
    common = dict(seed=args.seed, block_len=args.block_len, inner=args.inner, float64=not args.float32_draws)
    names = supported_samplers(module)
    labels = [s for s in args.samplers if VARIANTS[s][0] in names]
    sample(module, args.num_samples, args.seq_len, 2, sampler=VARIANTS[labels[0]][0] if labels else "ancestral",
           **common)  # warm-up at full size: allocator, kernels

    rows = []
    for steps in args.steps:
        for label in labels:
            name, extra = VARIANTS[label]
            res = sample(module, args.num_samples, args.seq_len, steps, sampler=name, **common, **extra)
            rows.append({"sampler": label, "steps": steps, "nfe": res.nfe, "seconds": round(res.seconds, 3),
                         "tokens_per_s": round(res.tokens_per_s, 1),
                         "ms_per_nfe": round(1000 * res.seconds / max(1, res.nfe), 2)})
    head = {"device": _device_name(device), "model": args.checkpoint or args.size,
            "objective": module.cfg.objective.name, **{k: v for k, v in (o.split("=", 1) for o in args.set)},
            "vocab_size": args.vocab_size if not args.checkpoint else None, "seq_len": args.seq_len,
            "num_samples": args.num_samples, "draws": "float32" if args.float32_draws else "float64"}
    if args.json:
        for r in rows:
            print(json.dumps({**head, **r}))
        return 0
    print("  ".join(f"{k}={v}" for k, v in head.items() if v is not None))
    print(f"{'sampler':<18} {'steps':>6} {'nfe':>6} {'seconds':>9} {'tokens/s':>10} {'ms/nfe':>8}")
    for r in rows:
        print(f"{r['sampler']:<18} {r['steps']:>6} {r['nfe']:>6} {r['seconds']:>9.3f} {r['tokens_per_s']:>10,.1f} "
              f"{r['ms_per_nfe']:>8.2f}")
    return 0
