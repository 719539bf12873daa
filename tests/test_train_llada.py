"""LLaDA options end to end: `dlmtrain.train.train` on a prompt/answer dataset (val/nelbo per answer
token), and exact resume with random-length truncation."""

import json
import os
import random
import signal

import lightning as L
import pytest
import torch

from data_prep import PrepOptions, prepare
from dlmtrain import load_config
from dlmtrain.train import train

torch.set_num_threads(1)


def demo(manifest, run_dir, *extra):
    return load_config(
        "configs/demo.yaml",
        [f"data.manifest={manifest}", f"run.dir={run_dir}", "data.num_workers=0", "trainer.global_batch_size=16",
         "trainer.ckpt_every_n_steps=10", "trainer.progress_bar=false", "optim.warmup_steps=5",
         "eval.sample_every_n_steps=0", "eval.num_samples=2", "sampling.steps=8", *extra],
    )


@pytest.fixture(scope="module")
def pairs_manifest(tmp_path_factory):
    """Prompts 'k: WORD?' whose answer is WORD reversed twice: learnable only by reading the prompt."""
    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "mask", "token", "model", "prompt"]
    with open(root / "sft.jsonl", "w") as f:
        for i in range(600):
            w = rng.choice(words) + rng.choice(words)
            f.write(json.dumps({"prompt": f"{i % 10}: {w}?", "answer": f" {w[::-1]} {w[::-1]}"}) + "\n")
    m = prepare(PrepOptions(inputs=[str(root / "sft.jsonl")], out=str(root / "shards"), prompt_field="prompt",
                            field="answer", tokenizer="bytes", seq_len=64, val_fraction=0.05, workers=1,
                            quiet=True, progress=False))
    return root / "shards" / "manifest.json", m


def test_sft_trains_and_val_nelbo_is_per_answer_token_and_byte(pairs_manifest, tmp_path):
    path, m = pairs_manifest
    res = train(demo(path, tmp_path, "objective=llada", "trainer.max_steps=40", "trainer.val_every_n_steps=40",
                     "trainer.limit_val_batches=0"))
    va = m["splits"]["val"]
    answer_tokens = va["document_tokens"] - va["prompt_tokens"]  # ASCII: one byte each
    assert res["val/sequences"] == va["samples"]
    assert res["val/tokens"] == answer_tokens + va["eos_tokens"]  # answers and their EOS; no prompt, no padding
    assert res["val/bytes"] == answer_tokens  # EOS stands for no text
    assert res["val/bpb"] == pytest.approx(res["val/nelbo"] * res["val/tokens"] / res["val/bytes"] / 0.6931471805599453)
    assert res["val/nelbo"] < 0.6 * res["val_nelbo_before"]


class SigintAt(L.Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_resume_with_random_length_truncation_equals_uninterrupted(make_corpus, tmp_path):
    manifest = make_corpus(["alpha", "beta", "gamma", "delta"], 30, 60, 0, "--val-fraction", "0.1")
    args = ["objective.random_length_fraction=0.5", "trainer.max_steps=12", "trainer.val_every_n_steps=100"]
    straight = train(demo(manifest, tmp_path / "a", *args))
    first = train(demo(manifest, tmp_path / "b", *args), extra_callbacks=[SigintAt(4)])
    assert straight["step"] == 12 and first["stopped_early"] and first["step"] == 5
    assert train(demo(manifest, tmp_path / "b", *args))["step"] == 12
    a, b = (torch.load(tmp_path / d / "checkpoints/last.ckpt", map_location="cpu", weights_only=False) for d in "ab")
    for k, v in a["state_dict"].items():
        assert torch.allclose(v, b["state_dict"][k], atol=1e-6, rtol=0), k
    # and the cuts matter: without them the run ends elsewhere
    c = train(demo(manifest, tmp_path / "c", "trainer.max_steps=12", "trainer.val_every_n_steps=100"))
    assert c["step"] == 12
    w = torch.load(tmp_path / "c/checkpoints/last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert any(not torch.allclose(v, w[k], atol=1e-6, rtol=0) for k, v in a["state_dict"].items())


def test_objective_without_prompt_support_refuses_pair_data(pairs_manifest):
    from dlmtrain.data import build_datamodule
    from dlmtrain.errors import ConfigError
    from dlmtrain.modules.mdlm import MDLM

    class NoPrompts(MDLM):
        prompt_conditioning = False

    path, _ = pairs_manifest
    cfg = load_config(None, ["model=tiny", "model.vocab_size=260", f"data.manifest={path}", "data.num_workers=0"])
    module, dm = NoPrompts(cfg), build_datamodule(cfg, 4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match="prompt-conditioned"):
        trainer.fit(module, datamodule=dm)
    batch = next(iter(dm.val_dataloader()))
    with pytest.raises(ConfigError, match="objective mdlm does not support"):
        module.elbo_batch(batch, torch.Generator().manual_seed(0), 1)
