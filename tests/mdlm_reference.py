"""An independent small re-implementation of MDLM's DiT forward (Sahoo et al., 2024; the structure of
kuleshov-group/mdlm models/dit.py, written here from its description, not copied), with their
parameter names, for testing `dlmtrain convert --from mdlm`.

What it computes, per the paper's DiT (Peebles & Xie, 2023) with their choices:
  x = E[ids];  c = silu(MLP(sinusoid_256(sigma)))        sigma := 0 unless time-conditioned
  per block: (sh1, sc1, g1, sh2, sc2, g2) = split6(A c)
             h = LN(x) (1 + sc1) + sh1;  q, k, v = split(W_qkv h) by heads; rotary on q, k
             x = x + g1 * W_o softmax(q k^T / sqrt(d)) v
             h = LN(x) (1 + sc2) + sh2;  x = x + g2 * (W2 gelu_tanh(W1 h + b1) + b2)
  out: (sh, sc) = split2(A_f c);  logits = W_head (LN(x) (1 + sc) + sh) + b_head
LN: LayerNorm without bias, eps 1e-5, times a learned weight. Rotary: angle p * 10000^(-2i/d) applied
to the pair (i, i + d/2) of each head. Every weight is random here (their zero inits would hide a
wrong mapping).
"""

from __future__ import annotations

import math

import torch


def random_dit(vocab: int, hidden: int, n_blocks: int, n_heads: int, cond: int, seed: int = 0, freq: int = 256) -> dict:
    """Random weights under their names (prefix 'backbone.'), including the rotary buffer."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=None):
        scale = scale if scale is not None else 1.0 / math.sqrt(shape[-1])
        return torch.randn(*shape, generator=g) * scale

    sd = {"vocab_embed.embedding": r(vocab, hidden, scale=1.0),
          "sigma_map.mlp.0.weight": r(cond, freq), "sigma_map.mlp.0.bias": r(cond, scale=0.5),
          "sigma_map.mlp.2.weight": r(cond, cond), "sigma_map.mlp.2.bias": r(cond, scale=0.5)}
    hd = hidden // n_heads
    sd["rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    for i in range(n_blocks):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + r(hidden, scale=0.3), b + "attn_qkv.weight": r(3 * hidden, hidden),
            b + "attn_out.weight": r(hidden, hidden), b + "norm2.weight": 1 + r(hidden, scale=0.3),
            b + "mlp.0.weight": r(4 * hidden, hidden), b + "mlp.0.bias": r(4 * hidden, scale=0.3),
            b + "mlp.2.weight": r(hidden, 4 * hidden), b + "mlp.2.bias": r(hidden, scale=0.3),
            b + "adaLN_modulation.weight": r(6 * hidden, cond, scale=0.3), b + "adaLN_modulation.bias": r(6 * hidden, scale=0.3),
        })
    sd.update({
        "output_layer.norm_final.weight": 1 + r(hidden, scale=0.3), "output_layer.linear.weight": r(vocab, hidden),
        "output_layer.linear.bias": r(vocab, scale=0.5),
        "output_layer.adaLN_modulation.weight": r(2 * hidden, cond, scale=0.3),
        "output_layer.adaLN_modulation.bias": r(2 * hidden, scale=0.3),
    })
    return {"backbone." + k: v for k, v in sd.items()}


def _ln(x, w):
    return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=1e-5) * w


def _sinusoid(sigma, dim=256, max_period=10000.0):
    half = dim // 2
    f = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    a = sigma.float()[:, None] * f[None]
    return torch.cat([a.cos(), a.sin()], -1)


def _rotate(x, pos_angles):
    """x [B, L, H, d]: rotate (x_i, x_{i+d/2}) by the angles [L, d/2]."""
    d2 = x.shape[-1] // 2
    cos, sin = pos_angles.cos()[None, :, None], pos_angles.sin()[None, :, None]
    a, b = x[..., :d2], x[..., d2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


@torch.no_grad()
def dit_logits(sd: dict, ids: torch.Tensor, sigma: torch.Tensor, n_heads: int, time_conditioning: bool) -> torch.Tensor:
    """Their DiT's logits [B, L, V] for token ids [B, L] and noise levels sigma [B] (float32, eval mode)."""
    w = {k[len("backbone."):]: v for k, v in sd.items()}
    if not time_conditioning:
        sigma = torch.zeros_like(sigma)
    x = w["vocab_embed.embedding"][ids]
    t = _sinusoid(sigma) @ w["sigma_map.mlp.0.weight"].T + w["sigma_map.mlp.0.bias"]
    c = torch.nn.functional.silu(torch.nn.functional.silu(t) @ w["sigma_map.mlp.2.weight"].T + w["sigma_map.mlp.2.bias"])
    B, L, D = x.shape
    hd = D // n_heads
    angles = torch.arange(L, dtype=torch.float32)[:, None] * w["rotary_emb.inv_freq"][None]
    n_blocks = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    for i in range(n_blocks):
        p = lambda n: w[f"blocks.{i}.{n}"]  # noqa: E731
        mods = (c @ p("adaLN_modulation.weight").T + p("adaLN_modulation.bias"))[:, None].chunk(6, -1)
        sh1, sc1, g1, sh2, sc2, g2 = mods
        h = _ln(x, p("norm1.weight")) * (1 + sc1) + sh1
        q, k, v = (h @ p("attn_qkv.weight").T).view(B, L, 3, n_heads, hd).unbind(2)
        q, k = _rotate(q, angles), _rotate(k, angles)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        y = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(B, L, D)
        x = x + g1 * (y @ p("attn_out.weight").T)
        h = _ln(x, p("norm2.weight")) * (1 + sc2) + sh2
        m = torch.nn.functional.gelu(h @ p("mlp.0.weight").T + p("mlp.0.bias"), approximate="tanh")
        x = x + g2 * (m @ p("mlp.2.weight").T + p("mlp.2.bias"))
    sh, sc = (c @ w["output_layer.adaLN_modulation.weight"].T + w["output_layer.adaLN_modulation.bias"])[:, None].chunk(2, -1)
    h = _ln(x, w["output_layer.norm_final.weight"]) * (1 + sc) + sh
    return h @ w["output_layer.linear.weight"].T + w["output_layer.linear.bias"]


def their_config(hidden: int, n_blocks: int, n_heads: int, cond: int, time_conditioning: bool, **extra) -> dict:
    """The parts of their Hydra config the importer reads (plus a few it ignores)."""
    cfg = {"backbone": "dit", "parameterization": "subs", "diffusion": "absorbing_state", "T": 0,
           "time_conditioning": time_conditioning, "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
           "training": {"ema": 0.9999, "sampling_eps": 1e-3, "antithetic_sampling": True},
           "model": {"name": "test", "type": "ddit", "hidden_size": hidden, "cond_dim": cond, "length": 32,
                     "n_blocks": n_blocks, "n_heads": n_heads, "scale_by_sigma": True, "dropout": 0.1}}
    cfg.update(extra)
    return cfg
