"""Train every objective on the same data, model and step budget; print one table.

    python benchmarks/compare_objectives.py --steps 300 [--corpus] [--out results.json]

Two settings:
- a 3-state Markov source (dlmtrain.data.synthetic.write_markov) whose entropy per token
  is known exactly: the held-out NELBO per token sits beside it (a bound below it is a bug);
- with --corpus, the embedded default corpus (stdlib .py, BPE 2048): val/nelbo and bits per
  byte with standard errors, and the entropy / distinct-4 of samples at a fixed step count.
Runs on CPU in minutes at the defaults; pass dlmtrain overrides after --.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OBJECTIVES = ["mdlm", "sedd", "sedd_uniform", "d3pm", "d3pm_uniform", "udlm", "ar", "bd3lm", "gaussian"]
P = [[0.8, 0.15, 0.05], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]]


def entropy_rate(P) -> float:
    """Exact -log p(x) per token of a stationary chain over L tokens is (H(pi) + (L-1) H_rate) / L."""
    from dlmtrain.data.synthetic import stationary

    P = np.asarray(P)
    pi = stationary(P)
    return float(-(pi[:, None] * P * np.log(P)).sum()), float(-(pi * np.log(pi)).sum())


def precise(run_dir: Path, manifest: str, draws: int = 32) -> dict:
    """The final checkpoint's bound with many noise draws (another seed than validation's), and
    the exact -log p(x) per token of the same validation sequences."""
    import torch

    from dlmtrain import load_checkpoint
    from dlmtrain.data import build_datamodule
    from dlmtrain.data.synthetic import markov_log_prob
    from dlmtrain.eval import evaluate

    module = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    dm = build_datamodule(module.cfg, 64)
    res = evaluate(module, dm, num_samples=draws, seed=12345)
    ids = torch.cat([b["input_ids"][b["attention_mask"][:, 0]] for b in dm.val_dataloader()]).numpy()
    exact = float(-markov_log_prob(ids, P).sum() / ids.size)
    return {"precise/nelbo": res["nelbo"], "precise/nelbo_se_mc": res.get("nelbo_se_mc", 0.0), "exact_nll": exact}


def run(objective: str, manifest: str, run_dir: Path, steps: int, extra: list[str]) -> dict:
    from dlmtrain import load_config
    from dlmtrain.train import train

    data = [f"data.manifest={manifest}"] if manifest else []  # "": the embedded default corpus
    cfg = load_config("configs/demo.yaml", [
        f"objective={objective}", *data, f"run.dir={run_dir}", f"trainer.max_steps={steps}",
        f"trainer.val_every_n_steps={steps}", "trainer.val_before_training=false", "eval.nelbo_samples=4",
        f"eval.sample_every_n_steps={steps}", "eval.num_samples=8", "run.resume=never", *extra])
    t0 = time.time()
    res = train(cfg)
    res["seconds"] = time.time() - t0
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--corpus", action="store_true", help="also train on the embedded default corpus")
    ap.add_argument("--skip-markov", action="store_true", help="only the corpus runs")
    ap.add_argument("--objectives", nargs="*", default=OBJECTIVES)
    ap.add_argument("--out", help="write all results as JSON")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    from dlmtrain.data.synthetic import write_markov

    tmp = Path(tempfile.mkdtemp(prefix="cmp-"))
    L = 32
    man = write_markov(tmp / "markov", P, seq_len=L, train_samples=8192, val_samples=512)
    rate, h0 = entropy_rate(P)
    exact = (h0 + (L - 1) * rate) / L
    rows = []
    for obj in ([] if a.skip_markov else a.objectives):
        r = run(obj, str(man), tmp / f"m-{obj}", a.steps, ["trainer.global_batch_size=32", *a.overrides])
        r.update(precise(tmp / f"m-{obj}", str(man)))
        rows.append({"setting": "markov", "objective": obj, **{k: v for k, v in r.items() if isinstance(v, (int, float))}})
    if a.corpus:
        for obj in a.objectives:
            r = run(obj, "", tmp / f"c-{obj}", a.steps, a.overrides)
            rows.append({"setting": "corpus", "objective": obj, **{k: v for k, v in r.items() if isinstance(v, (int, float))}})
    print(f"Markov source: entropy per token = {exact:.4f} nats (log V = {math.log(3):.4f}); 'nelbo K=32' is the final "
          "checkpoint with 32 noise draws per sequence (se: noise only) beside the exact -log p(x) of the same sequences")
    for r in rows:
        if "exact_nll" in r:
            print(f"  {r['objective']:<14} nelbo K=32 {r['precise/nelbo']:.4f} ± {r['precise/nelbo_se_mc']:.4f}  "
                  f"exact {r['exact_nll']:.4f}  gap {r['precise/nelbo'] - r['exact_nll']:+.4f}")
    print(f"{'setting':<8} {'objective':<14} {'val/nelbo':>10} {'± se':>7} {'bpb':>7} {'± se':>7} "
          f"{'entropy':>8} {'dist-4':>7} {'nfe':>5} {'steps':>6} {'s':>6}")
    for r in rows:
        print(f"{r['setting']:<8} {r['objective']:<14} {r.get('val/nelbo', math.nan):>10.4f} "
              f"{r.get('val/nelbo_se', math.nan):>7.4f} {r.get('val/bpb', math.nan):>7.4f} {r.get('val/bpb_se', math.nan):>7.4f} "
              f"{r.get('samples/entropy', math.nan):>8.3f} {r.get('samples/distinct_4', math.nan):>7.3f} "
              f"{r.get('samples/nfe', math.nan):>5.0f} {int(r.get('step', 0)):>6} {r['seconds']:>6.0f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"exact_nll_per_token": exact, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
