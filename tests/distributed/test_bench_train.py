"""`dlmtrain bench train`: the real training step timed after a warm-up; figures that follow
from each other exactly, MFU only against a peak (n/a on CPU unless given), nothing left behind."""

from __future__ import annotations

import json

import pytest

from dlmtrain import load_config
from dlmtrain.backbone import flops_per_token
from dlmtrain.cli import main


@pytest.fixture(scope="module")
def corpus(make_corpus):
    return make_corpus(["alpha", "beta", "gamma", "delta"], 20, 60, 0, "--val-fraction", "0.1")


def test_bench_train_reports_consistent_figures(corpus, tmp_path, capsys):
    run_dir = tmp_path / "scratch"
    args = ["bench", "train", "configs/demo.yaml", f"data.manifest={corpus}", "data.num_workers=0",
            "trainer.global_batch_size=4", "--steps", "3", "--warmup", "1", "--json", "--out", str(tmp_path / "b.json")]
    assert main(args + ["--peak-tflops", "0.5", "--run-dir", str(run_dir)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res == json.loads((tmp_path / "b.json").read_text())
    assert res["timed_steps"] == 3 and res["world_size"] == 1 and res["seq_len"] == 64
    assert res["tokens_per_s"] == pytest.approx(4 * 64 / res["step_time_s_mean"], rel=1e-12)
    cfg = load_config("configs/demo.yaml", [f"data.manifest={corpus}"])
    fpt = flops_per_token(cfg.model, 64, 260)  # tiny: 6 * N_matmul + 12 * 2 * 128 * 64
    assert res["flops_per_token"] == fpt == 6 * (2 * (4 * 128 * 128 + 3 * 128 * 384) + 128 * 260) + 12 * 2 * 128 * 64
    assert res["mfu"] == pytest.approx(fpt * res["tokens_per_s"] / 0.5e12, rel=1e-12)
    assert res["peak_memory_bytes"] is None and res["peak_rss_bytes"] > 10**7

    assert (run_dir / "checkpoints/last.ckpt").is_file()  # the run given (a scratch one is removed)


def test_mfu_peak_only_for_bf16_on_a_known_gpu():
    from dlmtrain.bench.train import _peak_tflops

    assert _peak_tflops("NVIDIA H100 80GB HBM3", "bf16-mixed", None) == 989.0
    assert _peak_tflops("NVIDIA H100 80GB HBM3", "32-true", None) is None
    assert _peak_tflops("cpu (2 threads per process)", "bf16-mixed", None) is None  # CPU: MFU n/a
    assert _peak_tflops("cpu (2 threads per process)", "32-true", 1.5) == 1.5
