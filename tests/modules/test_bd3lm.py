"""The bd3lm module: what its attention lets through, the autoregressive limit on a real backbone,
clipped training times, config errors, and a tiny run on Markov shards end to end."""

import json
import math

import lightning as L
import pytest
import torch

from chain_oracles import P, chain_nll, held_out_bound, one_thread, sample_chain  # noqa: F401
from dlmtrain import build_module, load_checkpoint, load_config
from dlmtrain.backbone import KVCache
from dlmtrain.cli import main
from dlmtrain.data.synthetic import write_markov
from dlmtrain.diffusion.block import attention_mask
from dlmtrain.errors import ConfigError
from dlmtrain.train import train

V = 11


def real(block_size, *extra, seed=0):
    torch.manual_seed(seed)
    cfg = load_config(None, ["objective=bd3lm", "model=tiny", f"model.vocab_size={V}", "model.hidden_size=32",
                             "model.n_heads=2", f"objective.block_size={block_size}", "optim.ema=0", *extra])
    m = build_module(cfg)
    with torch.no_grad():
        torch.nn.init.normal_(m.backbone.head.weight, std=0.5)
    return m.eval()


def both_copies(m, z, x0):
    """Logits of all 2L positions [x_t ; x0] as the training forward computes them."""
    L = x0.shape[1]
    return m.backbone(torch.cat([z, x0], 1), attn_mask=attention_mask(L, m.block_size),
                      position_ids=torch.arange(L).repeat(2))


def test_a_change_in_a_block_reaches_exactly_the_positions_allowed_to_see_it():
    m = real(2)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, V, (2, 8), generator=g)
    z = x0.masked_fill(torch.rand(2, 8, generator=g) < 0.5, m.mask_id)
    with torch.inference_mode():  # validation builds the mask first: training must still be able to save it
        m.nelbo(x0)
    assert not m.structure(8, "cpu")[0].is_inference()
    with torch.no_grad():
        base = both_copies(m, z, x0)
        assert torch.allclose(base[:, :8], m.logits(z, x0), atol=1e-6)  # the module's forward: the x_t copy
        for b in range(4):
            blk = slice(2 * b, 2 * b + 2)
            x1 = x0.clone()
            x1[:, blk] = (x1[:, blk] + 1) % V  # change clean block b
            d = (both_copies(m, z, x1) - base).abs().amax((0, 2)).view(2, 4, 2).amax(2)  # [copy, block]
            assert (d[0, :b + 1] < 1e-6).all() and (d[0, b + 1:] > 1e-3).all()  # x_t: blocks <= b blind to it
            assert (d[1, :b] < 1e-6).all() and (d[1, b:] > 1e-3).all()  # x0: blocks < b blind to it
            z1 = z.clone()
            z1[:, blk] = torch.where(z[:, blk] == m.mask_id, (x0[:, blk] + 3) % V, m.mask_id)  # change noisy block b
            d = (both_copies(m, z1, x0) - base).abs().amax((0, 2)).view(2, 4, 2).amax(2)
            assert d[0, b] > 1e-3 and (d.flatten()[torch.arange(8) != b] < 1e-6).all()  # only x_t block b


def test_block_size_one_on_a_real_backbone_is_its_autoregressive_likelihood_through_a_kv_cache():
    """The training forward ([x_t ; x0], all masked) and incremental decoding (x_<i committed to a
    KV cache, then [MASK] at i uncommitted) give the same -log p(x_i | x_<i)."""
    m = real(1, seed=1)
    x = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        bound = m.nelbo(x, num_samples=2)
        cache, nll = KVCache(9), torch.zeros(3)
        for i in range(9):
            lp = torch.log_softmax(m.backbone(torch.full((3, 1), m.mask_id), cache=cache, commit=False)[:, 0, :V], -1)
            nll -= lp.gather(1, x[:, i:i + 1]).squeeze(1)
            m.backbone(x[:, i:i + 1], cache=cache)
    assert bound.min() > 5 and torch.allclose(bound, nll, rtol=1e-5)


def test_training_times_are_clipped_and_the_bound_never_is():
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, **kw):
            seen.append(x[:, :x.shape[1] // 2].clone())
            return torch.zeros(*x[:, kw["out_positions"]].shape, V + 1) + self.w

    def mask_rates(*extra):
        m = real(256, *extra)
        m.backbone = Recorder()
        seen.clear()
        m.loss({"input_ids": torch.randint(0, V, (16, 512), generator=torch.Generator().manual_seed(2))})
        return (seen[0] == m.mask_id).float().view(16, 2, 256).mean(2), m

    full, m_full = mask_rates()
    clipped, m_clip = mask_rates("objective.clip_min=0.3", "objective.clip_max=0.8")
    # 32 blocks on 32 strata of [0, 1): the extreme strata mask ~0 and ~all; clipped: 0.3..0.8 (+- 0.03 binomial)
    assert full.min() < 0.1 and full.max() > 0.9
    assert clipped.min() > 0.22 and clipped.max() < 0.88
    x = torch.randint(0, V, (4, 512), generator=torch.Generator().manual_seed(3))
    a = m_full.nelbo_draws(x, num_samples=2, generator=torch.Generator().manual_seed(4))
    b = m_clip.nelbo_draws(x, num_samples=2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("override,match", [
    ("objective.block_size=0", "block_size"),
    ("objective.clip_max=0.0", "clip_min"),
    ("objective.clip_max=1.5", "clip_min"),
    ("objective.graph=absorb", "not of bd3lm"),
    ("objective.schedule=geometric", "schedule"),
])
def test_config_mistakes_are_one_line_errors(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, ["objective=bd3lm", "model.vocab_size=5", override])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override,match", [
    ("model.document_mask=true", "document_mask"), ("model.causal=true", "causal"),
    ("model.attn_backend=flash", "flash"),
])
def test_unsupported_model_options_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        build_module(load_config(None, ["objective=bd3lm", "model.vocab_size=5", "model.eos_id=4", override]))
    with pytest.raises(ConfigError, match="discrete"):
        real(4).nelbo_draws(torch.zeros(1, 8, dtype=torch.long), discrete_steps=10)


# ---- a tiny run on Markov shards ----------------------------------------------------------------

LT = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bd3lm")
    manifest = write_markov(root / "data", P.numpy(), seq_len=LT, train_samples=2048, val_samples=96)

    def cfg(steps):
        return load_config("configs/demo.yaml", [
            "objective=bd3lm", "objective.block_size=4", f"data.manifest={manifest}", f"run.dir={root / 'run'}",
            "data.num_workers=0", "model.hidden_size=64", "model.n_heads=2", "optim.lr=3e-3", "optim.ema=0.9",
            "optim.warmup_steps=10", f"trainer.max_steps={steps}", "trainer.global_batch_size=16",
            "trainer.val_every_n_steps=60", "trainer.limit_val_batches=2", "trainer.ckpt_every_n_steps=30",
            "trainer.progress_bar=false", "eval.sample_every_n_steps=60", "eval.num_samples=4",
            "sampling.steps=8", "sampling.sampler=first_hitting"])

    class Steps(L.Callback):
        n = 0

        def on_train_batch_end(self, *args):
            Steps.n += 1

    try:
        first = train(cfg(60))
        second = train(cfg(120), extra_callbacks=[Steps()])
    finally:
        torch.set_num_threads(n)
    return first, second, Steps.n, root / "run"


def test_tiny_run_validates_samples_resumes_and_its_held_out_bound_is_above_the_exact_nll(run):
    first, second, resumed_steps, run_dir = run
    assert first["step"] == 60 and second["step"] == 120 and resumed_steps == 60  # resumed at 60
    assert math.isfinite(first["val/nelbo"]) and second["val/nelbo"] < first["val_nelbo_before"]
    rows = [json.loads(s) for s in (run_dir / "samples" / "step120.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["tokens"]) == LT for r in rows)
    module = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert module.block_size == 4
    # held out: fresh chain sequences, 8 draws each, paired with their exact -log p(x)
    x = sample_chain(256, LT, torch.Generator().manual_seed(11))
    with torch.no_grad():
        per_seq = module.nelbo_draws(x, num_samples=8, generator=torch.Generator().manual_seed(12))[0].double().mean(1)
    gap, gap_se, nelbo, nelbo_se = held_out_bound(per_seq, x)
    print(f"held-out bound {nelbo:.4f} ± {nelbo_se:.4f} nats/token, exact {chain_nll(x).sum().item() / x.numel():.4f}")
    assert gap > -3 * gap_se, (gap, gap_se)  # a bound: not below -log p(x) beyond noise
    assert nelbo + 3 * nelbo_se < 0.85 * math.log(4), (nelbo, nelbo_se)  # learned: well below log V


def test_sample_command_past_the_training_length_with_a_prompt(run, tmp_path):
    _, _, _, run_dir = run
    out = tmp_path / "s.jsonl"
    assert main(["sample", str(run_dir / "checkpoints" / "last.ckpt"), "--num", "64", "--prompt", "\x02\x02\x01",
                 "--seq-len", "48", "--sampler", "confidence", "--steps", "4", "--seed", "1", "--out", str(out)]) == 0
    x = torch.tensor([json.loads(ln)["tokens"] for ln in out.read_text().splitlines()])
    assert x.shape == (64, 48) and (x[:, :3] == torch.tensor([2, 2, 1])).all()
    # transitions past the prompt follow the chain loosely (~900 per row of P; a tiny model): rows of P within 0.15
    a, b = x[:, 2:-1].flatten(), x[:, 3:].flatten()
    keep = (a < 3) & (b < 3)
    counts = torch.zeros(3, 3).index_put_((a[keep], b[keep]), torch.ones(int(keep.sum())), accumulate=True)
    freq = counts / counts.sum(1, keepdim=True)
    assert keep.float().mean() > 0.98 and (freq - P.float()).abs().max() < 0.15, freq


@pytest.mark.parametrize("block_size,extra", [(4, []), (4, ["objective.time_conditioning=true"]), (1, [])])
def test_masked_head_equals_full_logits(block_size, extra):
    # objective.masked_head: head + chunked CE at the masked x_t positions only; loss, gradients and the
    # bound equal the full-logits path (float32 rounding: sums over ~50 tokens, 11-way softmaxes)
    new = real(block_size, "objective.masked_head=true", "objective.ce_chunk_size=5", *extra).train()
    old = real(block_size, "objective.masked_head=false", *extra).train()
    with torch.no_grad():  # non-zero adaLN too, so every parameter gets a gradient
        for p in new.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    old.load_state_dict(new.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, 16), generator=g)
    am = torch.ones_like(x, dtype=torch.bool)
    am[1, 11:] = False
    pm = torch.zeros_like(am)
    pm[2, :5] = True
    batch = {"input_ids": x, "attention_mask": am, "prompt_mask": pm}
    ln, lo = new.loss(batch), old.loss(batch)
    ln.backward()
    lo.backward()
    assert ln.item() > 1.0
    torch.testing.assert_close(ln, lo, rtol=1e-5, atol=1e-6)
    go = dict(old.named_parameters())
    assert sum(p.grad is not None and p.grad.abs().sum() > 0 for p in new.parameters()) >= 12
    for name, p in new.named_parameters():
        if go[name].grad is None:  # adaLN layers without time conditioning do not exist; nothing else may lack one
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, go[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.inference_mode():
        a, ta = new.nelbo_draws(x, am, 3, torch.Generator().manual_seed(2), prompt_mask=pm)
        b, tb = old.nelbo_draws(x, am, 3, torch.Generator().manual_seed(2), prompt_mask=pm)
    assert torch.equal(ta, tb) and (a.sum(1) > 0).all()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
