"""SEDD end to end: `train` from configs/demo.yaml on Markov-chain shards whose entropy is known
exactly. After 100 steps the held-out NELBO must be an upper bound on the exact NLL within its
Monte Carlo error (3 SE) and clearly below log V (the bound of a model that learned nothing about
the data but its vocabulary); validation metrics, checkpoints, samples and a resume must work."""

import math

import numpy as np
import pytest
import torch

from dlmtrain import load_checkpoint, load_config
from dlmtrain.data import build_datamodule
from dlmtrain.data.synthetic import markov_log_prob, write_markov
from dlmtrain.sampling import sample
from dlmtrain.train import train

P4 = np.full((4, 4), 0.05) + 0.8 * np.eye(4)  # sticky chain: 0.59 nats/token, unigram log 4 = 1.39
V = 5  # write_markov declares the 4 states + EOS


from chain_oracles import one_thread  # noqa: E402,F401  (autouse: one thread for tiny tensors)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_markov(tmp_path_factory.mktemp("markov"), P4, seq_len=16, train_samples=1024, val_samples=128)


def config(manifest, run_dir, objective, *extra):
    return load_config("configs/demo.yaml", [
        f"objective={objective}", f"data.manifest={manifest}", f"run.dir={run_dir}", "data.num_workers=0",
        "trainer.max_steps=100", "trainer.val_every_n_steps=100", "trainer.ckpt_every_n_steps=50",
        "trainer.limit_val_batches=0", "trainer.progress_bar=false", "optim.warmup_steps=10", "eval.nelbo_samples=4",
        "eval.num_samples=4", "sampling.steps=16", *extra])


def exact_nll_per_token(cfg):
    ids = torch.cat([b["input_ids"] for b in build_datamodule(cfg, 32).val_dataloader()])
    return -markov_log_prob(ids.numpy(), P4).sum() / ids.numel()


@pytest.mark.parametrize("objective", ["sedd", "sedd_uniform"])
def test_train_learned_bound_checkpoint_samples_and_resume(manifest, tmp_path, objective, capsys):
    cfg = config(manifest, tmp_path, objective)
    res = train(cfg)
    exact = exact_nll_per_token(cfg)
    assert res["step"] == 100 and res["val/tokens"] == 128 * 16
    nelbo, se_mc = res["val/nelbo"], res["val/nelbo_se_mc"]
    assert nelbo > exact - 3 * se_mc, (nelbo, exact, se_mc)  # an upper bound, within its Monte Carlo error
    assert nelbo < 0.75 * math.log(V) and nelbo < res["val_nelbo_before"]  # and it learned
    assert (tmp_path / "checkpoints" / "last.ckpt").exists() and list((tmp_path / "checkpoints").glob("best-*.ckpt"))
    out = capsys.readouterr().out
    assert "samples at step 100 (ancestral, 16 steps, NFE" in out

    # the checkpoint holds a SEDD module whose EMA weights give the same bound and can sample
    module = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert type(module).__name__ == "SEDD" and module.graph == ("absorb" if objective == "sedd" else "uniform")
    ids = torch.cat([b["input_ids"] for b in build_datamodule(cfg, 32).val_dataloader()])
    with torch.no_grad():
        again = module.nelbo(ids, num_samples=2, generator=torch.Generator().manual_seed(0)).sum() / ids.numel()
    assert again.item() == pytest.approx(nelbo, abs=6 * se_mc)
    res_s = sample(module, 8, 16, 8, sampler="tweedie", prompt_ids=[3, 3])
    assert (res_s.ids[:, :2] == 3).all() and res_s.ids.max() < V

    # resume: the same command with more steps continues from step 100
    more = train(config(manifest, tmp_path, objective, "trainer.max_steps=110", "trainer.val_every_n_steps=110"))
    assert more["step"] == 110 and "resuming from" in capsys.readouterr().out
    assert more["val/nelbo"] < 0.75 * math.log(V)


def test_gradients_reach_the_time_conditioning():
    cfg = load_config(None, ["model=tiny", "model.vocab_size=6", "objective=sedd_uniform", "optim.ema=0"])
    from dlmtrain import build_module

    module = build_module(cfg)
    with torch.no_grad():  # leave adaLN-Zero's zero init, so the noise level can matter at all
        for p in module.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loss = module.loss({"input_ids": torch.randint(0, 6, (8, 12))})
    loss.backward()
    assert torch.isfinite(loss)
    assert module.backbone.time.mlp[0].weight.grad.abs().sum() > 0
    assert module.backbone.blocks[0].ada.weight.grad.abs().sum() > 0
