"""AdamW step time: foreach (the default) vs fused (optim.fused=true), side by side in one process.

    python benchmarks/fused_adamw.py [--size tiny] [--vocab 50258] [--steps 20] [--threads 2]

The optimizer that ``configure_optimizers`` builds for a model of that size with random
gradients; the two kernels alternate step by step so that other load on the machine hits both
alike; the best and the median step time of each are printed. The parameters of the two
copies must stay equal to float rounding (printed: the largest difference).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dlmtrain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--vocab", type=int, default=50258)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    import torch

    from dlmtrain import build_module, load_config

    torch.set_num_threads(a.threads)
    mods, opts = {}, {}
    for kind in ("foreach", "fused"):
        torch.manual_seed(0)
        cfg = load_config(None, [f"model={a.size}", f"model.vocab_size={a.vocab}", "optim.ema=0",
                                 f"optim.fused={str(kind == 'fused').lower()}", "optim.weight_decay=0.1"])
        mods[kind] = build_module(cfg)
        opts[kind] = mods[kind].configure_optimizers()["optimizer"]
    n = sum(p.numel() for p in mods["fused"].parameters())
    g = torch.Generator().manual_seed(1)
    for pf, pr in zip(mods["foreach"].parameters(), mods["fused"].parameters()):
        pf.grad = torch.randn(pf.shape, generator=g)
        pr.grad = pf.grad.clone()
    times = {"foreach": [], "fused": []}
    for step in range(a.steps + 1):
        for kind in ("foreach", "fused") if step % 2 else ("fused", "foreach"):
            t0 = time.perf_counter()
            opts[kind].step()
            if step:  # step 0 (state allocation) is warm-up
                times[kind].append(time.perf_counter() - t0)
    diff = max((x - y).abs().max().item() for x, y in zip(mods["foreach"].parameters(), mods["fused"].parameters()))
    print(f"AdamW step, model {a.size}, vocab {a.vocab}, {n / 1e6:.1f}M parameters, CPU threads {a.threads}, "
          f"torch {torch.__version__}, {a.steps} timed steps each (alternating)")
    for kind, ts in times.items():
        print(f"{kind:<8} best {min(ts) * 1e3:8.1f} ms   median {statistics.median(ts) * 1e3:8.1f} ms")
    print(f"fused / foreach (median): {statistics.median(times['fused']) / statistics.median(times['foreach']):.2f}; "
          f"max |param difference| {diff:.2e}")


if __name__ == "__main__":
    main()
