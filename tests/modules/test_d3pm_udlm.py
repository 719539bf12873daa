"""D3PM (absorbing, uniform) and UDLM as modules: wiring, padding, and a tiny `train` run each
on Markov-chain shards (validation metrics, samples, checkpoint, resume) whose held-out bound is
checked against the exact -log p(x) of the chain."""

import json
import math

import lightning as L
import pytest
import torch
from chain_oracles import P, held_out_bound, one_thread, sample_chain  # noqa: F401 (one_thread: autouse)

from dlmtrain import build_module, load_checkpoint, load_config
from dlmtrain.data.synthetic import write_markov
from dlmtrain.diffusion.d3pm import draw_steps
from dlmtrain.diffusion.schedules import stratified_times
from dlmtrain.errors import ConfigError
from dlmtrain.train import train

OBJECTIVES = ["d3pm", "d3pm_uniform", "udlm"]
V = 8


def small(objective, *extra):
    return build_module(load_config(None, ["model=tiny", f"model.vocab_size={V}", "optim.ema=0", "model.n_layers=1",
                                           "model.hidden_size=32", "model.n_heads=2", "model.cond_dim=16",
                                           f"objective={objective}", *extra]))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_padding_determinism_and_vocabulary(objective):
    m = small(objective)
    x = torch.randint(0, V, (3, 10))
    am = torch.ones(3, 10, dtype=torch.bool)
    am[1, 6:] = False
    am[2, :] = False
    a, t = m.nelbo_draws(x, am, num_samples=2, generator=torch.Generator().manual_seed(1))
    b, _ = m.nelbo_draws(x, am, num_samples=2, generator=torch.Generator().manual_seed(1))
    assert a.shape == t.shape == (3, 2) and torch.equal(a, b) and torch.isfinite(a).all()
    assert (a[2] == 0).all() and m.scored_tokens(x, am).tolist() == [10, 6, 0]
    x2 = x.clone()
    x2[1, 6:] = (x2[1, 6:] + 1) % V  # padding content does not change the bound
    assert torch.allclose(a, m.nelbo_draws(x2, am, num_samples=2, generator=torch.Generator().manual_seed(1))[0])
    # absorbing appends [MASK] to the vocabulary; uniform-state models have none
    assert m.backbone.out_dim == (V + 1 if objective == "d3pm" else V)
    # an untrained model outputs uniform distributions: on uniform random tokens that is the exact
    # denoiser, so the bound is L log V in expectation (UDLM's draws are heavy-tailed: 4096 rows)
    x = torch.randint(0, V, (4096, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        per_tok = m.nelbo(x, generator=torch.Generator().manual_seed(3)).mean().item() / 16
    assert per_tok == pytest.approx(math.log(V), rel=0.15)


def test_d3pm_conditions_on_the_integer_step_and_refuses_discrete_steps():
    m = small("d3pm", "objective.T=50")
    seen = []
    forward = m.backbone.forward

    def spy(z, sigma=None, **kw):
        seen.append(sigma.clone())
        return forward(z, sigma=sigma, **kw)

    m.backbone.forward = spy
    _, t = m.nelbo_draws(torch.randint(0, V, (6, 5)), num_samples=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[0], (t[:, 0] * 50).round())  # the step i in 1..50, as a float
    assert ((seen[0] >= 1) & (seen[0] <= 50)).all()
    with pytest.raises(ConfigError, match="discrete-time already"):
        m.nelbo_draws(torch.randint(0, V, (2, 5)), discrete_steps=10)


def test_hybrid_loss_adds_lambda_T_cross_entropy():
    # loss = (T * KL + prior + lambda T CE) per scored token, on the same draws as the bound's terms
    x = torch.randint(0, V, (8, 12))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    m0, m1 = small("d3pm", "objective.hybrid_lambda=0"), small("d3pm", "objective.hybrid_lambda=0.5")
    m1.load_state_dict(m0.state_dict())
    gen = g()
    t = stratified_times(8, antithetic=True, generator=gen)
    vlb, ce = m0._token_terms(x, draw_steps(t, m0.T), generator=gen)
    assert (ce > 0).any() and ((ce > 0) <= (vlb > 0)).all()  # CE only where the KL is (masked tokens)
    m0.step_generator = m1.step_generator = lambda device: g()
    expect = (vlb.sum() + m1.T * 0.5 * ce.sum()) / x.numel()
    assert m1.loss({"input_ids": x}).item() == pytest.approx(expect.item(), rel=1e-5)
    assert m0.loss({"input_ids": x}).item() == pytest.approx((vlb.sum() / x.numel()).item(), rel=1e-5)


# ---- tiny runs on Markov shards -----------------------------------------------------------------


@pytest.fixture(scope="module")
def markov(tmp_path_factory):
    return write_markov(tmp_path_factory.mktemp("markov"), P.numpy(), seq_len=32, train_samples=2048, val_samples=96)


class Steps(L.Callback):
    def __init__(self):
        self.n = 0

    def on_train_batch_end(self, *args):
        self.n += 1


def run_config(manifest, run_dir, objective, steps):
    return load_config("configs/demo.yaml", [
        f"objective={objective}", f"data.manifest={manifest}", f"run.dir={run_dir}", "data.num_workers=0",
        "model.hidden_size=64", "model.n_heads=2", "model.cond_dim=32", "optim.lr=3e-3", "optim.ema=0.9",
        "optim.warmup_steps=10", f"trainer.max_steps={steps}", "trainer.global_batch_size=16",
        "trainer.val_every_n_steps=60", "trainer.limit_val_batches=2", "trainer.ckpt_every_n_steps=30",
        "trainer.progress_bar=false", "eval.sample_every_n_steps=60", "eval.num_samples=4", "sampling.steps=16"])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_tiny_run_resumes_and_its_held_out_bound_is_above_the_exact_nll(markov, tmp_path, objective):
    first = train(run_config(markov, tmp_path, objective, 60))
    assert first["step"] == 60 and math.isfinite(first["val/nelbo"])
    steps = Steps()
    second = train(run_config(markov, tmp_path, objective, 120), extra_callbacks=[steps])
    assert second["step"] == 120 and steps.n == 60  # resumed from last.ckpt at step 60
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.exists() and second["val/nelbo"] < first["val_nelbo_before"]
    rows = [json.loads(s) for s in (tmp_path / "samples" / "step120.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["tokens"]) == 32 and max(r["tokens"]) < 4 for r in rows)

    # held out: fresh sequences of the chain, 8 draws each; paired with their exact -log p(x)
    module = load_checkpoint(ckpt)
    x = sample_chain(256, 32, torch.Generator().manual_seed(11))
    with torch.no_grad():
        nats = module.nelbo_draws(x, num_samples=8, generator=torch.Generator().manual_seed(12))[0].double()
    per_seq = nats.mean(1)
    gap, gap_se, nelbo, nelbo_se = held_out_bound(per_seq, x)  # nats/token; gap: above the exact NLL
    assert gap > -3 * gap_se, (gap, gap_se)  # a bound: not below -log p(x) beyond noise
    assert nelbo + 3 * nelbo_se < 0.85 * math.log(4), (nelbo, nelbo_se)  # learned: well below log V
