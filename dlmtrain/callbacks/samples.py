"""Sample quality while training: every ``eval.sample_every_n_steps`` optimizer steps and at
the end of training, ``eval.num_samples`` samples drawn per ``sampling.*`` (EMA weights).

Logged (W&B and CSV) under ``samples/``: entropy, distinct_1..4, rep_1..4 (see
dlmtrain/eval/quality.py), gen_ppl when ``eval.eval_lm`` names a local causal LM or an ar
checkpoint (never shown without the entropy beside it), nfe and tokens_per_s of the sampler.
The decoded texts go to a W&B table (step, sampler, steps, nfe, text) and to
``RUN/samples/step<N>.jsonl``. Runs on global rank 0 only; the others wait. Under a
strategy that shards parameters (ZeRO-3, FSDP2) every forward needs every rank, so all
ranks draw the same samples (same seed) and rank 0 alone writes and logs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from dlmtrain.eval.quality import diversity, load_eval_lm


class SampleQuality(L.Callback):
    def __init__(self, cfg, out_dir: str | Path, tokenizer=None, seq_len: int = 0):
        self.cfg = cfg
        self.every = int(cfg.eval.sample_every_n_steps)
        self.out_dir = Path(out_dir) / "samples"
        self.tokenizer = tokenizer
        self.seq_len = int(cfg.eval.sample_seq_len or seq_len)
        # A missing evaluation LM is a one-line error now, not after hours of training.
        self.lm = load_eval_lm(cfg.eval.eval_lm) if cfg.eval.eval_lm else None
        self._done_step = -1
        self.last_stats: dict = {}  # the latest samples/* figures (train() returns them)

    def check(self, module) -> None:
        """The configured sampler exists for this objective (a one-line error otherwise)."""
        from dlmtrain.errors import ConfigError
        from dlmtrain.sampling import supported_samplers

        names = supported_samplers(module)
        for key in ("sampler", "inner"):
            name = getattr(self.cfg.sampling, key)
            if (key == "sampler" or self.cfg.sampling.sampler == "semi_ar") and name not in names:
                raise ConfigError(f"sampling.{key}={name!r} is not supported by {type(module).__name__}; "
                                  f"choose one of: {', '.join(names)}")

    def setup(self, trainer, pl_module, stage):
        self.check(pl_module)
        if self.lm is not None:
            self.lm.to(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step and step % self.every == 0 and step != self._done_step and step < trainer.max_steps:
            self.run(trainer, pl_module)  # the last step's samples come from on_train_end, printed

    def on_train_end(self, trainer, pl_module):
        if self.every and trainer.global_step != self._done_step:
            self.run(trainer, pl_module, show=3)

    def run(self, trainer, pl_module, show: int = 0) -> dict | None:
        """Draw, score and log one set of samples (rank 0); print the first ``show`` of them."""
        from dlmtrain.sampling import sample_from_config

        self._done_step = step = trainer.global_step
        collective = getattr(getattr(trainer, "strategy", None), "shards_parameters", False)
        if not trainer.is_global_zero and not collective:
            return None
        sp = self.cfg.sampling
        res = sample_from_config(pl_module, sp, num_samples=int(self.cfg.eval.num_samples), seq_len=self.seq_len,
                                 seed=int(self.cfg.trainer.seed) + step, tokenizer=self.tokenizer)
        if not trainer.is_global_zero:
            return None
        ids = res.ids.tolist()
        texts = res.text or [" ".join(map(str, s)) for s in ids]
        stats = {f"samples/{k}": v for k, v in diversity(ids).items()}
        stats["samples/nfe"] = float(res.nfe)
        stats["samples/tokens_per_s"] = float(res.tokens_per_s)
        if self.lm is not None:
            stats["samples/gen_ppl"] = self.lm.perplexity(texts)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"step{step}.jsonl", "w") as f:
            for s, t in zip(ids, texts):
                f.write(json.dumps({"step": step, "sampler": sp.sampler, "steps": sp.steps, "nfe": res.nfe,
                                    "text": t, "tokens": s}) + "\n")
        line = (f"[dlmtrain] samples at step {step} ({sp.sampler}, {sp.steps} steps, NFE {res.nfe}, "
                f"{res.tokens_per_s:,.0f} tokens/s): entropy {stats['samples/entropy']:.2f} nats, "
                f"distinct-4 {stats['samples/distinct_4']:.3f}")
        if "samples/gen_ppl" in stats:
            line += f", gen ppl {stats['samples/gen_ppl']:.1f}"
        print(line, flush=True)
        for i, t in enumerate(texts[:show]):
            short = t if len(t) <= 400 else t[:400] + " ..."
            print(f"--- sample {i} ---\n{short}", flush=True)
        self.last_stats = stats
        for lg in trainer.loggers:
            lg.log_metrics(stats, step=step)
            if "WandbLogger" in {c.__name__ for c in type(lg).__mro__}:  # without importing wandb
                lg.log_text(key="samples/table", columns=["step", "sampler", "steps", "nfe", "text"],
                            data=[[step, sp.sampler, sp.steps, res.nfe, t] for t in texts], step=step)
        return stats
