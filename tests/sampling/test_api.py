"""sample() through a real tiny MDLM: end to end, EMA weights, restored state, NFE, config."""

import pytest
import torch

from dlmtrain import build_module, load_config
from dlmtrain.data.tokenizer import ByteTokenizer
from dlmtrain.modules.ema import EMA
from dlmtrain.sampling import sample, sample_from_config, supported_samplers

V = 64


def tiny(*extra):
    """The demo model at V = 64, with a random output head: a fresh head is zero (uniform
    predictions), and these tests need outputs that depend on the input and the weights."""
    module = build_module(load_config("configs/demo.yaml", [f"model.vocab_size={V}", *extra]))
    with torch.no_grad():
        module.backbone.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return module


def test_every_sampler_runs_end_to_end_with_a_tokenizer():
    module = tiny()
    tok = ByteTokenizer()
    assert supported_samplers(module) == ["ancestral", "first_hitting", "confidence", "semi_ar"]
    for name in supported_samplers(module):
        res = sample(module, 3, 20, 8, sampler=name, prompt_ids=[10, 11], suffix_ids=[12], block_len=8,
                     tokenizer=tok, top_p=0.9)
        assert res.ids.shape == (3, 20) and res.ids.dtype == torch.long
        assert (res.ids[:, :2] == torch.tensor([10, 11])).all() and (res.ids[:, -1] == 12).all()
        assert ((res.ids >= 0) & (res.ids < V)).all()  # never [MASK] (= V)
        assert res.text == [tok.decode(r.tolist()) for r in res.ids]
        assert res.seconds > 0 and res.tokens_per_s == pytest.approx(3 * 17 / res.seconds)
        assert 1 <= res.nfe == res.nfe_per_batch[0]


def test_ema_weights_are_used_and_the_training_state_restored():
    module = tiny()
    module.ema = EMA(module.backbone, 0.99)
    g = torch.Generator().manual_seed(1)
    for t in module.ema.shadow.values():
        t.add_(0.3 * torch.randn(t.shape, generator=g))
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    module.train()
    res = sample(module, 4, 16, 16, sampler="confidence", seed=3)
    assert module.training and not module.ema.active and torch.is_grad_enabled()
    assert all(torch.equal(p, before[n]) for n, p in module.backbone.named_parameters())

    # the same draw from a module holding the EMA weights and no EMA ...
    ema_copy = tiny()
    with torch.no_grad():
        for n, p in ema_copy.backbone.named_parameters():
            p.copy_(module.ema.shadow[n])
    assert torch.equal(sample(ema_copy, 4, 16, 16, sampler="confidence", seed=3).ids, res.ids)
    # ... differs from the draw with the training weights
    module.ema = None
    assert not torch.equal(sample(module, 4, 16, 16, sampler="confidence", seed=3).ids, res.ids)


def test_a_failing_sampler_still_restores_weights_and_mode():
    module = tiny()
    module.ema = EMA(module.backbone, 0.99)
    for t in module.ema.shadow.values():
        t.add_(1.0)
    before = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    module.train()

    def broken(z, t, **kw):  # MDLM declares denoise_at: samplers pass at=
        raise RuntimeError("boom")

    module.denoise = broken
    with pytest.raises(RuntimeError, match="boom"):
        sample(module, 2, 8, 4)
    assert module.training and not module.ema.active
    assert all(torch.equal(p, before[n]) for n, p in module.backbone.named_parameters())


def test_cache_is_exact_on_a_real_model_and_nfe_counts_backbone_calls():
    module = tiny()
    calls = []
    module.backbone.register_forward_hook(lambda *a: calls.append(1))
    on = sample(module, 4, 16, 256, cache=True, seed=7)
    n_on = len(calls)
    off = sample(module, 4, 16, 256, cache=False, seed=7)
    assert torch.equal(on.ids, off.ids)
    assert on.nfe == n_on <= 4 * 16 < off.nfe == len(calls) - n_on
    # guidance: two backbone calls per evaluation, both counted
    calls.clear()
    res = sample(module, 4, 16, 5, sampler="confidence", prompt_ids=[1, 2], cfg_scale=2.0)
    assert res.nfe == len(calls) == 10


def test_time_conditioned_models_skip_the_cache():
    # the cache reuses an output computed at an earlier t: exact only for time-agnostic networks
    module = tiny("objective.time_conditioning=true")
    on = sample(module, 2, 8, 40, cache=True, seed=1)
    off = sample(module, 2, 8, 40, cache=False, seed=1)
    assert torch.equal(on.ids, off.ids) and on.nfe == off.nfe


def test_sample_from_config_and_batches():
    cfg = load_config("configs/demo.yaml", [f"model.vocab_size={V}", "sampling.sampler=confidence",
                                            "sampling.steps=6", "sampling.top_k=5", "sampling.confidence=margin"])
    module = tiny()
    a = sample_from_config(module, cfg.sampling, num_samples=5, seq_len=12, seed=2, batch_size=2)
    b = sample(module, 5, 12, 6, sampler="confidence", top_k=5, confidence="margin", seed=2, batch_size=2)
    assert torch.equal(a.ids, b.ids) and a.nfe_per_batch == [6, 6, 6] and a.nfe == 6
    c = sample_from_config(module, cfg.sampling, num_samples=5, seq_len=12, seed=2, steps=3)
    assert c.nfe == 3 and c.ids.shape == (5, 12)
