"""The ELBO callback inside `dlmtrain train` (metrics, PNG/JSON, W&B offline) and `evaluate`
without a Trainer giving the same numbers as a Trainer's validation."""

import csv
import json
from types import SimpleNamespace

import lightning as L
import pytest

from dlmtrain import load_config
from dlmtrain.errors import ConfigError
from wandb_files import wait_for_bytes


@pytest.fixture(scope="module")
def manifest(make_corpus):
    words = ["alpha", "beta", "délta", "naïve", "日本", "token", "mask"]  # multi-byte: bytes != characters
    return make_corpus(words, 24, 50, 0, "--val-fraction", "0.15")


def config(manifest, run_dir, *extra):
    return load_config("configs/demo.yaml", [
        f"data.manifest={manifest}", f"run.dir={run_dir}", "data.num_workers=0", "trainer.max_steps=2",
        "trainer.global_batch_size=8", "trainer.val_every_n_steps=2", "trainer.limit_val_batches=2",
        "trainer.progress_bar=false", "eval.nelbo_samples=2", "eval.t_bins=5", "eval.discrete_steps=4", *extra])


@pytest.fixture(scope="module")
def wandb_run(manifest, tmp_path_factory):
    """One tiny run: validation before training (step 0) and at step 2, W&B offline."""
    import wandb

    from dlmtrain.train import train

    wandb.finish()  # a run left open by an earlier test would be reused, in its own directory
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path_factory.mktemp("run")
    try:
        res = train(config(manifest, out, "logger.wandb.enabled=true"))
    finally:
        wandb.finish()  # flush the offline run's log (otherwise written at interpreter exit)
        mp.undo()
    return res, out


def test_train_logs_elbo_metrics_and_writes_png_and_json(wandb_run, capsys):
    res, out = wandb_run
    assert res["step"] == 2
    for key in ("val/nelbo", "val/nelbo_se", "val/nelbo_se_mc", "val/bpb", "val/bpb_se", "val/bpb_se_mc",
                "val/nelbo_T4", "val/nelbo_T4_se", "val/bytes", "val/tokens", "val/sequences"):
        assert key in res, key
    assert 0 < res["val/bytes"] <= res["val/tokens"]  # byte tokens: 1 byte each, a scored EOS 0
    assert res["val/bpb"] * res["val/bytes"] == pytest.approx(res["val/bpt"] * res["val/tokens"], rel=1e-5)
    with open(out / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/bpb")]
    assert len(rows) == 2  # before training and at step 2 (the final validation is that one)
    for step in (0, 2):
        png, js = out / "eval" / f"nelbo_by_t-step{step}.png", out / "eval" / f"nelbo_by_t-step{step}.json"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        d = json.loads(js.read_text())
        assert d["step"] == step and len(d["t_bins"]["contribution"]) == 5
        assert sum(d["t_bins"]["contribution"]) == pytest.approx(d["nelbo"], rel=1e-9)
    d = json.loads((out / "eval" / "nelbo_by_t-step2.json").read_text())
    assert d["nelbo"] == pytest.approx(res["val/nelbo"], rel=1e-6) and d["bpb"] == pytest.approx(res["val/bpb"], rel=1e-6)


def test_wandb_offline_run_holds_the_t_binned_table_and_plot(wandb_run):
    _, out = wandb_run
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = sorted(runs[0].rglob("media/table/val/nelbo_by_t_table_*.table.json"))
    assert len(tables) == 2  # steps 0 and 2
    t = json.loads(tables[0].read_text())
    assert t["columns"] == ["t_mid", "integrand", "contribution"] and len(t["data"]) == 5
    # wandb's service process may still be appending after finish() returns on a loaded machine
    log = wait_for_bytes(lambda: next(runs[0].glob("*.wandb")).read_bytes(), (b"val/nelbo_by_t", b"wandb/line/v0"))
    assert b"val/nelbo_by_t" in log and b"wandb/line/v0" in log  # the line plot's chart spec


def test_evaluate_without_trainer_equals_trainer_validate(manifest, tmp_path):
    from dlmtrain.data import build_datamodule
    from dlmtrain.eval import evaluate
    from dlmtrain.modules import build_module
    from dlmtrain.train import fill_from_data

    cfg = config(manifest, tmp_path, "eval.discrete_steps=0")
    dm = build_datamodule(cfg, 8)
    fill_from_data(cfg, dm)
    module = build_module(cfg)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=3)
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]  # the module's default ELBO callback
    res = evaluate(module, dm, max_batches=3)
    for k in ("nelbo", "nelbo_se", "nelbo_se_mc", "bpb", "bpb_se", "tokens", "bytes"):
        assert res[k] == pytest.approx(val[f"val/{k}"], rel=1e-6), k
    assert not (tmp_path / "eval").exists()  # the default callback writes no files


def test_discrete_steps_need_an_objective_with_a_discrete_bound():
    from dlmtrain.callbacks.elbo import ELBOEval

    module = SimpleNamespace(cfg=load_config(None, ["eval.discrete_steps=8"]), discrete_bound=False)
    with pytest.raises(ConfigError, match="eval.discrete_steps=8") as e:
        ELBOEval().setup(SimpleNamespace(datamodule=None), module, "fit")
    assert "\n" not in str(e.value)
