"""MDLM training loss forward + backward: full logits (objective.masked_head=false) vs the head and
chunked cross-entropy at masked positions only (masked_head=true), side by side in one run.

    python benchmarks/masked_head.py [--seq-len 128] [--batch 8] [--steps 5] [--threads 2]
    [--vocab 50258] [--chunk 4096] [--out results.json]

Each path runs in its own child process (this script with --child), so its peak resident memory (ru_maxrss, the
whole process: model, optimizer-free step, allocator caching) is its own. Same seed, same
weights, same batches and masks in both; the losses printed must agree. CPU by default.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import resource
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dlmtrain, not an installed one


def run(masked_head: bool, a: dict) -> dict:
    import torch

    from dlmtrain import build_module, load_config

    torch.set_num_threads(a["threads"])
    cfg = load_config(None, ["model=tiny", f"model.vocab_size={a['vocab']}", "objective.time_conditioning=true",
                             f"objective.masked_head={str(masked_head).lower()}", f"objective.ce_chunk_size={a['chunk']}"])
    torch.manual_seed(0)
    module = build_module(cfg)
    with torch.no_grad():
        module.backbone.head.weight.normal_(0, 0.02)  # untied zero init would make the logits trivial
    x = torch.randint(0, a["vocab"], (a["batch"], a["seq_len"]), generator=torch.Generator().manual_seed(1))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    losses, times = [], []
    for step in range(a["steps"] + 1):  # step 0 is warm-up, not timed
        module.zero_grad(set_to_none=True)
        module._gen = None
        t0 = time.perf_counter()
        loss = module.loss({"input_ids": x})
        loss.backward()
        dt = time.perf_counter() - t0
        if step:
            times.append(dt)
        losses.append(loss.item())
    return {"masked_head": masked_head, "tokens_per_s": a["batch"] * a["seq_len"] * len(times) / sum(times),
           "s_per_step": sum(times) / len(times), "loss": losses[-1],
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_step_mib": rss0 / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=50258)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--out")
    p.add_argument("--child", choices=["full", "masked"], help=argparse.SUPPRESS)
    a = vars(p.parse_args())
    if a.pop("child") is not None:
        print(json.dumps(run(sys.argv[sys.argv.index("--child") + 1] == "masked", a)))
        return
    args = [a for a in sys.argv[1:]]
    rows = [json.loads(subprocess.run([sys.executable, __file__, *args, "--child", path], check=True,
                                      capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for path in ("full", "masked")]
    import torch

    print(f"MDLM tiny, vocab {a['vocab']}, batch {a['batch']} x seq {a['seq_len']}, {a['steps']} timed steps, "
          f"CPU threads {a['threads']}, torch {torch.__version__}")
    print(f"{'path':<28}{'tokens/s':>10}{'s/step':>9}{'peak RSS MiB':>14}{'RSS before MiB':>16}{'loss':>10}")
    for r in rows:
        name = "masked head + chunked CE" if r["masked_head"] else "full logits"
        print(f"{name:<28}{r['tokens_per_s']:>10.0f}{r['s_per_step']:>9.3f}{r['peak_rss_mib']:>14.0f}"
              f"{r['rss_before_step_mib']:>16.0f}{r['loss']:>10.4f}")
    print(f"speed-up {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x")
    if a["out"]:
        with open(a["out"], "w") as f:
            json.dump({"args": a, "rows": rows, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
