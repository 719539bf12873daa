"""What block diffusion asks of the backbone: repeated rotary positions, a noise level per
position, logits for some positions only, and a flex_attention BlockMask beside the boolean mask."""

import warnings

import pytest
import torch

from dlmtrain.backbone import Backbone, KVCache
from dlmtrain.backbone.attention import AttentionPlan, attention
from dlmtrain.config import ModelConfig
from dlmtrain.diffusion.block import attention_mask, block_causal_mask, mask_mod

V = 13


from chain_oracles import one_thread  # noqa: E402,F401  (autouse: one thread for tiny tensors)


def make(use_cond=False, seed=0):
    torch.manual_seed(seed)
    m = Backbone(ModelConfig(hidden_size=32, n_layers=2, n_heads=4, cond_dim=16, mlp_ratio=2.0), V, use_cond=use_cond)
    with torch.no_grad():
        torch.nn.init.normal_(m.head.weight, std=0.5)
        for b in list(m.blocks) + [m]:
            ada = getattr(b, "ada", None) if b is not m else m.final_ada
            if ada is not None:
                torch.nn.init.normal_(ada.weight, std=0.2)
    return m.eval()


def test_two_copies_at_repeated_positions_equal_two_separate_passes():
    m = make()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, V, (2, 7), generator=g), torch.randint(0, V, (2, 7), generator=g)
    copy = torch.arange(14) >= 7
    with torch.no_grad():
        both = m(torch.cat([a, b], 1), attn_mask=copy[:, None] == copy[None, :], position_ids=torch.arange(7).repeat(2))
        first = m(torch.cat([a, b], 1), attn_mask=copy[:, None] == copy[None, :],
                  position_ids=torch.arange(7).repeat(2), out_positions=slice(0, 7))
    assert torch.allclose(both[:, :7], m(a), atol=1e-5) and torch.allclose(both[:, 7:], m(b), atol=1e-5)
    assert torch.equal(first, both[:, :7]) and both.abs().max() > 1


def test_noise_level_per_position_full_pass_equals_cached_blocks():
    """sigma [B, L] (another value per block) in one block-causal pass = block-by-block decoding
    with a KV cache, each block with its own sigma; a constant [B, L] sigma = the [B] one."""
    m = make(use_cond=True, seed=1)
    g = torch.Generator().manual_seed(1)
    B, L, bs = 2, 10, 4
    x = torch.randint(0, V, (B, L), generator=g)
    s = torch.rand(B, 3, generator=g) * 3
    sig = s[:, torch.arange(L) // bs]
    with torch.no_grad():
        full = m(x, sigma=sig, attn_mask=block_causal_mask(0, L, bs))
        cache = KVCache(L)
        parts = [m(x[:, a:a + bs], sigma=s[:, a // bs], cache=cache) for a in range(0, L, bs)]
        row = m(x, sigma=s[:, 0])
        const = m(x, sigma=s[:, :1].expand(B, L))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    assert torch.allclose(row, const, atol=1e-6) and not torch.allclose(row, full, atol=1e-3)


def test_flex_block_mask_from_mask_mod_computes_the_sdpa_result():
    """flex_attention (eager: forward only on CPU) with the BlockMask built from mask_mod equals
    SDPA with the boolean mask; the plan itself uses flex only on CUDA."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    L, bs = 40, 8
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 2 * L, 16, generator=g) for _ in range(3))
    bm = create_block_mask(mask_mod(L, bs), None, None, 2 * L, 2 * L, device="cpu", BLOCK_SIZE=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        got = flex_attention(q, k, v, block_mask=bm)
    ref = attention(q, k, v, attn_mask=attention_mask(L, bs), backend="sdpa")
    assert torch.allclose(got, ref, atol=1e-5)
    plan = AttentionPlan(attn_mask=attention_mask(L, bs), block_mask=bm)
    assert not plan.use_flex(q)  # CPU: SDPA (flex has no backward here)
    assert torch.allclose(plan(q, k, v), ref)


@pytest.mark.gpu
def test_bd3lm_flex_path_matches_sdpa_on_cuda():
    """Loss and gradients of the compiled flex path equal the SDPA path (CUDA only)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from dlmtrain import build_module, load_config
    from dlmtrain.backbone import attention as att

    cfg = load_config(None, ["objective=bd3lm", "model=tiny", "model.vocab_size=50", "objective.block_size=16",
                             "optim.ema=0"])
    m = build_module(cfg).cuda()
    with torch.no_grad():
        torch.nn.init.normal_(m.backbone.head.weight, std=0.1)
    x = torch.randint(0, 50, (4, 128), device="cuda")
    out = {}
    for backend in ("auto", "sdpa"):
        m.backbone.backend = backend
        m.zero_grad()
        g = torch.Generator(device="cuda").manual_seed(0)
        m.step_generator = lambda device, g=g: g
        loss = m.loss({"input_ids": x})
        loss.backward()
        out[backend] = (loss.item(), m.backbone.blocks[0].attn.qkv.weight.grad.clone())
    assert not att._FLEX["failed"]
    assert out["auto"][0] == pytest.approx(out["sdpa"][0], rel=1e-4)
    assert torch.allclose(out["auto"][1], out["sdpa"][1], rtol=1e-3, atol=1e-6)
