"""`dlmtrain train` end to end on a small prepared corpus: loss falls, files land,
an interrupted run resumes to exactly the state of an uninterrupted one."""

import csv
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from dlmtrain import load_config
from dlmtrain.train import train


@pytest.fixture(scope="module")
def manifest(make_corpus):
    words = ["alpha", "beta", "gamma", "delta", "diffusion", "model", "token", "mask"]
    return make_corpus(words, 40, 60, 0, "--val-fraction", "0.1")


def config(manifest, run_dir, *extra):
    return load_config(
        "configs/demo.yaml",
        [f"data.manifest={manifest}", f"run.dir={run_dir}", "data.num_workers=0", "trainer.max_steps=40",
         "trainer.global_batch_size=16", "trainer.val_every_n_steps=20", "trainer.limit_val_batches=4",
         "trainer.ckpt_every_n_steps=10", "trainer.progress_bar=false", "optim.warmup_steps=5", *extra],
    )


def read_metrics(run_dir):
    rows = []
    for f in sorted(Path(run_dir, "logs").rglob("metrics.csv")):
        with open(f) as fh:
            rows += list(csv.DictReader(fh))
    return rows


def test_train_loss_falls_and_nelbo_improves(manifest, tmp_path):
    res = train(config(manifest, tmp_path, "trainer.log_every_n_steps=1"))
    assert res["step"] == 40
    assert res["val/nelbo"] < 0.8 * res["val_nelbo_before"]
    assert res["val/bpt"] == pytest.approx(res["val/nelbo"] / 0.6931471805599453)
    losses = [float(r["train/loss"]) for r in read_metrics(tmp_path) if r.get("train/loss")]
    assert len(losses) == 40 and sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert list((tmp_path / "checkpoints").glob("best-step*.ckpt"))
    saved = load_config(tmp_path / "config.yaml")
    assert saved.model.vocab_size >= 256 and saved.model.eos_id >= 0  # filled in from the byte tokenizer


class SigintAt(L.Callback):
    """Sends this process SIGINT after optimizer step ``at``, as a user's Ctrl-C would."""

    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def state(path):
    ck = torch.load(path, map_location="cpu", weights_only=False)
    return ck


@pytest.mark.parametrize("objective", ["mdlm", "sedd", "sedd_uniform", "d3pm", "d3pm_uniform", "udlm", "ar", "llada",
                                       "bd3lm", "gaussian"])
def test_interrupt_then_resume_equals_uninterrupted(manifest, tmp_path, objective):
    """Every objective: SIGINT during step 5, resume to 12 == an uninterrupted 12-step run
    (weights, EMA, Adam state, LR schedule)."""
    opts = [f"objective={objective}", "trainer.max_steps=12", "trainer.val_every_n_steps=100",
            "eval.sample_every_n_steps=0", "trainer.val_before_training=false"]
    straight = train(config(manifest, tmp_path / "a", *opts))
    assert straight["step"] == 12

    first = train(config(manifest, tmp_path / "b", *opts), extra_callbacks=[SigintAt(4)])
    assert first["stopped_early"] and first["step"] == 5  # the step in flight completes
    ck = state(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert ck["global_step"] == 5
    second = train(config(manifest, tmp_path / "b", *opts))
    assert second["step"] == 12

    a, b = state(tmp_path / "a/checkpoints/last.ckpt"), state(tmp_path / "b/checkpoints/last.ckpt")
    for k, v in a["state_dict"].items():
        assert torch.allclose(v, b["state_dict"][k], atol=1e-6, rtol=0), k
    for k, v in a["ema"]["shadow"].items():
        assert torch.allclose(v, b["ema"]["shadow"][k], atol=1e-6, rtol=0), k
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        assert torch.allclose(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"], atol=1e-9, rtol=1e-5)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 12


def test_cli_demo_runs_end_to_end(manifest, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "dlmtrain.cli", "train", "configs/demo.yaml", f"data.manifest={manifest}",
         f"run.dir={tmp_path}", "trainer.max_steps=6", "trainer.val_every_n_steps=3", "trainer.limit_val_batches=2",
         "trainer.global_batch_size=8", "trainer.progress_bar=false", "data.num_workers=0"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "before training: val/nelbo" in r.stdout and "step 6: val/nelbo" in r.stdout
    # running again resumes at step 6 and has nothing left to do
    r2 = subprocess.run(
        [sys.executable, "-m", "dlmtrain.cli", "train", "configs/demo.yaml", f"data.manifest={manifest}",
         f"run.dir={tmp_path}", "trainer.max_steps=6", "trainer.progress_bar=false", "data.num_workers=0",
         "trainer.global_batch_size=8"],
        capture_output=True, text=True,
    )
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "resuming from" in r2.stdout


def test_nonfinite_gradients_stop_with_a_finite_checkpoint(manifest, tmp_path):
    from dlmtrain.callbacks.guards import NonFiniteLossError

    class PoisonGrad(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 3:
                next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="step 4"):
        train(config(manifest, tmp_path, "trainer.max_steps=10"), extra_callbacks=[PoisonGrad()])
    ck = state(tmp_path / "checkpoints" / "nonfinite-step3.ckpt")
    assert ck["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())


def test_wandb_offline_without_api_key(manifest, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key
    res = train(config(manifest, tmp_path / "run", "trainer.max_steps=2", "trainer.val_every_n_steps=2",
                       "logger.wandb.enabled=true", "trainer.limit_val_batches=1"))
    assert res["step"] == 2
    cap = capsys.readouterr()
    assert "logging offline" in cap.out
    assert "anonymous" not in cap.err and "\x1b[" not in cap.err + cap.out  # wandb kept quiet
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_validation_is_deterministic_for_fixed_weights(manifest, tmp_path):
    from dlmtrain.data import build_datamodule
    from dlmtrain.modules import build_module
    from dlmtrain.train import fill_from_data

    cfg = config(manifest, tmp_path)
    dm = build_datamodule(cfg, 8)
    fill_from_data(cfg, dm)
    module = build_module(cfg)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=3)
    a = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/nelbo"]
    b = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/nelbo"]
    assert a == b


def _cli_metrics(run_dir):
    rows = read_metrics(run_dir)
    last = {}
    for r in rows:
        last.update({k: float(v) for k, v in r.items() if v not in ("", None)})
    return last


def test_ddp_two_processes_match_single_process(manifest, tmp_path):
    """2 CPU ranks (gloo) vs 1: same global batch and tokens consumed, every validation
    token scored exactly once, and the same exactly known bound at initialisation: the
    zero-initialised head predicts uniformly over the 259 non-[MASK] ids, so the NELBO
    is log(259) nats per token in expectation."""
    common = [sys.executable, "-m", "dlmtrain.cli", "train", "configs/demo.yaml", f"data.manifest={manifest}",
              "trainer.max_steps=4", "trainer.val_every_n_steps=4", "trainer.global_batch_size=8",
              "trainer.progress_bar=false", "data.num_workers=0", "eval.nelbo_samples=64",
              "trainer.log_every_n_steps=1"]
    one = subprocess.run(common + [f"run.dir={tmp_path / 'one'}"], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(common + [f"run.dir={tmp_path / 'two'}", "trainer.devices=2", "trainer.strategy=ddp"],
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "global batch 8 = 4 x 2 CPU device(s)" in two.stdout
    for r in (one, two):
        before = float(r.stdout.split("before training: val/nelbo ")[1].split()[0])
        # 17 validation sequences x 64 draws: relative standard error ~0.75%, so 3% is 4 SE
        assert before == pytest.approx(math.log(259), rel=0.03)
    m1, m2 = _cli_metrics(tmp_path / "one"), _cli_metrics(tmp_path / "two")
    assert m1["train/tokens"] == m2["train/tokens"] == 4 * 8 * 64
    assert m1["val/tokens"] == m2["val/tokens"] > 0


class SamplesPerStep(L.Callback):
    """Rows of input each optimizer step was computed from."""

    def __init__(self):
        self.rows, self.steps, self._acc = [], [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._acc += int(batch["input_ids"].shape[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rows.append(self._acc)
        self.steps.append(trainer.global_step)
        self._acc = 0


def test_resume_with_another_gradient_accumulation_keeps_whole_global_batches(manifest, tmp_path, capsys):
    """Saved with accumulation 1 (micro-batch 16) after 3 steps, resumed with accumulation 2 (micro-batch
    8): Lightning counts micro-batches, so without rescaling its counters (3 is odd) the first resumed
    optimizer step would use one micro-batch, half a global batch."""
    train(config(manifest, tmp_path, "trainer.max_steps=3", "trainer.micro_batch_size=16",
                 "trainer.val_every_n_steps=100", "trainer.val_before_training=false"))
    rec = SamplesPerStep()
    res = train(config(manifest, tmp_path, "trainer.max_steps=6", "trainer.micro_batch_size=8",
                       "trainer.val_every_n_steps=100", "trainer.val_before_training=false"), extra_callbacks=[rec])
    assert res["step"] == 6 and rec.steps == [3, 4, 5] and rec.rows == [16, 16, 16]
    assert "gradient accumulation 1 -> 2 on resume" in capsys.readouterr().out
