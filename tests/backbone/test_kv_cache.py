"""KV-cache decoding equals the full forward pass: causal (AR), block-causal (block diffusion)."""

import pytest
import torch

from dlmtrain.backbone import Backbone, KVCache
from dlmtrain.config import ModelConfig

V = 29


from chain_oracles import one_thread  # noqa: E402,F401  (autouse: one thread for tiny tensors)


def make(causal=True, use_cond=False, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, n_layers=3, n_heads=4, cond_dim=16, mlp_ratio=2.0, causal=causal)
    m = Backbone(cfg, V, use_cond=use_cond)
    with torch.no_grad():  # the head starts at zero (constant logits): give it signal
        torch.nn.init.normal_(m.head.weight, std=0.5)
        for b in m.blocks:
            if b.ada is not None:
                torch.nn.init.normal_(b.ada.weight, std=0.1)
    return m.eval()


def chunks(L, g, first):
    """Split 0..L into a prefill of ``first`` positions, then random chunks of 1-3."""
    out, i = [(0, first)], first
    while i < L:
        n = int(torch.randint(1, 4, (1,), generator=g))
        out.append((i, min(L, i + n)))
        i += n
    return [c for c in out if c[1] > c[0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_causal_decoding_equals_full_forward(seed):
    g = torch.Generator().manual_seed(seed)
    use_cond = seed == 2
    m = make(causal=True, use_cond=use_cond, seed=seed)
    B, L = 3, int(torch.randint(5, 40, (1,), generator=g))
    x = torch.randint(0, V, (B, L), generator=g)
    sigma = torch.rand(B, generator=g) if use_cond else None
    with torch.inference_mode():
        full = m(x, sigma=sigma)
        cache = KVCache(L + 3)
        parts = [m(x[:, a:b], sigma=sigma, cache=cache) for a, b in chunks(L, g, int(torch.randint(0, L, (1,), generator=g)))]
    got = torch.cat(parts, 1)
    assert cache.length == L
    assert got.shape == full.shape and full.abs().max() > 1.0  # logits carry signal
    assert (got - full).abs().max() < 1e-5


def test_block_decoding_equals_block_causal_full_pass_and_uncommitted_steps_leave_no_trace():
    """A bidirectional backbone decoding blocks of 4 = a full pass with the block-causal mask
    (key block <= query block); a step with commit=False is overwritten by the next one."""
    m = make(causal=False, use_cond=True, seed=3)
    g = torch.Generator().manual_seed(3)
    B, L, blk = 2, 16, 4
    x = torch.randint(0, V, (B, L), generator=g)
    sigma = torch.full((B,), 0.3)
    block = torch.arange(L) // blk
    with torch.inference_mode():
        full = m(x, sigma=sigma, attn_mask=block[None, :] <= block[:, None])
        cache = KVCache(L)
        parts = []
        for a in range(0, L, blk):
            noise = torch.randint(0, V, (B, blk), generator=g)
            m(noise, sigma=sigma, cache=cache, commit=False)  # a denoising pass: not kept
            assert cache.length == a
            parts.append(m(x[:, a:a + blk], sigma=sigma, cache=cache))
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5


def test_attn_mask_over_cached_keys_and_bad_uses():
    """Keys hidden by attn_mask (an earlier document) change nothing; the cache refuses misuse."""
    m = make(causal=True, seed=4)
    x = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        alone = m(x[:, 6:])  # the second document on its own, at positions 0..3
        cache = KVCache(10)
        m(x[:, :6], cache=cache)
        seg = (torch.arange(10) >= 6)
        mask = (seg[None, :] == seg[6:, None])  # [4, 10]: only keys of the same document
        got = m(x[:, 6:], cache=cache, attn_mask=mask)
    # rotary is relative: the same document at positions 6..9 gives the same logits
    assert (got - alone).abs().max() < 1e-4
    with pytest.raises(ValueError, match="holds 10 positions"):
        m(x[:, :1], cache=cache)
    with pytest.raises(ValueError, match="attn_mask"):
        m(x[:, :1], cache=KVCache(4), segment_ids=torch.zeros(2, 1, dtype=torch.long))
