"""ELBO evaluation at every validation: val/* metrics, and where in t the bound is spent.

The module's ``validation_step`` returns the NELBO draws of each batch (EMA weights, fixed
seeds); this callback counts each sequence's bytes with the data's tokenizer, sums
everything (dlmtrain/eval/elbo.py: formulas and standard errors), all-reduces once and logs

  val/nelbo (nats/token), val/nelbo_se, val/nelbo_se_mc, val/ppl_bound, val/ppl_bound_se,
  val/bpt, val/bpt_se, val/bpt_se_mc, val/bpb, val/bpb_se, val/bpb_se_mc,
  val/tokens, val/sequences, val/bytes, val/nelbo_T<T> (+ _se, _se_mc) with eval.discrete_steps

(a standard error that is undefined is not logged: *_se_mc needs eval.nelbo_samples >= 2).
The t-binned picture goes to RUN/eval/nelbo_by_t-step<N>.png and .json (rank 0) and, with
a WandbLogger, to W&B as a line plot (val/nelbo_by_t) whose table (val/nelbo_by_t_table) has
columns t_mid, integrand, contribution; not for an objective without diffusion time
(``has_time = False``, e.g. ar). A validation cut short by a stop
(``abort_validation``) logs and writes nothing; a complete one sets ``_last_val_step``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L

from dlmtrain.errors import ConfigError
from dlmtrain.eval.bytes import ByteCounter
from dlmtrain.eval.elbo import ELBOAccumulator, scalars


class ELBOEval(L.Callback):
    def __init__(self, tokenizer=None, out_dir: str | Path | None = None):
        """``tokenizer``: for bits per byte (default: the DataModule's ``tokenizer``, if any);
        ``out_dir``: where the PNG/JSON go (None: no files)."""
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.counter: ByteCounter | None = None
        self.acc: ELBOAccumulator | None = None
        self.last: dict | None = None  # the last complete validation's summary
        self._warned = False

    def setup(self, trainer, pl_module, stage):
        tok = self.tokenizer
        if tok is None and trainer.datamodule is not None:
            tok = getattr(trainer.datamodule, "tokenizer", None)
        self.counter = ByteCounter(tok) if tok is not None else None
        steps = pl_module.cfg.eval.discrete_steps
        if steps > 0 and not pl_module.discrete_bound:
            raise ConfigError(f"eval.discrete_steps={steps}: objective {pl_module.cfg.objective.name} has no "
                              "discrete-time bound; set eval.discrete_steps=0")

    def on_validation_epoch_start(self, trainer, pl_module):
        e = pl_module.cfg.eval
        self.acc = ELBOAccumulator(e.t_bins, e.discrete_steps, device=pl_module.device)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if outputs is not None and self.acc is not None:
            self.acc.add(outputs, batch["input_ids"], self.counter)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.acc is None or trainer.sanity_checking:
            return
        sums = trainer.strategy.reduce(self.acc.sums, reduce_op="sum")  # every rank, even if aborting
        result = self.acc.summary(sums)
        self.acc = None
        if result["tokens"] <= 0 or pl_module.abort_validation:
            return
        pl_module._last_val_step = trainer.global_step
        self.last = result
        pl_module.log_dict({f"val/{k}": float(v) for k, v in scalars(result).items()},
                           sync_dist=False, rank_zero_only=False)
        if trainer.is_global_zero and getattr(pl_module, "has_time", True):  # ar: no time, no picture
            self._write(trainer, result)

    # ---- the t-binned picture ----------------------------------------------------------
    def _write(self, trainer, result: dict) -> None:
        step = trainer.global_step
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            stem = self.out_dir / f"nelbo_by_t-step{step}"
            _write_atomic(stem.with_suffix(".json"), json.dumps(_no_nan({"step": step, **result}), indent=1))
            try:
                save_plot(result, stem.with_suffix(".png"), step)
            except ImportError:
                if not self._warned:
                    print("[dlmtrain] WARNING: matplotlib is not installed: no nelbo_by_t PNG (pip install matplotlib)")
                    self._warned = True
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                import wandb

                b = result["t_bins"]
                table = wandb.Table(columns=["t_mid", "integrand", "contribution"],
                                    data=[list(row) for row in zip(b["t_mid"], b["integrand"], b["contribution"])])
                plot = wandb.plot.line(table, "t_mid", "contribution",
                                       title="NELBO contribution by t (nats/token per bin)")
                # the chart stores its table (all three columns) as val/nelbo_by_t_table
                lg.log_metrics({"val/nelbo_by_t": plot}, step=step)


def _no_nan(x):
    """JSON has no NaN: an empty t-bin's integrand becomes null."""
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return None if isinstance(x, float) and x != x else x


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_plot(result: dict, path: Path, step: int) -> None:
    """Bars: each t-bin's contribution (nats/token; they add up to the NELBO); line: the
    per-token integrand averaged over the bin. Agg canvas, no pyplot (no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    b = result["t_bins"]
    width = b["t_hi"][0] - b["t_lo"][0]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    ax.bar(b["t_mid"], b["contribution"], width=0.9 * width, color="#4c72b0", label="contribution (nats/token)")
    ax.set_xlabel("t (diffusion time; 1 = all masked)")
    ax.set_ylabel("contribution to NELBO (nats/token)")
    ax.set_xlim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(b["t_mid"], b["integrand"], color="#dd8452", marker="o", ms=3, label="integrand (nats/token)")
    ax2.set_ylabel("integrand (nats/token per unit t)")
    se = f" ± {result['nelbo_se']:.4f}" if "nelbo_se" in result else ""
    ax.set_title(f"step {step}: NELBO {result['nelbo']:.4f}{se} nats/token")
    fig.tight_layout()
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
