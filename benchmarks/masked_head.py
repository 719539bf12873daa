"""MDLM with full logits (objective.masked_head=false) vs the output head only where it is needed
(masked_head=true), side by side in one run, for the training step, the validation NELBO and the
masked samplers.

    python benchmarks/masked_head.py [--what train nelbo sample] [--seq-len 128] [--batch 8] [--steps 5]
    [--threads 2] [--vocab 50258] [--objective mdlm|bd3lm] [--chunk 4096] [--sample-batch 4] [--sample-len 64]
    [--samplers ancestral first_hitting confidence] [--sample-steps 64] [--repeat 3] [--out results.json]

- train: loss forward + backward (head + chunked cross-entropy at masked positions); tokens/s.
- nelbo: ``nelbo_draws`` under inference_mode, one draw per sequence (what validation does per
  eval.nelbo_samples); sequences/s.
- sample: ``dlmtrain.sampling.sample`` (ancestral cached, first_hitting, confidence; the head at the
  positions drawn or ranked only); generated tokens/s and NFE. The tokens must be equal.

Times are the best of the timed calls (train/nelbo: --steps calls; sample: --repeat runs): the
dev machine's 2 cores are shared, and the minimum is the figure least disturbed by other work.
Each (part, path) runs in its own child process (this script with --child), so its peak resident
memory (ru_maxrss of the whole process) is its own. Same seed, weights, batches and masks in both
paths; the losses / NELBOs printed must agree and the samples must be equal. CPU by default.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dlmtrain, not an installed one


def _module(masked_head: bool, a: dict, time_conditioning: bool):
    import torch

    from dlmtrain import build_module, load_config

    cfg = load_config(None, [f"objective={a['objective']}", "model=tiny", f"model.vocab_size={a['vocab']}", "optim.ema=0",
                             f"objective.time_conditioning={str(time_conditioning).lower()}",
                             f"objective.masked_head={str(masked_head).lower()}", f"objective.ce_chunk_size={a['chunk']}"])
    torch.manual_seed(0)
    module = build_module(cfg)
    with torch.no_grad():
        module.backbone.head.weight.normal_(0, 0.02)  # untied zero init would make the logits trivial
    return module


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_train(masked_head: bool, a: dict) -> dict:
    import torch

    module = _module(masked_head, a, True)
    x = torch.randint(0, a["vocab"], (a["batch"], a["seq_len"]), generator=torch.Generator().manual_seed(1))
    rss0 = _rss_mib()
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
    return {"rate": a["batch"] * a["seq_len"] / min(times), "unit": "tokens/s",
            "s_per_call": min(times), "check": f"loss {losses[-1]:.4f}",
            "peak_rss_mib": _rss_mib(), "rss_before_mib": rss0}


def run_nelbo(masked_head: bool, a: dict) -> dict:
    import torch

    module = _module(masked_head, a, True).eval()
    x = torch.randint(0, a["vocab"], (a["batch"], a["seq_len"]), generator=torch.Generator().manual_seed(1))
    rss0 = _rss_mib()
    times, nats = [], None
    with torch.inference_mode():
        for step in range(a["steps"] + 1):
            t0 = time.perf_counter()
            nats, _ = module.nelbo_draws(x, None, 1, torch.Generator().manual_seed(step))
            dt = time.perf_counter() - t0
            if step:
                times.append(dt)
    return {"rate": a["batch"] / min(times), "unit": "sequences/s", "s_per_call": min(times),
            "check": f"nats/token {nats.sum().item() / x.numel():.4f}", "peak_rss_mib": _rss_mib(), "rss_before_mib": rss0}


def run_sample(masked_head: bool, a: dict, sampler: str) -> dict:
    import torch

    from dlmtrain.sampling import sample

    module = _module(masked_head, a, False)
    kw = dict(num_samples=a["sample_batch"], seq_len=a["sample_len"], steps=a["sample_steps"], sampler=sampler)
    sample(module, **{**kw, "num_samples": 1, "steps": 2}, seed=99)  # warm-up
    rss0 = _rss_mib()
    runs = [sample(module, **kw, seed=1) for _ in range(a["repeat"])]
    res = min(runs, key=lambda r: r.seconds)
    assert all(torch.equal(r.ids, res.ids) for r in runs)
    digest = hashlib.sha1(res.ids.numpy().tobytes()).hexdigest()[:10]
    return {"rate": res.tokens_per_s, "unit": "tokens/s", "s_per_call": res.seconds, "nfe": res.nfe,
            "check": f"ids sha1 {digest}", "peak_rss_mib": _rss_mib(), "rss_before_mib": rss0}


def child(part: str, path: str, a: dict) -> dict:
    import torch

    torch.set_num_threads(a["threads"])
    masked = path == "masked"
    if part == "train":
        out = run_train(masked, a)
    elif part == "nelbo":
        out = run_nelbo(masked, a)
    else:
        out = run_sample(masked, a, part.split(":", 1)[1])
    return {"part": part, "masked_head": masked, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", nargs="+", choices=["train", "nelbo", "sample"], default=["train", "nelbo", "sample"])
    p.add_argument("--objective", choices=["mdlm", "bd3lm"], default="mdlm",
                   help="bd3lm: train and nelbo only (its block samplers do not use the masked head)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed train steps / nelbo calls (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=50258)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--sample-batch", type=int, default=4)
    p.add_argument("--sample-len", type=int, default=64)
    p.add_argument("--sample-steps", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="timed sample() runs per sampler and path")
    p.add_argument("--samplers", nargs="+", default=["ancestral", "first_hitting", "confidence"],
                   choices=["ancestral", "first_hitting", "confidence", "semi_ar"])
    p.add_argument("--out")
    p.add_argument("--child", nargs=2, metavar=("PART", "PATH"), help=argparse.SUPPRESS)
    a = vars(p.parse_args())
    c = a.pop("child")
    if a["objective"] == "bd3lm" and "sample" in a["what"]:
        p.error("--objective bd3lm: pass --what train nelbo")
    if c is not None:
        print(json.dumps(child(c[0], c[1], a)))
        return
    parts = [w for w in a["what"] if w != "sample"] + (
        [f"sample:{s}" for s in a["samplers"]] if "sample" in a["what"] else [])
    args = [x for x in sys.argv[1:]]
    rows = []
    for part in parts:
        for path in ("full", "masked"):
            out = subprocess.run([sys.executable, __file__, *args, "--child", part, path], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    import torch

    print(f"{a['objective']} tiny, vocab {a['vocab']}, CPU threads {a['threads']}, torch {torch.__version__}; train/nelbo: batch "
          f"{a['batch']} x seq {a['seq_len']}, {a['steps']} timed calls; sample: {a['sample_batch']} x "
          f"{a['sample_len']}, {a['sample_steps']} steps")
    print(f"{'part':<22}{'path':<13}{'rate':>10} {'unit':<12}{'s/call':>9}{'NFE':>5}{'peak RSS MiB':>14}  check")
    for r in rows:
        print(f"{r['part']:<22}{'masked head' if r['masked_head'] else 'full logits':<13}{r['rate']:>10.1f} "
              f"{r['unit']:<12}{r['s_per_call']:>9.3f}{r.get('nfe', ''):>5}{r['peak_rss_mib']:>14.0f}  {r['check']}")
    for full, masked in zip(rows[::2], rows[1::2]):
        print(f"speed-up {full['part']}: {masked['rate'] / full['rate']:.2f}x"
              + ("" if full["check"] == masked["check"] or full["part"] in ("train", "nelbo")
                 else "  SAMPLES DIFFER"))
    if a["out"]:
        with open(a["out"], "w") as f:
            json.dump({"args": a, "rows": rows, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
