"""`dlmtrain eval` / `dlmtrain sample` on a checkpoint of a tiny `dlmtrain train` run, and the
sample-quality callback (evaluation LM, W&B table) inside training."""

from __future__ import annotations

import json

import pytest
import torch

from dlmtrain import load_config
from dlmtrain.cli import main
from dlmtrain.errors import ConfigError
from dlmtrain.train import train



@pytest.fixture(scope="module")
def run(make_corpus, tmp_path_factory):
    manifest = make_corpus(["alpha", "beta", "gamma", "delta", "diffusion", "model"], 24, 50, 3, "--val-fraction", "0.15")
    root = tmp_path_factory.mktemp("evalcmd")
    train(load_config("configs/demo.yaml", [
        f"data.manifest={manifest}", f"run.dir={root / 'run'}", "data.num_workers=0", "trainer.max_steps=6",
        "trainer.global_batch_size=8", "trainer.val_every_n_steps=6", "trainer.limit_val_batches=2",
        "trainer.val_before_training=false", "eval.sample_every_n_steps=0"]))
    return root / "run" / "checkpoints" / "last.ckpt", manifest


def test_eval_prints_table_and_writes_json(run, tmp_path, capsys):
    ckpt, manifest = run
    out = tmp_path / "eval.json"
    assert main(["eval", str(ckpt), "--samples", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "NELBO (nats/token)" in text and "bits/byte" in text and "±" in text
    res = json.loads(out.read_text())
    for key in ("nelbo", "nelbo_stderr", "ppl_bound", "bpt", "bpb", "bpb_stderr", "tokens", "sequences", "step", "seed"):
        assert key in res, key
    assert res["step"] == 6 and res["weights"] == "ema" and res["samples"] == 3
    assert res["bpt"] * res["tokens"] == pytest.approx(res["bpb"] * res["bytes"], rel=1e-9)
    assert res["ppl_bound"] == pytest.approx(torch.tensor(res["nelbo"]).exp().item(), rel=1e-6)
    # the same seed gives the same numbers
    assert main(["eval", str(ckpt), "--samples", "3", "--out", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["nelbo"] == res["nelbo"]


def test_sample_with_prompt_writes_jsonl(run, tmp_path, capsys):
    ckpt, _ = run
    out = tmp_path / "s.jsonl"
    assert main(["sample", str(ckpt), "--num", "3", "--steps", "16", "--prompt", "alpha beta", "--seed", "5",
                 "--out", str(out), "sampling.temperature=0.9"]) == 0
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert r["text"].startswith("alpha beta") and len(r["tokens"]) == 64
        assert r["sampler"] == "ancestral" and r["steps"] == 16 and 1 <= r["nfe"] <= 16 and r["seconds"] > 0
        assert r["tokens"][:10] == list(b"alpha beta")
    assert "--- sample 2" in capsys.readouterr().out
    assert main(["sample", str(ckpt), "--num", "1", "--sampler", "first_hitting", "--seq-len", "32",
                 "--out", str(tmp_path / "fh.jsonl")]) == 0
    fh = json.loads((tmp_path / "fh.jsonl").read_text())
    assert fh["nfe"] == 32 and len(fh["tokens"]) == 32


@pytest.mark.parametrize("argv,needle", [
    (["eval", "{tmp}/nope.ckpt"], "does not exist"),
    (["eval", "{tmp}"], "is a directory"),
    (["sample", "{tmp}/notes.txt"], "not a readable checkpoint"),
    (["sample", "{ckpt}", "--sampler", "nucleus"], "choose one of"),
    (["sample", "{ckpt}", "--prompt", "x" * 80], "not shorter than the sequence length 64"),
    (["sample", "{ckpt}", "optim.lr=1"], "sampling.* overrides"),
])
def test_command_mistakes_are_one_line_exit_2(run, tmp_path, capsys, argv, needle):
    (tmp_path / "notes.txt").write_text("hi")
    args = [a.format(tmp=tmp_path, ckpt=run[0]) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A tiny GPT-2 over the byte tokenizer's alphabet, saved as a local HF directory."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    d = tmp_path_factory.mktemp("lm")
    vocab = {chr(i): i for i in range(32, 127)}
    vocab["<eos>"] = 0
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<eos>", max_input_chars_per_word=1))
    from tokenizers import pre_tokenizers

    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(d / "tokenizer.json"))
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), eos_token="<eos>",
                                         pad_token="<eos>").save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=127, n_embd=32, n_layer=1, n_head=2, n_positions=128,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(d))
    return d


def test_sample_quality_callback_logs_gen_ppl_beside_entropy_and_wandb_table(run, lm_dir, tmp_path, monkeypatch):
    import wandb

    _, manifest = run
    wandb.finish()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    try:
        res = train(load_config("configs/demo.yaml", [
            f"data.manifest={manifest}", f"run.dir={tmp_path}", "data.num_workers=0", "trainer.max_steps=4",
            "trainer.global_batch_size=8", "trainer.val_every_n_steps=4", "trainer.limit_val_batches=1",
            "trainer.val_before_training=false", "eval.sample_every_n_steps=2", "eval.num_samples=4",
            f"eval.eval_lm={lm_dir}", "sampling.steps=8", "logger.wandb.enabled=true", "trainer.log_every_n_steps=1"]))
    finally:
        wandb.finish()
    assert res["step"] == 4
    for step in (2, 4):
        rows = [json.loads(ln) for ln in (tmp_path / "samples" / f"step{step}.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(len(r["tokens"]) == 64 for r in rows)
    import csv

    with open(tmp_path / "logs" / "metrics.csv") as f:
        got = [r for r in csv.DictReader(f) if r.get("samples/gen_ppl")]
    assert len(got) == 2
    for r in got:
        assert float(r["samples/gen_ppl"]) > 1 and 0 < float(r["samples/entropy"]) <= torch.log(torch.tensor(64.0))
        assert r["samples/distinct_4"] and r["samples/nfe"] and r["samples/tokens_per_s"]
    logs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert logs
    from wandb_files import wait_for_bytes  # wandb may still be appending after finish()

    assert b"samples/table" in wait_for_bytes(logs[0].read_bytes, (b"samples/table",))


def test_missing_eval_lm_fails_before_anything_is_written(run, tmp_path):
    _, manifest = run
    with pytest.raises(ConfigError, match="eval.eval_lm="):
        train(load_config("configs/demo.yaml", [
            f"data.manifest={manifest}", f"run.dir={tmp_path / 'r'}", "eval.sample_every_n_steps=2",
            f"eval.eval_lm={tmp_path / 'no-such-lm'}"]))
    assert not (tmp_path / "r").exists()
