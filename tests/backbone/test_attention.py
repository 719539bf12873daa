"""attention(): SDPA path against a naive softmax, flash-attn varlen metadata, flash vs SDPA on GPU."""

import math

import pytest
import torch

from dlmtrain.backbone.attention import AttentionPlan, attention, flash_available


def naive(q, k, v, allowed):
    """Softmax attention with a boolean mask; rows with nothing allowed attend to themselves."""
    L = q.shape[-2]
    allowed = allowed.expand(q.shape[0], q.shape[1], L, L)
    allowed = allowed | (torch.eye(L, dtype=torch.bool) & ~allowed.any(-1, keepdim=True))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    return s.softmax(-1) @ v


def qkv(B=2, H=3, L=9, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g) for _ in range(3)]


SEG = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1]])
KEEP = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("use_seg", [False, True])
@pytest.mark.parametrize("use_pad", [False, True])
@pytest.mark.parametrize("use_arb", [False, True])
def test_sdpa_matches_naive(causal, use_seg, use_pad, use_arb):
    q, k, v = qkv()
    L = q.shape[-2]
    g = torch.Generator().manual_seed(1)
    arb = torch.rand(2, 3, L, L, generator=g) > 0.3 if use_arb else None
    allowed = torch.ones(2, 1, L, L, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool).tril()
    if use_seg:
        allowed = allowed & (SEG[:, None, :, None] == SEG[:, None, None, :])
    if use_pad:
        allowed = allowed & KEEP[:, None, None, :]
    if use_arb:
        allowed = allowed & arb
    got = attention(q, k, v, causal=causal, segment_ids=SEG if use_seg else None,
                    key_padding_mask=KEEP if use_pad else None, attn_mask=arb, backend="sdpa")
    assert torch.isfinite(got).all()
    assert torch.allclose(got, naive(q, k, v, allowed), atol=1e-5)


def test_no_mask_materialised_when_not_needed():
    assert AttentionPlan().sdpa_mask(9, "cpu") is None
    assert AttentionPlan(causal=True).sdpa_mask(9, "cpu") is None


def test_fully_masked_row_attends_to_itself():
    q, k, v = qkv(B=1, H=1, L=4)
    keep = torch.zeros(1, 4, dtype=torch.bool)
    out = attention(q, k, v, key_padding_mask=keep, backend="sdpa")
    assert torch.allclose(out, v, atol=1e-6)


def test_varlen_metadata():
    plan = AttentionPlan(segment_ids=SEG, key_padding_mask=KEEP)
    idx, cu, max_len = plan.varlen(2, 9, "cpu")
    # row 0: segments 3,4,2 minus the last (padded) token -> 3,4,1; row 1: drop 2 padded -> 4,3
    assert cu.tolist() == [0, 3, 7, 8, 12, 15] and cu.dtype == torch.int32
    assert max_len == 4
    assert idx.tolist() == [0, 1, 2, 3, 4, 5, 6, 7] + [11, 12, 13, 14, 15, 16, 17]
    assert AttentionPlan(segment_ids=SEG).varlen(2, 9, "cpu")[1].tolist() == [0, 3, 7, 9, 15, 18]
    assert AttentionPlan().varlen(2, 9, "cpu") is None


@pytest.mark.skipif(flash_available(), reason="flash-attn is installed")
def test_flash_backend_without_package_says_what_to_install():
    q, k, v = qkv()
    with pytest.raises(ImportError, match="pip install flash-attn"):
        attention(q, k, v, backend="flash")
    assert AttentionPlan(backend="auto").choose_backend(q) == "sdpa"


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        AttentionPlan(backend="xformers")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_flash_matches_sdpa(causal):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("flash_attn")
    B, H, L, D = 2, 4, 256, 64
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    seg = torch.zeros(B, L, dtype=torch.long, device="cuda")
    seg[0, 100:] = 1
    seg[0, 180:] = 2
    seg[1, 30:] = 1
    keep = torch.ones(B, L, dtype=torch.bool, device="cuda")
    keep[1, 200:] = False
    for kw in ({}, {"segment_ids": seg}, {"segment_ids": seg, "key_padding_mask": keep}):
        a = attention(q, k, v, causal=causal, backend="flash", **kw)
        b = attention(q, k, v, causal=causal, backend="sdpa", **kw)
        real = keep[:, None, :, None].expand_as(a) if "key_padding_mask" in kw else torch.ones_like(a, dtype=torch.bool)
        assert torch.allclose(a[real].float(), b[real].float(), atol=2e-2)
