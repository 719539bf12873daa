"""benchmarks/mdlm_side_by_side.py: its flash_attn stand-ins compute what flash-attn documents, and (only
where a checkout of kuleshov-group/mdlm is named by $DLMTRAIN_MDLM_CHECKOUT) their DiT through the
stand-ins equals our import of the same weights."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from chain_oracles import one_thread  # noqa: F401  (autouse: one thread for tiny tensors)

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "mdlm_side_by_side.py"
_spec = importlib.util.spec_from_file_location("mdlm_side_by_side", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("mdlm_side_by_side", bench)
_spec.loader.exec_module(bench)


def _attention(q, k, v):  # [l, H, D] each, written out
    w = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", w.softmax(-1), v)


@pytest.mark.parametrize("lens", [[6, 6, 6], [3, 7, 1, 5]])
def test_varlen_standin_is_attention_within_each_sequence(lens):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(sum(lens), 3, 2, 8, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    y = bench.flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), 0.0, causal=False)
    want = torch.cat([_attention(*qkv[a:b].unbind(1)) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert y.shape == (sum(lens), 2, 8)
    assert torch.allclose(y, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_rotary_standin_rotates_q_and_k_halves_and_leaves_v(rotary_dim):
    from dlmtrain.backbone.transformer import apply_rotary

    g = torch.Generator().manual_seed(1)
    B, L, H, D = 2, 5, 3, 8
    qkv = torch.randn(B, L, 3, H, D, generator=g, dtype=torch.float64)
    angles = torch.arange(L, dtype=torch.float64)[:, None] * torch.rand(rotary_dim // 2, generator=g, dtype=torch.float64)
    out = bench.apply_rotary_emb_qkv_(qkv.clone(), angles.cos(), angles.sin())
    c, s = angles.cos()[None, :, None], angles.sin()[None, :, None]
    for i in (0, 1):
        assert torch.allclose(out[:, :, i, :, :rotary_dim], apply_rotary(qkv[:, :, i, :, :rotary_dim], c, s), atol=1e-12)
        assert torch.equal(out[:, :, i, :, rotary_dim:], qkv[:, :, i, :, rotary_dim:])
    assert torch.equal(out[:, :, 2], qkv[:, :, 2])


@pytest.mark.parametrize("pattern,sizes,shape", [
    ("b s (three h d) -> b s three h d", {"three": 3, "h": 4}, (2, 5, 72)),
    ("b s ... -> (b s) ...", {}, (2, 5, 3, 4, 6)),
    ("(b s) h d -> b s (h d)", {"b": 2}, (10, 4, 6)),
])
def test_einops_standin_equals_einops_on_their_patterns(pattern, sizes, shape):
    einops = pytest.importorskip("einops")
    x = torch.randn(*shape)
    assert torch.equal(bench.rearrange(x, pattern, **sizes), einops.rearrange(x, pattern, **sizes))


@pytest.mark.skipif(not os.environ.get("DLMTRAIN_MDLM_CHECKOUT"),
                    reason="set DLMTRAIN_MDLM_CHECKOUT to a checkout of kuleshov-group/mdlm")
def test_their_dit_through_standins_equals_our_import():
    import argparse

    ns = bench.load_mdlm(Path(os.environ["DLMTRAIN_MDLM_CHECKOUT"]), force_stubs=("einops", "huggingface_hub"))
    assert {"einops", "huggingface_hub"} <= set(ns.stubbed)
    check = bench.standin_check(ns, argparse.Namespace(vocab=101))
    assert check["dit_max_abs_logit_diff_tc_false"] < 1e-4 and check["dit_max_abs_logit_diff_tc_true"] < 1e-4, check
    assert check["dit_logit_scale"] > 1.0  # random weights: the logits are not trivially zero
