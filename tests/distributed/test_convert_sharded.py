"""`dlmtrain convert SHARDED DST --to fp32 | --to safetensors` on the sharded checkpoints of
tests/distributed/steps_worker.py (2 CPU processes, gloo: ZeRO-2, ZeRO-3 with every parameter
partitioned, FSDP2; 3 steps of Adam at lr 1e-2; shared with test_equivalence.py) against the
1-process run on the same global batches ("one", a single-file checkpoint).

The fp32 file: the NELBO of a fixed batch and seed is identical to the sharded checkpoint's (as
load_checkpoint consolidates it); it holds exactly the keys of the 1-process checkpoint, the
same loops and LR schedule, and AdamW moments within float32 reduction-order differences of it;
resumed on one process it trains the next steps as the 1-process checkpoint does, and with the
optimizer state left out it does not. Bad inputs: one line, exit 2, nothing written.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dlmtrain.checkpoint import load_checkpoint
from dlmtrain.checkpoint.files import inspect
from dlmtrain.cli import main
from dlmtrain.distributed.checkpoint import read_whole

pytestmark = pytest.mark.distributed
SHARDED = ["deepspeed_zero2", "deepspeed_zero3", "fsdp"]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import steps_worker  # noqa: E402
from chain_oracles import one_thread  # noqa: E402,F401  (autouse: one thread for tiny tensors)


@pytest.fixture(scope="module")
def converted(steps_run, tmp_path_factory):
    """strategy -> (its sharded final.ckpt, the --to fp32 file, the printout)."""
    out, root = {}, tmp_path_factory.mktemp("fp32")
    for s in SHARDED:
        src, dst = steps_run(s) / "final.ckpt", root / f"{s}.ckpt"
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["convert", str(src), str(dst), "--to", "fp32"]) == 0
        out[s] = (src, dst, buf.getvalue())
    return out


def _nelbo(module) -> torch.Tensor:
    ids = torch.randint(0, 256, (4, steps_worker.SEQ), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        return module.nelbo(ids, num_samples=4, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("strategy", SHARDED)
def test_fp32_checkpoint_is_the_sharded_one_as_one_process_would_hold_it(converted, steps_run, strategy):
    src, dst, said = converted[strategy]
    assert "AdamW state consolidated" in said and "LEFT OUT" not in said
    for ema in (True, False):  # the bound of a fixed batch and seed: identical
        assert torch.equal(_nelbo(load_checkpoint(dst, ema=ema)), _nelbo(load_checkpoint(src, ema=ema)))
    assert not torch.equal(_nelbo(load_checkpoint(dst)), _nelbo(load_checkpoint(dst, ema=False)))

    info = inspect(dst)
    assert info.strategy == "file" and info.step == 3
    ck = torch.load(dst, map_location="cpu", weights_only=False)
    whole = read_whole(src)
    assert all(v.dtype == torch.float32 and torch.equal(v, whole["state_dict"][k]) for k, v in ck["state_dict"].items())
    assert all(torch.equal(v, whole["ema"]["shadow"][n]) for n, v in ck["ema"]["shadow"].items())
    assert ck["ema"]["num_updates"] == 3 and set(ck["ema"]["shadow"]) == set(whole["ema"]["shadow"])

    ref = torch.load(steps_run("one") / "final.ckpt", map_location="cpu", weights_only=False)
    assert set(ck) == set(ref)  # no DeepSpeed bookkeeping, nothing missing
    # Lightning places optimizer steps by these counters: rescaled to one process's accumulation (2)
    assert ck["loops"] == ref["loops"] and ck["lr_schedulers"] == ref["lr_schedulers"]
    assert ck["global_step"] == ref["global_step"] == 3 and ck["epoch"] == ref["epoch"]
    opt, ref_opt = ck["optimizer_states"][0], ref["optimizer_states"][0]
    assert opt["param_groups"] == ref_opt["param_groups"]  # same indices, lr, betas, weight decay
    assert sorted(opt["state"]) == sorted(ref_opt["state"]) == list(range(15))
    for i, st in ref_opt["state"].items():
        assert float(opt["state"][i]["step"]) == float(st["step"]) == 3.0
        for k in ("exp_avg", "exp_avg_sq"):
            # float32 reduction order of 2 vs 1 process only: measured <= 8.2e-6 of the tensor's largest entry
            err = (opt["state"][i][k] - st[k]).abs().max() / st[k].abs().max()
            assert opt["state"][i][k].shape == st[k].shape and err < 5e-5, (i, k, float(err))


def test_resuming_the_fp32_checkpoint_continues_like_the_one_process_run(converted, steps_run, tmp_path, monkeypatch,
                                                                         capsys):
    """2 more steps on one process: the same losses from the fp32 files as from the 1-process
    checkpoint; from a file whose optimizer state was left out, different ones."""
    def resume(name: str, ckpt: Path) -> dict:
        (tmp_path / name).mkdir()
        res = steps_worker.fit(tmp_path / name, 1, [], resume=str(ckpt), steps=5)
        assert res["step"] == 5 and len(res["loss"]) == 2, res
        return res

    ref = resume("ref", steps_run("one") / "final.ckpt")["loss"]
    for s in SHARDED:
        # the states after 3 steps differ by float32 reduction order (<= 1.1e-5 in the weights)
        assert resume(s, converted[s][1])["loss"] == pytest.approx(ref, rel=1e-5, abs=0), s

    import dlmtrain.distributed.checkpoint as dc

    def unknown_layout(*a, **k):
        raise dc.NotConsolidated("a layout this test pretends not to know")

    monkeypatch.setattr(dc, "_deepspeed_adam", unknown_layout)
    fresh = tmp_path / "fresh.ckpt"
    assert main(["convert", str(converted["deepspeed_zero2"][0]), str(fresh), "--to", "fp32"]) == 0
    assert "AdamW state LEFT OUT (a layout this test pretends not to know)" in capsys.readouterr().out
    opt = torch.load(fresh, map_location="cpu", weights_only=False)["optimizer_states"][0]
    assert opt["state"] == {} and [g["lr"] for g in opt["param_groups"]] == [pytest.approx(1e-2, rel=1e-4)] * 2
    loss = resume("fresh", fresh)["loss"]
    # step 4's loss is of the saved weights; step 5's follows an Adam step from zero moments: another one
    assert loss[0] == pytest.approx(ref[0], rel=1e-5) and loss[1] != pytest.approx(ref[1], rel=1e-3)


def test_dlmtrain_train_resumes_the_fp32_checkpoint_of_a_sharded_run_on_one_process(make_corpus, tmp_path, capsys):
    """`dlmtrain train` on 2 processes (FSDP2, micro-batch 2: accumulation 2) to step 3, --to fp32,
    then `dlmtrain train run.resume=FP32` on one process (accumulation 4) to step 5: it starts at
    step 3, and each resumed step takes the 4 micro-batches (8 samples) of a whole global batch."""
    import json
    import subprocess

    from dlmtrain import load_config
    from dlmtrain.train import train

    corpus = make_corpus(["alpha", "beta", "gamma", "delta"], 16, 60, 0, "--val-fraction", "0.2")
    opts = [f"data.manifest={corpus}", "data.num_workers=0", "trainer.global_batch_size=8",
            "trainer.micro_batch_size=2", "trainer.val_every_n_steps=100", "trainer.ckpt_every_n_steps=100",
            "trainer.val_before_training=false", "trainer.progress_bar=false", "eval.sample_every_n_steps=0"]
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "tests/distributed/train_worker.py"), "0", "configs/demo.yaml",
                        f"run.dir={tmp_path / 'a'}", "trainer.max_steps=3", "trainer.devices=2", "strategy=fsdp",
                        *opts], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout.split("RESULT ")[-1])["step"] == 3, r.stderr[-3000:]
    sharded, fp32 = tmp_path / "a/checkpoints/last.ckpt", tmp_path / "step3.ckpt"
    assert main(["convert", str(sharded), str(fp32), "--to", "fp32"]) == 0
    assert "micro-batch counters x2 (gradient accumulation 2 on 2 ranks -> 4 on 1)" in capsys.readouterr().out
    ck = torch.load(fp32, map_location="cpu", weights_only=False)
    assert ck["ShardDataModule"] == read_whole(sharded)["ShardDataModule"]  # the data position, as saved

    result = train(load_config("configs/demo.yaml", [f"run.dir={tmp_path / 'b'}", f"run.resume={fp32}",
                                                     "trainer.max_steps=5", *opts]))
    assert result["step"] == 5
    assert f"resuming from {fp32} (step 3)" in capsys.readouterr().out
    last = torch.load(tmp_path / "b/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    # 2 steps of the global batch 8 on 1 process (the 2 ranks' positions restart on another world size)
    assert last["ShardDataModule"]["samples_consumed"] == [16]


def test_safetensors_export_of_a_sharded_directory(converted, make_corpus, tmp_path):
    from dlmtrain.checkpoint.export import load_pretrained

    corpus = make_corpus(["alpha", "beta"], 4, 30, 0, "--val-fraction", "0.5")
    src = converted["deepspeed_zero3"][0]
    assert main(["convert", str(src), str(tmp_path / "exp"), "--to", "safetensors", "--data", str(corpus)]) == 0
    exported = load_pretrained(tmp_path / "exp")
    assert exported.weights == "ema" and exported.global_step_loaded == 3
    assert torch.equal(_nelbo(exported), _nelbo(load_checkpoint(src)))


def _rewrite_config(d: Path, old: str, new: str) -> None:
    """Another architecture in a copied ZeRO-2 directory's config (the manifest's sizes kept true)."""
    import json

    f = d / "checkpoint" / "mp_rank_00_model_states.pt"
    ck = torch.load(f, map_location="cpu", weights_only=False)
    assert old in ck["dlmtrain_config"]
    ck["dlmtrain_config"] = ck["dlmtrain_config"].replace(old, new)
    torch.save(ck, f)
    man = json.loads((d / "dlmtrain.json").read_text())
    man["files"]["checkpoint/mp_rank_00_model_states.pt"] = f.stat().st_size
    (d / "dlmtrain.json").write_text(json.dumps(man))


@pytest.mark.parametrize("case,needle", [
    ("missing_shard", "is incomplete: checkpoint/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"),
    ("no_manifest", "sharded checkpoint without dlmtrain.json: incomplete"),
    ("exists", "already exists; choose another destination or pass --force"),
    ("other_architecture", "the weights do not match the model its config describes"),
    ("to_lightning", "--to fp32 makes it one .ckpt"),
    ("dst_is_dir", "is a directory; --to fp32 writes one .ckpt file"),
])
def test_bad_sharded_inputs_are_one_line_exit_2_nothing_written(converted, tmp_path, capsys, case, needle):
    work = tmp_path / "work"
    src, dst, extra = work / "last.ckpt", work / "out.ckpt", ["--to", "fp32"]
    shutil.copytree(converted["deepspeed_zero2"][0], src)
    if case == "missing_shard":
        (src / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    elif case == "no_manifest":
        (src / "dlmtrain.json").unlink()
    elif case == "exists":
        dst.write_text("mine")
    elif case == "other_architecture":
        _rewrite_config(src, "hidden_size: 128", "hidden_size: 64")
    elif case == "to_lightning":
        extra = ["--to", "lightning"]
    elif case == "dst_is_dir":
        dst.mkdir()
    before = sorted(os.listdir(work))
    assert main(["convert", str(src), str(dst), *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(os.listdir(work)) == before  # nothing written, no temporaries left
    if case == "exists":
        assert dst.read_text() == "mine"
        assert main(["convert", str(src), str(dst), "--to", "fp32", "--force"]) == 0
        assert inspect(dst).step == 3 and sorted(os.listdir(work)) == before


def test_optimizer_files_of_bf16_training_are_read(converted, tmp_path):
    """bf16 training names ZeRO's optimizer files bf16_zero_pp_rank_*: the same state, consolidated."""
    import json

    src = tmp_path / "last.ckpt"
    shutil.copytree(converted["deepspeed_zero2"][0], src)
    man = json.loads((src / "dlmtrain.json").read_text())
    for r in range(2):
        name = f"checkpoint/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        os.rename(src / name, src / name.replace("zero_pp", "bf16_zero_pp"))
        man["files"][name.replace("zero_pp", "bf16_zero_pp")] = man["files"].pop(name)
    (src / "dlmtrain.json").write_text(json.dumps(man))
    ck = read_whole(src, optimizer=True)
    assert "optimizer_left_out" not in ck
    want = torch.load(converted["deepspeed_zero2"][1], map_location="cpu", weights_only=False)["optimizer_states"][0]
    got = ck["optimizer_states"][0]
    assert got["param_groups"] == want["param_groups"]
    assert all(torch.equal(got["state"][i][k], v) for i, st in want["state"].items() for k, v in st.items())
