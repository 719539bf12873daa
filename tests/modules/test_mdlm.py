import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from dlmtrain import build_module, load_config
from dlmtrain.modules.base import lr_lambda, param_groups

V = 16


class Periodic(IterableDataset):
    """An easy source: each row repeats a random 4-token motif."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            motif = torch.randint(0, V, (4,), generator=g)
            yield {"input_ids": motif.repeat(8)}


def cfg(*extra):
    return load_config(None, ["model=tiny", f"model.vocab_size={V}", "trainer.max_steps=60", "optim.lr=3e-3",
                              "optim.warmup_steps=5", "optim.ema=0.9", *extra])


def test_public_api_trains_with_plain_trainer_and_loss_falls():
    L.seed_everything(0)
    module = build_module(cfg())
    x = next(iter(DataLoader(Periodic(), batch_size=64)))["input_ids"]
    g = torch.Generator().manual_seed(0)
    before = module.nelbo(x, num_samples=4, generator=g).mean().item()
    trainer = L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(Periodic(), batch_size=32))
    module.eval()
    with module.ema.swapped_in(module.backbone):
        after = module.nelbo(x, num_samples=4, generator=torch.Generator().manual_seed(0)).mean().item()
    # untrained: about L * log V nats; trained on a 4-token motif: far less
    assert before == pytest.approx(32 * torch.log(torch.tensor(float(V))).item(), rel=0.15)
    assert after < 0.6 * before


def test_nelbo_shapes_padding_and_generator_determinism():
    module = build_module(cfg())
    x = torch.randint(0, V, (3, 10))
    am = torch.ones(3, 10, dtype=torch.bool)
    am[1, 6:] = False
    am[2, :] = False
    a = module.nelbo(x, am, num_samples=2, generator=torch.Generator().manual_seed(1))
    b = module.nelbo(x, am, num_samples=2, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3,) and torch.equal(a, b)
    assert a[2].item() == 0.0  # nothing real, nothing scored
    assert module.scored_tokens(x, am).tolist() == [10, 6, 0]
    # padding content does not change the bound
    x2 = x.clone()
    x2[1, 6:] = (x2[1, 6:] + 1) % V
    c = module.nelbo(x2, am, num_samples=2, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, c)


def test_document_mask_keeps_eos_clean_and_unscored():
    module = build_module(cfg("model.document_mask=true", "model.eos_id=0"))
    x = torch.tensor([[3, 4, 0, 5, 6, 7, 0, 8]])
    assert module.scored_tokens(x).tolist() == [6]
    fixed = module._fixed(x, None)
    assert fixed.tolist() == [[False, False, True, False, False, False, True, False]]


def test_mask_id_appended_and_backbone_vocab():
    module = build_module(cfg())
    assert module.mask_id == V
    logits = module.backbone(torch.randint(0, V + 1, (2, 8)))
    assert logits.shape == (2, 8, V + 1) and logits.dtype == torch.float32


def test_param_groups_exclude_norms_biases_embeddings():
    module = build_module(cfg())
    decay, no_decay = param_groups(module.backbone, 0.1)
    emb = {id(p) for m in module.backbone.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    assert all(p.dim() >= 2 and id(p) not in emb for p in decay["params"])
    assert all(p.dim() < 2 or id(p) in emb for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    n = sum(p.numel() for p in module.backbone.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n


@pytest.mark.parametrize("decay,at_end", [("constant", 1.0), ("cosine", 0.1), ("linear", 0.1)])
def test_lr_schedule(decay, at_end):
    f = lr_lambda(10, 110, decay, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(110) == pytest.approx(at_end)
    if decay == "cosine":
        assert f(60) == pytest.approx(0.55)


def test_ema_by_name_roundtrip_and_swap():
    module = build_module(cfg())
    module.setup("fit")
    names = {n for n, _ in module.backbone.named_parameters()}
    assert set(module.ema.shadow) == names
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.add_(1.0)
    module.ema.update(module.backbone)
    state = module.ema.state_dict()
    p0 = next(module.backbone.parameters()).detach().clone()
    module.ema.swap_in(module.backbone)
    assert not torch.equal(next(module.backbone.parameters()), p0)
    module.ema.swap_out(module.backbone)
    assert torch.equal(next(module.backbone.parameters()), p0)
    other = build_module(cfg())
    other.setup("fit")
    other.ema.load_state_dict(state)
    for n in names:
        assert torch.equal(other.ema.shadow[n], module.ema.shadow[n])


def test_batch_segment_ids_are_ignored_without_document_mask():
    """The loader always sends segment_ids (from the clean text); without model.document_mask the
    backbone must not see them, or the EOS positions leak and the bound is no bound on -log p(x)."""
    import dlmtrain

    cfg = dlmtrain.load_config("configs/demo.yaml", ["model.vocab_size=64", "model.eos_id=5"])
    torch.manual_seed(0)
    m = dlmtrain.build_module(cfg)
    with torch.no_grad():
        m.backbone.head.weight.normal_(0, 0.5)  # a zero head would hide any dependence
    ids = torch.randint(0, 64, (3, 32))
    seg = torch.cumsum(torch.rand(3, 32) < 0.2, dim=1)
    draw = lambda s: m.nelbo(ids, segment_ids=s, generator=torch.Generator().manual_seed(1))  # noqa: E731
    assert torch.equal(draw(seg), draw(None))
    cfg.model.document_mask = True
    md = dlmtrain.build_module(cfg)
    md.load_state_dict(m.state_dict())
    a = md.nelbo(ids, segment_ids=seg, generator=torch.Generator().manual_seed(1))
    b = md.nelbo(ids, segment_ids=None, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)  # under document masking they are used
