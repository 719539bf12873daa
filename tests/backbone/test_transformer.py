"""Backbone behaviour on CPU: shapes, masks, conditioning, rotary, dtypes."""

import math

import pytest
import torch

from dlmtrain.backbone import Backbone, segment_ids_from_eos
from dlmtrain.backbone.transformer import Rotary, apply_rotary
from dlmtrain.config import ModelConfig

V = 37
EOS = 3


def make(use_cond=False, perturb=True, seed=0, **kw):
    """A tiny backbone; ``perturb`` re-draws the zero-initialised head / adaLN so outputs carry signal."""
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, n_layers=2, n_heads=4, cond_dim=16, mlp_ratio=2.0, eos_id=EOS)
    for k, v in kw.items():
        setattr(cfg, k, v)
    model = Backbone(cfg, V, use_cond=use_cond)
    if perturb:
        with torch.no_grad():
            torch.nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


def ids(B=2, L=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, V, (B, L), generator=g)  # no EOS unless placed
    return x


def test_segment_ids_from_eos():
    x = torch.tensor([[5, 1, EOS, 2, EOS, 8, 7], [EOS, EOS, 5, 6, 7, 8, 9]])
    want = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0, 1, 2, 2, 2, 2, 2]])
    assert torch.equal(segment_ids_from_eos(x, EOS), want)


@pytest.mark.parametrize("use_cond", [False, True])
def test_shapes_ids_and_embeds(use_cond):
    m = make(use_cond)
    x = ids()
    sigma = torch.rand(2) if use_cond else None
    out = m(x, sigma=sigma)
    assert out.shape == (2, 12, V) and out.dtype == torch.float32
    emb = m.embed(x)
    out2 = m(inputs_embeds=emb, sigma=sigma)
    assert torch.allclose(out, out2, atol=1e-6)
    m_out = Backbone(ModelConfig(hidden_size=32, n_layers=1, n_heads=4, cond_dim=16), V, use_cond, out_dim=32)
    assert m_out(x, sigma=sigma).shape == (2, 12, 32)
    with pytest.raises(ValueError):
        m(x, inputs_embeds=emb, sigma=sigma)
    if use_cond:
        with pytest.raises(ValueError, match="sigma"):
            m(x)


def test_float32_logits_under_bf16_autocast():
    m = make(use_cond=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids(), sigma=torch.rand(2))
    assert out.dtype == torch.float32
    ref = m(ids(), sigma=torch.rand(2))
    assert (out - ref).abs().max() < 0.2 * ref.abs().max()  # same function, bf16 noise only


def test_init_head_zero_untied_and_tied():
    m = make(perturb=False)
    assert torch.count_nonzero(m(ids())) == 0  # untied head zero-init: uniform predictions
    t = make(perturb=False, tie_weights=True)
    assert t.head.weight is t.embed.weight
    assert t(ids()).abs().max() > 0
    assert abs(t.embed.weight.std().item() - 0.02) < 0.003


def test_residual_projection_init_scaled():
    m = make(n_layers=8, hidden_size=64)
    std = m.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002


def two_docs(L=12, split=5):
    x = ids(B=1, L=L)
    x[0, split] = EOS  # doc 1 = positions 0..split (EOS included), doc 2 after
    return x


@pytest.mark.parametrize("explicit", [False, True])
def test_document_mask(explicit):
    x = two_docs()
    y = x.clone()
    y[0, 8] = (y[0, 8] + 1 - 4) % (V - 4) + 4  # change a token of document 2
    seg = segment_ids_from_eos(x, EOS) if explicit else None
    masked = make(document_mask=not explicit)
    a, b = masked(x, segment_ids=seg), masked(y, segment_ids=seg)
    assert torch.allclose(a[0, :6], b[0, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(a[0, 6:], b[0, 6:], atol=1e-4)
    plain = make()  # no document masking: information crosses the boundary
    a, b = plain(x), plain(y)
    assert (a[0, :6] - b[0, :6]).abs().max() > 1e-4


def test_document_mask_errors():
    with pytest.raises(ValueError, match="eos_id"):
        make(document_mask=True, eos_id=-1)(ids())
    m = make(document_mask=True)
    with pytest.raises(ValueError, match="segment_ids"):
        m(inputs_embeds=torch.randn(1, 4, 32))


def test_causal():
    m = make(causal=True)
    x = ids(B=1)
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1 - 4) % (V - 4) + 4
    a, b = m(x), m(y)
    assert torch.allclose(a[0, :7], b[0, :7], rtol=0, atol=1e-6)
    assert (a[0, 7:] - b[0, 7:]).abs().max() > 1e-4
    bi = make()
    assert (bi(x)[0, :7] - bi(y)[0, :7]).abs().max() > 1e-4


def test_key_padding():
    m = make()
    x = ids(B=3)
    keep = torch.ones(3, 12, dtype=torch.bool)
    keep[0, 9:] = False  # right padding
    keep[1, :4] = False  # left padding
    keep[2, :] = False  # a row that is padding only
    y = torch.where(keep, x, torch.randint(4, V, x.shape))
    y[~keep] = (x[~keep] + 1 - 4) % (V - 4) + 4  # every padded id differs
    a, b = m(x, attention_mask=keep), m(y, attention_mask=keep)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.allclose(a[keep], b[keep], rtol=0, atol=1e-6)
    assert (m(x)[keep] - m(y)[keep]).abs().max() > 1e-4  # without the mask they would differ


def test_masks_combine_with_arbitrary_mask():
    """segment_ids + padding + attn_mask + causal through the model are all honoured."""
    m = make(causal=True)
    x = ids(B=1, L=10)
    seg = torch.tensor([[0] * 5 + [1] * 5])
    keep = torch.ones(1, 10, dtype=torch.bool)
    keep[0, 9] = False
    block = torch.ones(10, 10, dtype=torch.bool)
    block[:, 1] = False  # nobody may see position 1
    y = x.clone()
    y[0, 1] = (y[0, 1] + 1 - 4) % (V - 4) + 4  # position 1's token: only position 1 itself reads it
    a = m(x, segment_ids=seg, attention_mask=keep, attn_mask=block)
    b = m(y, segment_ids=seg, attention_mask=keep, attn_mask=block)
    diff = (a - b).abs().amax(-1)[0]
    assert diff[1] > 1e-4 and torch.all(diff[[0, 2, 3, 4, 5, 6, 7, 8]] < 1e-6)


def test_adaln_zero():
    m = make(use_cond=True)
    x = ids()
    a, b = m(x, sigma=torch.tensor([0.1, 0.2])), m(x, sigma=torch.tensor([0.9, 5.0]))
    assert torch.allclose(a, b, rtol=0, atol=1e-6)  # zero-init modulation: sigma has no effect yet
    assert torch.count_nonzero(m.blocks[0].ada.weight) == 0
    with torch.no_grad():
        for blk in m.blocks:
            blk.ada.weight.normal_(std=0.1)
        m.final_ada.weight.normal_(std=0.1)
    a, b = m(x, sigma=torch.tensor([0.1, 0.2])), m(x, sigma=torch.tensor([0.9, 5.0]))
    assert (a - b).abs().max() > 1e-3
    # scalar sigma broadcasts to the batch
    assert torch.allclose(m(x, sigma=torch.tensor(0.3)), m(x, sigma=torch.tensor([0.3, 0.3])), atol=1e-6)


def test_gradients_reach_gates_at_init():
    m = make(use_cond=True).train()
    m(ids(), sigma=torch.rand(2)).square().mean().backward()
    assert m.blocks[0].ada.weight.grad.abs().sum() > 0


def test_dropout_only_in_training():
    m = make(dropout=0.3)
    x = ids()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.allclose(m(x), m(x))


def test_rotary_matches_naive_rotation():
    D, L = 8, 6
    cos, sin = Rotary(D, 10000.0)(L, "cpu")
    x = torch.randn(1, 1, L, D)
    got = apply_rotary(x, cos, sin)  # cos/sin [L, D/2] broadcast over [B, H, L, D]
    want = torch.empty_like(x)
    for p in range(L):
        for i in range(D // 2):
            ang = p * 10000.0 ** (-2 * i / D)
            a, b = x[0, 0, p, i], x[0, 0, p, i + D // 2]
            want[0, 0, p, i] = a * math.cos(ang) - b * math.sin(ang)
            want[0, 0, p, i + D // 2] = a * math.sin(ang) + b * math.cos(ang)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # rotations keep length


def test_rotary_scores_depend_on_relative_position_only():
    D, L = 16, 20
    cos, sin = Rotary(D, 10000.0)(L, "cpu")
    q, k = torch.randn(D), torch.randn(D)
    qr = apply_rotary(q.expand(1, 1, L, D), cos, sin)[0, 0]
    kr = apply_rotary(k.expand(1, 1, L, D), cos, sin)[0, 0]
    scores = qr @ kr.T  # [L, L]
    for shift in (1, 7):
        assert torch.allclose(scores[:-shift, :-shift], scores[shift:, shift:], atol=1e-4)
    assert not torch.allclose(scores[0, 1], scores[0, 5])


def test_position_ids_default_and_shift():
    m = make()
    x = ids()
    pos = torch.arange(12).expand(2, 12)
    assert torch.allclose(m(x), m(x, position_ids=pos), atol=1e-6)
    assert torch.allclose(m(x), m(x, position_ids=pos + 100), atol=1e-4)  # bidirectional: only relative positions matter


def test_rotary_cache_survives_inference_mode_then_training():
    # validate-before-fit builds the tables under inference_mode; training must still work
    from dlmtrain.config import load_config
    from dlmtrain.backbone import Backbone

    cfg = load_config(None, ["model=tiny", "model.vocab_size=11"]).model
    net = Backbone(cfg, vocab_size=11)
    ids = torch.randint(0, 11, (2, 6))
    with torch.inference_mode():
        net(ids)
    net(ids).sum().backward()
    assert net.embed.weight.grad is not None
