"""Faults and mistakes the way users and clusters hit them: every fault leaves a resumable
run, every mistake a one-line error with exit 2 and nothing written."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from dlmtrain import load_config
from dlmtrain.cli import main
from dlmtrain.errors import ConfigError, DataError
from dlmtrain.train import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(make_corpus):
    """Byte-tokenized text in many small shards (~8 sequences of 64 tokens each)."""
    words = ["alpha", "beta", "gamma", "delta", "diffusion", "model", "token", "mask"]
    return make_corpus(words, 40, 60, 1, "--val-fraction", "0.1", "--shard-size", "16KB")


def cfg_for(manifest, run_dir, *extra):
    return load_config("configs/demo.yaml", [
        f"data.manifest={manifest}", f"run.dir={run_dir}", "data.num_workers=0", "trainer.max_steps=12",
        "trainer.global_batch_size=8", "trainer.val_every_n_steps=100", "trainer.limit_val_batches=2",
        "trainer.ckpt_every_n_steps=100", "trainer.progress_bar=false", "optim.warmup_steps=2",
        "trainer.val_before_training=false", *extra])


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def same_weights(a, b):
    sa, sb = ckpt(a)["state_dict"], ckpt(b)["state_dict"]
    return all(torch.equal(v, sb[k]) for k, v in sa.items())


class SignalAt(L.Callback):
    """Sends this process ``sig`` at a chosen point, as Ctrl-C / kill / Slurm would."""

    def __init__(self, sig=signal.SIGINT, step=None, validation=None):
        self.sig, self.step, self.validation = sig, step, validation  # validation: "fit" or "validate"
        self.sent = False

    def _send(self):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.sig)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.step is not None and trainer.global_step == self.step:
            self._send()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.validation == trainer.state.fn:
            self._send()


# ----------------------------------------------------------------------------- 1. corrupt shard mid-run


def _bad_shard_for(manifest, micro: int, want_odd: bool) -> tuple[Path, int]:
    """A train shard whose first failing micro-batch index j_f (num_workers=0, seed 0) has the
    wanted parity and j_f >= 3; returns (path, j_f)."""
    from dlmtrain.data import build_datamodule
    from dlmtrain.data.stream import TrainStream

    cfg = cfg_for(manifest, "/nonexistent")
    dm = build_datamodule(cfg, micro)
    ts = TrainStream(dm.train_shards, dm.spec, batch_size=micro, seed=0, buffer=1000, rank=0, world=1, num_workers=1)
    before = 0
    for q in range(len(dm.train_shards)):
        ref = dm.train_shards[ts.shard_at(q)]
        jf = before // micro
        if jf >= 3 and jf % 2 == int(want_odd):
            return Path(ref.url), jf
        before += ref.samples
    raise AssertionError("no suitable shard")


@pytest.mark.parametrize("micro,mid_step", [(8, False), (4, True)])
def test_corrupt_shard_mid_run_saves_last_good_step_and_resumes_exactly(corpus, tmp_path, micro, mid_step):
    """Fault 1: a corrupt shard reached mid-run saves last.ckpt (the last completed step, the data
    position before the shard), exits with the one-line error; with the shard restored, resuming
    gives exactly the weights of an uninterrupted run. micro=4 of global 8 puts the fault in the
    middle of an accumulated step, which is rewound to the step boundary."""
    extra = [f"trainer.micro_batch_size={micro}"]
    bad, jf = _bad_shard_for(corpus, micro, want_odd=mid_step)
    straight = train(cfg_for(corpus, tmp_path / "a", *extra))
    assert straight["step"] == 12

    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    try:
        with pytest.raises(DataError) as e:
            train(cfg_for(corpus, tmp_path / "b", *extra))
    finally:
        bad.write_bytes(good)
    msg = str(e.value)
    steps_done = jf // (8 // micro)  # micro-batches 0..jf-1 trained; a partial step is rewound
    assert bad.name in msg and f"last.ckpt holds step {steps_done}" in msg and "\n" not in msg
    saved = ckpt(tmp_path / "b/checkpoints/last.ckpt")
    assert saved["global_step"] == steps_done > 0
    assert saved["callbacks"]["Throughput"]["tokens"] == steps_done * 8 * 64

    resumed = train(cfg_for(corpus, tmp_path / "b", *extra))
    assert resumed["step"] == 12
    assert same_weights(tmp_path / "a/checkpoints/last.ckpt", tmp_path / "b/checkpoints/last.ckpt")


def test_corrupt_shard_cli_error_is_on_its_own_line(corpus, tmp_path):
    bad, jf = _bad_shard_for(corpus, 8, want_odd=False)
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    try:
        r = subprocess.run(
            [sys.executable, "-m", "dlmtrain.cli", "train", "configs/demo.yaml", f"data.manifest={corpus}",
             f"run.dir={tmp_path}", "data.num_workers=1", "trainer.max_steps=50", "trainer.global_batch_size=8",
             "trainer.val_before_training=false", "trainer.ckpt_every_n_steps=100", "trainer.limit_val_batches=2"],
            capture_output=True, text=True, cwd=ROOT)
    finally:
        bad.write_bytes(good)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("dlmtrain: error:")]
    assert len(err) == 1 and bad.name in err[0] and "Traceback" not in r.stderr
    assert ckpt(tmp_path / "checkpoints/last.ckpt")["global_step"] == jf


# ----------------------------------------------------------------------------- 2. signal stop: only last.ckpt


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in (d / "checkpoints").iterdir())


def _val_steps(run_dir: Path) -> list[int]:
    if not (run_dir / "logs" / "metrics.csv").exists():
        return []
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("val/nelbo")]


def test_signal_stops_save_only_last_and_topk_stays_k_over_resumes(corpus, tmp_path):
    """Fault 2: three preempt/resume cycles (SIGUSR1, SIGTERM, SIGINT) with save_top_k=1: each
    stop writes last.ckpt only (no validation, no last-vN, no top-k entry); at the end exactly one
    best-* file and last.ckpt; one metrics.csv with one validation row per validation step."""
    run = lambda *cb: train(cfg_for(corpus, tmp_path, "trainer.max_steps=20", "trainer.val_every_n_steps=5",
                                    "trainer.save_top_k=1", "trainer.print_every_n_steps=1"), extra_callbacks=list(cb))
    for sig, at in ((signal.SIGUSR1, 7), (signal.SIGTERM, 12), (signal.SIGINT, 18)):
        res = run(SignalAt(sig, step=at - 1))  # sent after step at-1 ended: step `at` is in flight
        assert res["stopped_early"] and res["step"] == at and res["exit_code"] == 0
        names = _files(tmp_path)
        assert "last.ckpt" in names and not any(n.startswith("last-v") for n in names), names
        assert len([n for n in names if n.startswith("best-")]) == 1, names
        assert ckpt(tmp_path / "checkpoints/last.ckpt")["global_step"] == at
    assert run()["step"] == 20
    names = _files(tmp_path)
    assert [n for n in names if not n.startswith("best-")] == ["last.ckpt"]
    assert len([n for n in names if n.startswith("best-")]) == 1
    assert _val_steps(tmp_path) == [4, 9, 14, 19]  # Lightning logs a step's metrics at step - 1
    assert not list((tmp_path / "logs").glob("version_*"))


# ----------------------------------------------------------------------------- 3. signal during validation


def test_signal_during_initial_validation_exits_4_without_checkpoint(corpus, tmp_path):
    res = train(cfg_for(corpus, tmp_path, "trainer.val_before_training=true"),
                extra_callbacks=[SignalAt(signal.SIGTERM, validation="validate")])
    assert res["stopped_early"] and not res["resumable"] and res["exit_code"] == 4
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_signal_during_validation_in_fit_saves_and_logs_no_partial_score(corpus, tmp_path):
    res = train(cfg_for(corpus, tmp_path, "trainer.val_every_n_steps=4"),
                extra_callbacks=[SignalAt(signal.SIGUSR1, validation="fit")])
    assert res["stopped_early"] and res["step"] == 4 and res["exit_code"] == 0
    assert ckpt(tmp_path / "checkpoints/last.ckpt")["global_step"] == 4
    assert not list((tmp_path / "checkpoints").glob("best-*"))
    assert _val_steps(tmp_path) == []
    again = train(cfg_for(corpus, tmp_path, "trainer.val_every_n_steps=4", "trainer.log_every_n_steps=1"))
    # the cut-short validation (step 4) is not redone; Lightning logs a step's metrics at step - 1
    assert again["step"] == 12 and _val_steps(tmp_path) == [7, 11]


def test_signal_during_final_validation_keeps_last_and_resume_finishes_it(corpus, tmp_path, capsys):
    res = train(cfg_for(corpus, tmp_path, "trainer.max_steps=6"), extra_callbacks=[SignalAt(validation="validate")])
    assert res["stopped_early"] and res["step"] == 6 and res["exit_code"] == 0
    assert ckpt(tmp_path / "checkpoints/last.ckpt")["global_step"] == 6
    assert "stopped at step 6; run the same command to resume" in capsys.readouterr().out
    again = train(cfg_for(corpus, tmp_path, "trainer.max_steps=6"))
    assert again["step"] == 6 and "val/nelbo" in again


def test_sigterm_to_process_group_with_workers_stops_cleanly(corpus, tmp_path):
    """Slurm signals every process of the step, DataLoader workers included."""
    cmd = [sys.executable, "-m", "dlmtrain.cli", "train", "configs/demo.yaml", f"data.manifest={corpus}",
           f"run.dir={tmp_path}", "data.num_workers=1", "trainer.max_steps=100000", "trainer.global_batch_size=8",
           "trainer.print_every_n_steps=1", "trainer.limit_val_batches=1", "trainer.val_before_training=false"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         start_new_session=True)
    try:
        t0 = time.time()
        for line in p.stdout:
            if line.startswith("[dlmtrain] step 3/"):
                break
            assert time.time() - t0 < 120
        os.killpg(p.pid, signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, err[-2000:]
    assert "run the same command to resume" in out
    step = ckpt(tmp_path / "checkpoints/last.ckpt")["global_step"]
    assert step >= 3 and f"stopped at step {step}" in out


# ----------------------------------------------------------------------------- 4./5. bad last.ckpt, leftovers


def test_truncated_last_ckpt_falls_back_to_newest_readable(corpus, tmp_path, capsys):
    train(cfg_for(corpus, tmp_path, "trainer.max_steps=8", "trainer.val_every_n_steps=4", "trainer.save_top_k=1"))
    best = next((tmp_path / "checkpoints").glob("best-*"))
    last = tmp_path / "checkpoints/last.ckpt"
    os.truncate(last, last.stat().st_size // 3)
    capsys.readouterr()
    res = train(cfg_for(corpus, tmp_path, "trainer.max_steps=10", "trainer.val_every_n_steps=4", "trainer.save_top_k=1"))
    out = capsys.readouterr().out
    assert "last.ckpt is not a readable checkpoint" in out and "Falling back" in out and best.name in out
    assert res["step"] == 10 and ckpt(last)["global_step"] == 10


def test_no_readable_checkpoint_and_bad_resume_paths_are_one_line_errors(corpus, tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConfigError, match="run.resume=never") as e:
        train(cfg_for(corpus, tmp_path))
    assert "\n" not in str(e.value)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    for target in (notes, tmp_path):
        with pytest.raises(ConfigError, match=f"run.resume={target}"):
            train(cfg_for(corpus, tmp_path / "x", f"run.resume={target}"))


def test_stale_temporaries_of_dead_writers_are_removed(corpus, tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = [ck / f"last.ckpt.tmp-{host}-{dead.pid}", ck / f"last.ckpt.tmp-{dead.pid}"]
    live = ck / f"best-step4-nelbo1.0000.ckpt.tmp-{host}-{os.getpid()}"
    for p in (*stale, live):
        p.write_bytes(b"x" * 1000)
    train(cfg_for(corpus, tmp_path, "trainer.max_steps=2"))
    assert not any(p.exists() for p in stale) and live.exists()


# ----------------------------------------------------------------------------- 6. non-finite guard + recovery


def test_nonfinite_guard_checkpoint_is_finite_and_documented_recovery_works(corpus, tmp_path, capsys):
    """lr 1e6 without clipping from step 4 diverges; the guard's checkpoint holds finite weights;
    the advice (same command, lower optim.lr: resumes from last.ckpt, the new lr applies) trains on."""
    from dlmtrain.callbacks.guards import NonFiniteLossError

    base = ["trainer.ckpt_every_n_steps=4", "optim.grad_clip=0", "optim.warmup_steps=0"]
    train(cfg_for(corpus, tmp_path, *base, "trainer.max_steps=4"))
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg_for(corpus, tmp_path, *base, "optim.lr=1e6"))
    msg = str(e.value)
    bad = next((tmp_path / "checkpoints").glob("nonfinite-step*.ckpt"))
    assert bad.name in msg and "resume from last.ckpt" in msg and "optim.lr=100000" in msg and "\n" not in msg
    k = ckpt(bad)
    assert k["global_step"] >= 4 and all(torch.isfinite(v).all() for v in k["state_dict"].values())
    assert ckpt(tmp_path / "checkpoints/last.ckpt")["global_step"] == 4

    capsys.readouterr()
    res = train(cfg_for(corpus, tmp_path, *base, "optim.lr=1e-3"))
    assert "optim.lr: 0.002 -> 0.001" in capsys.readouterr().out  # from last.ckpt (step 4, lr 2e-3)
    final = ckpt(tmp_path / "checkpoints/last.ckpt")
    assert res["step"] == 12 and all(torch.isfinite(v).all() for v in final["state_dict"].values())
    assert final["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 1e-3
    assert final["lr_schedulers"][0]["base_lrs"] == [1e-3, 1e-3]


# ----------------------------------------------------------------------------- 7. changed config on resume


def test_resume_refuses_architecture_change_and_keeps_config(corpus, tmp_path, capsys):
    train(cfg_for(corpus, tmp_path, "trainer.max_steps=2"))
    before = (tmp_path / "config.yaml").read_bytes()
    with pytest.raises(ConfigError) as e:
        train(cfg_for(corpus, tmp_path, "trainer.max_steps=4", "model.hidden_size=64"))
    assert "model.hidden_size: 128 -> 64" in str(e.value) and "run.resume=never" in str(e.value)
    assert (tmp_path / "config.yaml").read_bytes() == before
    capsys.readouterr()
    res = train(cfg_for(corpus, tmp_path, "trainer.max_steps=4", "trainer.log_every_n_steps=1"))
    assert "trainer.max_steps: 2 -> 4" in capsys.readouterr().out and res["step"] == 4


# ----------------------------------------------------------------------------- mistakes: one line, exit 2, nothing written


@pytest.mark.parametrize("override,needle", [
    ("trainer.max_steps=-5", "trainer.max_steps=-5 must be >= 1"),
    ("model.n_heads=0", "model.n_heads=0 must be >= 1"),
    ("trainer.val_every_n_steps=0", "trainer.val_every_n_steps=0 must be >= 1"),
    ("trainer.precision=fp8", "trainer.precision='fp8' is not one of"),
    ("trainer=gpu", "no CUDA device visible; use trainer=cpu"),
    ("run.dir={file}/sub", "is a file, not a directory"),
    ("run.dir={file}", "is a file, not a directory"),
    ("run.dir=/proc/dlmtrain-run", "not writable"),
])
def test_mistakes_are_one_line_exit_2_nothing_written(corpus, tmp_path, capsys, override, needle):
    if override == "trainer=gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    f = tmp_path / "afile"
    f.write_text("x")
    run_dir = tmp_path / "run"
    args = ["train", "configs/demo.yaml", f"data.manifest={corpus}", f"run.dir={run_dir}",
            override.format(file=f)]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not run_dir.exists() and f.read_text() == "x" and sorted(tmp_path.iterdir()) == [f]


# ----------------------------------------------------------------------------- output a person reads


def test_log_output_is_plain_lines_without_noise(corpus, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "dlmtrain.cli", "train", "configs/demo.yaml", f"data.manifest={corpus}",
         f"run.dir={tmp_path}", "trainer.max_steps=10", "trainer.print_every_n_steps=5", "trainer.global_batch_size=8",
         "trainer.val_every_n_steps=5", "trainer.limit_val_batches=1", "data.num_workers=1"],
        capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout + r.stderr
    assert "\r" not in text and "\x1b[" not in text
    for noise in ("GPU available", "TPU available", "litlogger", "LeafSpec", "weights_only", "exists and is not empty",
                  "limit_val_batches"):
        assert noise not in text, noise
    assert "[dlmtrain] step 5/10 | loss" in r.stdout and "ETA" in r.stdout
    assert "[dlmtrain] step 5: val/nelbo" in r.stdout


def test_help_version_and_load_checkpoint(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "data_prep" in out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("dlmtrain 0.")

    import dlmtrain
    from dlmtrain.modules.mdlm import MDLM

    train(cfg_for(corpus, tmp_path, "trainer.max_steps=3"))
    path = tmp_path / "checkpoints/last.ckpt"
    raw = ckpt(path)
    m = dlmtrain.load_checkpoint(path)
    assert m.weights == "ema" and not m.training
    for n, p in m.backbone.named_parameters():
        assert torch.equal(p, raw["ema"]["shadow"][n])
    r = dlmtrain.load_checkpoint(path, ema=False)
    assert torch.equal(r.backbone.embed.weight, raw["state_dict"]["backbone.embed.weight"])
    ids = torch.randint(0, 256, (2, 64))
    assert m.nelbo(ids).shape == (2,)
    lm = MDLM.load_from_checkpoint(path, map_location="cpu")
    assert torch.equal(lm.backbone.embed.weight, raw["state_dict"]["backbone.embed.weight"])
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        dlmtrain.load_checkpoint(tmp_path / "config.yaml")


def test_corrupt_val_shard_during_training_saves_and_exits_2(corpus, tmp_path):
    """A validation inside fit that meets a corrupt val shard (on_corrupt=fail) logs no partial
    score, saves last.ckpt at the step it validates, and ends with the one-line data error."""
    import json

    man = json.loads(Path(corpus).read_text())
    val = Path(corpus).parent / man["splits"]["val"]["shards"][0]["name"]
    good = val.read_bytes()
    val.write_bytes(good[: len(good) // 2])
    try:
        with pytest.raises(DataError) as e:
            train(cfg_for(corpus, tmp_path, "trainer.val_every_n_steps=4", "trainer.limit_val_batches=0"))
    finally:
        val.write_bytes(good)
    assert val.name in str(e.value) and "last.ckpt holds step 4" in str(e.value)
    assert ckpt(tmp_path / "checkpoints/last.ckpt")["global_step"] == 4
    assert _val_steps(tmp_path) == [] and not list((tmp_path / "checkpoints").glob("best-*"))


def test_training_without_a_validation_split(tmp_path, capsys):
    src = tmp_path / "text"
    src.mkdir()
    for i in range(6):
        (src / f"d{i}.txt").write_text("alpha beta gamma delta " * 40)
    r = subprocess.run([sys.executable, "-m", "data_prep", str(src), "--out", str(tmp_path / "d"), "--tokenizer",
                        "bytes", "--seq-len", "64", "--val-fraction", "0"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = train(cfg_for(tmp_path / "d/manifest.json", tmp_path / "run", "trainer.max_steps=3",
                        "trainer.val_before_training=true", "trainer.val_every_n_steps=1"))
    assert res["step"] == 3 and "val/nelbo" not in res
    assert "no validation split: training without validation" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "run/checkpoints").iterdir()] == ["last.ckpt"]


def test_zeroed_bytes_in_a_shard_stop_the_run_by_checksum(corpus, tmp_path):
    """Fault 8: 64 zeroed bytes inside a shard (same size, tar headers intact) used to be trained on;
    now the sha256 check stops the run (on_corrupt=fail) with last.ckpt at the last good step."""
    bad, jf = _bad_shard_for(corpus, 8, want_odd=False)
    good = bad.read_bytes()
    mid = 512 + 128  # inside the first sample's token data, past its tar header
    bad.write_bytes(good[:mid] + b"\0" * 64 + good[mid + 64:])
    try:
        with pytest.raises(DataError) as e:
            train(cfg_for(corpus, tmp_path))
    finally:
        bad.write_bytes(good)
    assert bad.name in str(e.value) and "sha256 mismatch" in str(e.value)
    assert ckpt(tmp_path / "checkpoints/last.ckpt")["global_step"] == jf
