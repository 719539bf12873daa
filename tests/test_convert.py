"""`dlmtrain convert`: .ckpt -> export directory -> .ckpt round trips, load_pretrained, eval/sample on an
export, and bad inputs (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dlmtrain
from dlmtrain import load_config
from dlmtrain.checkpoint import load_checkpoint
from dlmtrain.cli import main
from dlmtrain.train import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny MDLM trained 6 steps (EMA != raw weights) on BPE-tokenized data (so exports carry a tokenizer.json)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("convert")
    (root / "text").mkdir()
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "diffusion", "model", "token", "noise"]
    for i in range(24):
        idx = torch.randint(0, len(words), (50,), generator=g).tolist()
        (root / "text" / f"d{i}.txt").write_text(" ".join(words[j] for j in idx) + "\n")
    r = subprocess.run([sys.executable, "-m", "data_prep", str(root / "text"), "--out", str(root / "data"),
                        "--train-tokenizer", "--vocab-size", "300", "--seq-len", "32", "--val-fraction", "0.2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    manifest = root / "data" / "manifest.json"
    train(load_config("configs/demo.yaml", [
        f"data.manifest={manifest}", f"run.dir={root / 'run'}", "data.num_workers=0", "trainer.max_steps=6",
        "trainer.global_batch_size=8", "trainer.val_every_n_steps=6", "trainer.limit_val_batches=1",
        "trainer.val_before_training=false", "eval.sample_every_n_steps=0", "optim.lr=3e-3", "optim.warmup_steps=0",
        "model.hidden_size=64", "model.cond_dim=32", "objective.time_conditioning=true"]))
    return root / "run" / "checkpoints" / "last.ckpt", manifest


def _batch(vocab: int):
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, vocab, (4, 32), generator=g)


def _nelbo(module, ids, seed=5, k=4):
    with torch.no_grad():
        return module.nelbo(ids, num_samples=k, generator=torch.Generator().manual_seed(seed))


def test_export_round_trip_nelbo_identical(run, tmp_path):
    ckpt, _ = run
    exp, back = tmp_path / "exp", tmp_path / "back.ckpt"
    assert main(["convert", str(ckpt), str(exp), "--to", "safetensors"]) == 0
    assert sorted(p.name for p in exp.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    meta = json.loads((exp / "config.json").read_text())["dlmtrain_export"]
    assert meta["weights"] == "ema" and meta["dtype"] == "fp32" and meta["step"] == 6 and meta["seq_len"] == 32
    orig = load_checkpoint(ckpt)  # EMA weights
    ids = _batch(orig.cfg.model.vocab_size)
    ref = _nelbo(orig, ids)
    pre = dlmtrain.load_pretrained(exp)
    assert not pre.training and pre.weights == "ema" and pre.tokenizer.decode(pre.tokenizer.encode("beta gamma")) == "beta gamma"
    assert torch.equal(_nelbo(pre, ids), ref)
    # export -> Lightning checkpoint -> the same bound again
    assert main(["convert", str(exp), str(back), "--to", "lightning"]) == 0
    again = load_checkpoint(back)
    assert again.global_step_loaded == 0 and torch.equal(_nelbo(again, ids), ref)
    # --raw exports the training weights, which differ from the EMA after 6 steps
    raw_exp = tmp_path / "raw"
    assert main(["convert", str(ckpt), str(raw_exp), "--to", "safetensors", "--raw"]) == 0
    raw_ref = _nelbo(load_checkpoint(ckpt, ema=False), ids)
    assert torch.equal(_nelbo(dlmtrain.load_pretrained(raw_exp), ids), raw_ref)
    assert (raw_ref - ref).abs().max() > 1e-3


def test_bf16_export_is_close(run, tmp_path):
    from safetensors import safe_open

    ckpt, _ = run
    exp = tmp_path / "bf16"
    assert main(["convert", str(ckpt), str(exp), "--to", "safetensors", "--dtype", "bf16"]) == 0
    with safe_open(str(exp / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    orig = load_checkpoint(ckpt)
    ids = _batch(orig.cfg.model.vocab_size)
    ref, got = _nelbo(orig, ids), _nelbo(dlmtrain.load_pretrained(exp), ids)
    print(f"bf16 export: max relative NELBO difference {((got - ref).abs() / ref).max().item():.2e}")
    # bf16 keeps 8 mantissa bits (relative rounding <= 2^-9 per weight); measured 4.8e-5 relative here
    assert not torch.equal(got, ref) and torch.allclose(got, ref, rtol=1e-3, atol=0)


def test_eval_and_sample_accept_an_export_dir(run, tmp_path, capsys):
    ckpt, _ = run
    exp = tmp_path / "exp"
    assert main(["convert", str(ckpt), str(exp), "--to", "safetensors"]) == 0
    for src, name in ((ckpt, "a"), (exp, "b")):
        assert main(["eval", str(src), "--samples", "2", "--max-batches", "1", "--out", str(tmp_path / f"{name}.json")]) == 0
        assert main(["sample", str(src), "--num", "2", "--steps", "8", "--seed", "3",
                     "--out", str(tmp_path / f"{name}.jsonl")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["nelbo"] == b["nelbo"] and a["bpb"] == b["bpb"] and b["step"] == 6 and b["weights"] == "ema"
    sa, sb = ((tmp_path / f"{n}.jsonl").read_text().splitlines() for n in "ab")
    assert [json.loads(x)["tokens"] for x in sa] == [json.loads(x)["tokens"] for x in sb]
    assert [json.loads(x)["text"] for x in sa] == [json.loads(x)["text"] for x in sb]


def test_converted_checkpoint_continues_training(run, tmp_path):
    ckpt, manifest = run
    exp, init = tmp_path / "exp", tmp_path / "init.ckpt"
    assert main(["convert", str(ckpt), str(exp), "--to", "safetensors"]) == 0
    assert main(["convert", str(exp), str(init), "--to", "lightning"]) == 0
    res = train(load_config("configs/demo.yaml", [
        f"data.manifest={manifest}", f"run.dir={tmp_path / 'ft'}", f"run.resume={init}", "data.num_workers=0",
        "trainer.max_steps=2", "trainer.global_batch_size=8", "trainer.limit_val_batches=1", "optim.lr=3e-3",
        "eval.sample_every_n_steps=0", "model.hidden_size=64", "model.cond_dim=32", "objective.time_conditioning=true"]))
    assert res["step"] == 2 and (tmp_path / "ft" / "checkpoints" / "last.ckpt").is_file()
    tuned = load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.ckpt", ema=False).state_dict()
    start = load_checkpoint(init, ema=False).state_dict()
    moved = max((tuned[k] - start[k]).abs().max().item() for k in start)
    assert 0 < moved < 0.1  # fine-tuned from the converted weights (lr 3e-3, 2 steps), not from scratch


def _write_deepspeed_like(d):
    (d / "checkpoint").mkdir(parents=True)
    (d / "latest").write_text("checkpoint\n")
    (d / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    return d


@pytest.mark.parametrize("case,needle", [
    ("text", "not a readable checkpoint"),
    ("foreign", "was not written by dlmtrain"),
    ("exists", "already exists"),
    ("sharded", "sharded checkpoint without dlmtrain.json: incomplete"),
    ("fp32_of_a_ckpt", "already is a single-file checkpoint (a single-file checkpoint, step 6)"),
    ("fp32_of_text", "not a readable checkpoint"),
    ("fp32_bf16", "--to fp32 writes float32; --dtype bf16 applies to --to safetensors"),
    ("fp32_raw", "--to fp32 keeps both the training weights and the EMA"),
    ("fp32_plain_dir", "a directory without dlmtrain.json"),
    ("ckpt_to_lightning", "--to lightning converts an export directory"),
    ("dlmtrain_as_mdlm", "is a dlmtrain checkpoint, not an MDLM one"),
    ("plain_dir", "not written by dlmtrain convert"),
    ("mismatch", "the weights do not match the model its config describes"),
])
def test_bad_inputs_are_one_line_exit_2_nothing_written(run, tmp_path, capsys, case, needle):
    ckpt, _ = run
    src, dst, extra = ckpt, tmp_path / "out", ["--to", "safetensors"]
    if case == "text":
        src = tmp_path / "notes.ckpt"
        src.write_text("not a checkpoint")
    elif case == "foreign":  # a Lightning checkpoint of another codebase's model
        src = tmp_path / "other.ckpt"
        torch.save({"state_dict": {"net.weight": torch.zeros(2, 2)}, "global_step": 3}, src)
    elif case == "exists":
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    elif case == "sharded":
        src = _write_deepspeed_like(tmp_path / "ds")
    elif case.startswith("fp32"):
        extra = ["--to", "fp32", *{"fp32_bf16": ["--dtype", "bf16"], "fp32_raw": ["--raw"]}.get(case, [])]
        dst = tmp_path / "out.ckpt"
        if case == "fp32_of_text":
            src = tmp_path / "notes.ckpt"
            src.write_text("not a checkpoint")
        elif case == "fp32_plain_dir":
            src = tmp_path / "plain"
            src.mkdir()
    elif case == "ckpt_to_lightning":
        extra = ["--to", "lightning"]
        dst = tmp_path / "out.ckpt"
    elif case == "dlmtrain_as_mdlm":
        extra += ["--from", "mdlm"]
    elif case == "plain_dir":
        src = tmp_path / "plain"
        src.mkdir()
        (src / "config.json").write_text("{}")
        (src / "model.safetensors").write_bytes(b"")
    elif case == "mismatch":  # a dlmtrain checkpoint whose weights are of another architecture
        ck = torch.load(ckpt, map_location="cpu", weights_only=False)
        ck["state_dict"]["backbone.embed.weight"] = torch.zeros(7, 3)
        src = tmp_path / "mismatch.ckpt"
        torch.save(ck, src)
    before = sorted(os.listdir(tmp_path))
    assert main(["convert", str(src), str(dst), *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temporaries left
    if case == "exists":
        assert os.listdir(dst) == ["keep.txt"]


def test_force_replaces_an_export_only(run, tmp_path, capsys):
    ckpt, _ = run
    exp = tmp_path / "exp"
    assert main(["convert", str(ckpt), str(exp), "--to", "safetensors", "--raw"]) == 0
    assert main(["convert", str(ckpt), str(exp), "--to", "safetensors", "--force"]) == 0
    assert json.loads((exp / "config.json").read_text())["dlmtrain_export"]["weights"] == "ema"
    assert sorted(os.listdir(tmp_path)) == ["exp"]
    mine = tmp_path / "mine"
    mine.mkdir()
    assert main(["convert", str(ckpt), str(mine), "--to", "safetensors", "--force"]) == 2
    assert "not a dlmtrain export" in capsys.readouterr().err and os.listdir(mine) == []


def test_tied_head_is_stored_once_and_restored(run, tmp_path):
    from safetensors import safe_open

    from dlmtrain.checkpoint.export import cast_state, write_export

    ckpt, manifest = run
    cfg = load_config("configs/demo.yaml", [f"data.manifest={manifest}", "model.tie_weights=true", "model.vocab_size=300"])
    module = dlmtrain.build_module(cfg).eval()
    write_export(tmp_path / "tied", cast_state(module.state_dict(), "bf16"), dict(__import__("omegaconf").OmegaConf.to_container(cfg)),
                 {"weights": "raw", "dtype": "fp32", "step": 0, "seq_len": 32})
    with safe_open(str(tmp_path / "tied" / "model.safetensors"), "pt") as f:
        assert "backbone.head.weight" not in f.keys() and "backbone.embed.weight" in f.keys()
    back = dlmtrain.load_pretrained(tmp_path / "tied")
    assert back.backbone.head.weight.data_ptr() == back.backbone.embed.weight.data_ptr()
    ids = _batch(300)
    assert torch.allclose(_nelbo(back, ids), _nelbo(module, ids), rtol=1e-3, atol=0)  # bf16, stored once


def test_resume_from_a_checkpoint_older_than_the_new_model_options(run):
    """Checkpoints written before model.norm_eps & co. existed resume: absent keys compare as their defaults."""
    import yaml

    from dlmtrain.checkpoint.files import CheckpointInfo
    from dlmtrain.config import config_from_resolved
    from dlmtrain.train import check_resume_config

    ckpt, _ = run
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    old = yaml.safe_load(ck["dlmtrain_config"])
    for key in ("norm_eps", "mlp_width", "mlp_bias", "head_bias", "time_freq_dim", "adaln_always"):
        del old["model"][key]
    cfg = config_from_resolved(ck["dlmtrain_config"])
    check_resume_config(cfg, CheckpointInfo(ckpt, 6, yaml.safe_dump(old)), say=lambda *a, **k: None)
    old["model"]["norm_eps"] = 1e-5  # a real change is still refused
    with pytest.raises(dlmtrain.errors.ConfigError, match="model.norm_eps"):
        check_resume_config(cfg, CheckpointInfo(ckpt, 6, yaml.safe_dump(old)), say=lambda *a, **k: None)
