"""The one transformer every diffusion objective shares.

Read top to bottom: helpers, rotary embeddings, time conditioning, attention, MLP,
block, then :class:`Backbone`. Pre-norm blocks with rotary positions; with
``use_cond`` every block (and the final norm) is modulated by the noise level
through adaLN-Zero (DiT, Peebles & Xie 2023): shift/scale after the norm and a gate
on the residual branch, all produced by zero-initialised linears so each block starts
as the identity. Bidirectional by default; ``cfg.causal`` gives the AR baseline.
Incremental decoding with a key/value cache: kv_cache.py.

The model knows nothing of parallelism: ``Backbone.blocks`` is a ModuleList that
distributed code wraps (activation checkpointing, FSDP) from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dlmtrain.backbone.attention import AttentionPlan
from dlmtrain.backbone.chunked_ce import chunked_linear_nll


def segment_ids_from_eos(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document index per position; the EOS token belongs to the document it ends.

    ``[a b EOS c d EOS e] -> [0 0 0 1 1 1 2]``.
    """
    is_eos = (input_ids == eos_id).long()
    return is_eos.cumsum(-1) - is_eos


def _opt(cfg, name: str, default):
    """An optional model setting (cfg may be a dataclass, a DictConfig or a plain namespace)."""
    return getattr(cfg, name, default)


def ffn_width(cfg) -> int:
    """MLP hidden width: ``mlp_width`` if set, else mlp_ratio * hidden_size rounded up to a multiple of 64."""
    if _opt(cfg, "mlp_width", 0):
        return int(cfg.mlp_width)
    return 64 * math.ceil(cfg.mlp_ratio * cfg.hidden_size / 64)


def make_norm(cfg) -> nn.Module:
    eps = float(_opt(cfg, "norm_eps", 1e-6))
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.hidden_size, eps=eps)
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.hidden_size, eps=eps, bias=False)
    raise ValueError(f"model.norm={cfg.norm!r} is not one of: rmsnorm, layernorm")


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def adaln(linear: nn.Module, c: torch.Tensor, n: int):
    """The n modulation tensors of conditioning c: [B, cond] -> n x [B, 1, C] (one per row),
    [B, L, cond] -> n x [B, L, C] (one per position)."""
    out = linear(c)
    return (out[:, None] if out.dim() == 2 else out).chunk(n, dim=-1)


class Rotary(nn.Module):
    """Rotary position embeddings (RoFormer, Su et al. 2021), rotate-half layout.

    cos/sin tables are computed on the fly and cached per (length, device) in eager
    mode; nothing is stored in the state dict.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self._cache: dict = {}

    def _tables(self, positions: torch.Tensor):
        inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, device=positions.device).float() / self.head_dim)
        freqs = positions.float()[..., None] * inv_freq  # [..., L, D/2]
        return freqs.cos(), freqs.sin()

    def forward(self, L: int, device, position_ids: torch.Tensor | None = None):
        """(cos, sin), each [L, D/2] or [B, L, D/2] for explicit position_ids."""
        if position_ids is not None:
            return self._tables(position_ids)
        if torch.compiler.is_compiling():
            return self._tables(torch.arange(L, device=device))
        key = (L, str(device))
        cached = self._cache.get(key)
        # Tables made under inference_mode (validation) cannot enter autograd later: rebuild.
        if cached is None or (cached[0].is_inference() and not torch.is_inference_mode_enabled()):
            with torch.inference_mode(False):
                cached = self._cache[key] = self._tables(torch.arange(L, device=device))
        return cached


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + D/2]) by the angles in cos/sin (rotate-half layout).

    cos/sin broadcast against x[..., :D/2]; the rotation runs in float32.
    """
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class TimeEmbedding(nn.Module):
    """sigma [B] (or [B, L], one per position) -> sinusoidal features -> MLP -> [B(, L), cond_dim].

    sigma is embedded as given (freq_dim / 2 frequencies 1 ... 1e-4 rad per unit, cos then sin,
    as in DiT); objectives choose whether they pass t in [0, 1] or a noise level.
    """

    def __init__(self, cond_dim: int, freq_dim: int = 0):
        super().__init__()
        self.dim = freq_dim or cond_dim
        self.mlp = nn.Sequential(nn.Linear(self.dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device).float() / half)
        args = sigma.float()[..., None] * freqs
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return self.mlp(emb)


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.proj.residual = True  # scaled init
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, plan: AttentionPlan):
        B, L, C = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.n_heads, C // self.n_heads)
        cos, sin = (t.unsqueeze(-2).unsqueeze(-2) for t in rope)  # [(B,) L, 1, 1, D/2]
        qk = apply_rotary(qkv[:, :, :2], cos, sin)  # q and k rotated in one go
        q, k, v = (t.transpose(1, 2) for t in (*qk.unbind(2), qkv[:, :, 2]))  # [B, H, L, D]
        y = plan(q, k, v, self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, L, C)))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020) or GELU-tanh; width from :func:`ffn_width`."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"model.mlp={cfg.mlp!r} is not one of: swiglu, gelu")
        self.gated = cfg.mlp == "swiglu"
        width, bias = ffn_width(cfg), bool(_opt(cfg, "mlp_bias", False))
        self.up = nn.Linear(cfg.hidden_size, (2 if self.gated else 1) * width, bias=bias)
        self.down = nn.Linear(width, cfg.hidden_size, bias=bias)
        self.down.residual = True  # scaled init
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.up(x)
        if self.gated:
            gate, val = h.chunk(2, dim=-1)
            h = F.silu(gate) * val
        else:
            h = F.gelu(h, approximate="tanh")
        return self.drop(self.down(h))


class Block(nn.Module):
    """Pre-norm attention + MLP; with ``use_cond`` adaLN-Zero modulated."""

    def __init__(self, cfg, use_cond: bool):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), SelfAttention(cfg)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        self.ada = nn.Linear(cfg.cond_dim, 6 * cfg.hidden_size) if use_cond else None
        if self.ada is not None:
            self.ada.zero_init = True

    def forward(self, x, rope, plan: AttentionPlan, c: torch.Tensor | None = None):
        if self.ada is None:
            x = x + self.attn(self.norm1(x), rope, plan)
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = adaln(self.ada, c, 6)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope, plan)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class VocabHead(nn.Linear):
    """Output projection computed in float32, also under bf16 autocast.

    With ``targets`` it returns -log softmax(x W^T + b)[target] per row instead of the logits,
    chunked (chunked_ce.py): the [rows x V] float32 logits never exist at once. Called through
    this forward (not by reading ``weight`` from outside) so sharding hooks gather the weight."""

    def forward(self, x, targets=None, exclude: int = -1, chunk_size: int = 0):
        if targets is not None:
            return chunked_linear_nll(x, self.weight, self.bias, targets, exclude, chunk_size)
        dtype = torch.promote_types(x.dtype, torch.float32)  # float32 (float64 stays float64)
        with torch.autocast(device_type=x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.to(dtype)
            return F.linear(x.to(dtype), self.weight.to(dtype), bias)


class Backbone(nn.Module):
    """Token ids or embeddings (+ optional noise level) -> float32 logits [B, L, out_dim].

    Args:
        cfg: a ModelConfig-like object (dataclass or DictConfig; attributes are read).
        vocab_size: rows of the token embedding (including objective-added ids such as [MASK]);
            0: no token embedding, the backbone reads ``inputs_embeds`` only (then out_dim is required).
        use_cond: build adaLN-Zero conditioning on ``sigma``. With ``cfg.adaln_always`` it is built
            anyway and, when the objective passes no sigma, gets sigma = 0 (a constant
            modulation: MDLM's DiT trained with time_conditioning=False).
        out_dim: output width (default vocab_size). Tied to the embedding only when
            ``cfg.tie_weights`` and ``out_dim == vocab_size``.
    """

    def __init__(self, cfg, vocab_size: int, use_cond: bool = False, out_dim: int | None = None):
        super().__init__()
        if cfg.hidden_size % cfg.n_heads or (cfg.hidden_size // cfg.n_heads) % 2:
            raise ValueError(f"hidden_size={cfg.hidden_size} must split into n_heads={cfg.n_heads} heads of even width")
        # adaln_always: MDLM zeroes sigma when not time-conditioned but keeps the adaLN layers
        self.zero_sigma = not use_cond and bool(_opt(cfg, "adaln_always", False))
        use_cond = use_cond or self.zero_sigma
        self.cfg, self.vocab_size, self.use_cond = cfg, vocab_size, use_cond
        self.out_dim = out_dim or vocab_size
        if self.out_dim <= 0:
            raise ValueError("Backbone(vocab_size=0) reads inputs_embeds only: pass out_dim")
        self.causal, self.document_mask, self.eos_id = bool(cfg.causal), bool(cfg.document_mask), int(cfg.eos_id)
        self.backend = str(cfg.attn_backend)

        self.embed = nn.Embedding(vocab_size, cfg.hidden_size) if vocab_size > 0 else None
        self.rotary = Rotary(cfg.hidden_size // cfg.n_heads, cfg.rope_theta)
        self.time = TimeEmbedding(cfg.cond_dim, int(_opt(cfg, "time_freq_dim", 0))) if use_cond else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, use_cond) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.final_ada = nn.Linear(cfg.cond_dim, 2 * cfg.hidden_size) if use_cond else None
        self.head = VocabHead(cfg.hidden_size, self.out_dim, bias=bool(_opt(cfg, "head_bias", False)))
        self.tied = bool(cfg.tie_weights) and self.out_dim == vocab_size and self.embed is not None
        if self.tied:
            self.head.weight = self.embed.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """normal(0, init_std) everywhere; residual projections / sqrt(2 n_layers);
        adaLN modulation zero; untied head zero (uniform predictions at init)."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                s = std / math.sqrt(2 * self.cfg.n_layers) if getattr(m, "residual", False) else std
                nn.init.normal_(m.weight, 0.0, s)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(m.weight)
        for m in [b.ada for b in self.blocks] + [self.final_ada]:
            if m is not None:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        if not self.tied:
            nn.init.zeros_(self.head.weight)

    def forward(self, input_ids=None, *, inputs_embeds=None, sigma=None, segment_ids=None,
                attention_mask=None, attn_mask=None, position_ids=None, cache=None, commit=True,
                block_mask=None, out_positions: slice | None = None, out_mask=None, targets=None,
                exclude: int = -1, chunk_size: int = 0) -> torch.Tensor:
        """See the class docstring; the masks combine with AND (see attention.py).

        input_ids [B, L] or inputs_embeds [B, L, hidden] (exactly one); sigma [B], or [B, L] for
        a noise level per position (used iff use_cond); segment_ids [B, L]; attention_mask
        [B, L] bool (True = real token); attn_mask bool broadcastable to [B, H, L, L] (True =
        may attend); block_mask: the same mask as a flex_attention BlockMask (a fast path on
        CUDA, attention.py); position_ids [L] or [B, L] (rotary positions; default 0..L-1;
        repeats allowed); out_positions: only these positions go through the output norm and
        head (the logits of the others are not needed, e.g. block diffusion's clean copy).
        out_mask [B, L] bool: likewise, but any positions; the result is then [M, out_dim] for the
        M selected positions in row-major order (``x[out_mask]``). With ``targets`` [M] the head
        returns the chunked -log softmax(logits)[target] [M] instead (VocabHead; ``exclude``: a
        column kept out of the softmax, e.g. [MASK] under SUBS; ``chunk_size`` rows at a time).

        cache: a :class:`~dlmtrain.backbone.kv_cache.KVCache`; the L positions are then the next
        ones after those it holds (kv_cache.py), attn_mask is over [B, H, L, cached + L] and
        stands in for segment_ids / attention_mask (not accepted here); ``commit`` keeps them.
        """
        if cache is not None:
            return self._forward_cached(input_ids, inputs_embeds, sigma, attn_mask, cache, commit,
                                        segment_ids, attention_mask, position_ids, block_mask, out_positions)
        x, c = self._embed(input_ids, inputs_embeds, sigma)
        B, L, _ = x.shape

        if segment_ids is None and self.document_mask:
            if input_ids is None:
                raise ValueError("model.document_mask needs segment_ids when inputs_embeds are given")
            if self.eos_id < 0:
                raise ValueError("model.document_mask needs model.eos_id >= 0 (or pass segment_ids)")
            segment_ids = segment_ids_from_eos(input_ids, self.eos_id)
        plan = AttentionPlan(causal=self.causal, segment_ids=segment_ids, key_padding_mask=attention_mask,
                             attn_mask=attn_mask, backend=self.backend, block_mask=block_mask)
        rope = self.rotary(L, x.device, position_ids)

        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, plan, c)
        if out_positions is not None:
            x = x[:, out_positions]
            c = c[:, out_positions] if c is not None and c.dim() == 3 else c
        if out_mask is not None:
            # one pseudo-row [1, M, .] so per-position conditioning broadcasts as usual
            x = x[out_mask][None]
            if c is not None:
                c = (c if c.dim() == 3 else c[:, None].expand(B, L, c.shape[-1]))[out_mask][None]
            if targets is not None:
                return self._out(x, c, targets, exclude, chunk_size)[0]
            return self._out(x, c)[0]
        return self._out(x, c)

    def _embed(self, input_ids, inputs_embeds, sigma):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None and self.embed is None:
            raise ValueError("this backbone has no token embedding (vocab_size=0): pass inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        c = None
        if self.use_cond:
            if self.zero_sigma:
                sigma = torch.zeros(x.shape[0], device=x.device)
            if sigma is None:
                raise ValueError("this backbone is time-conditioned (use_cond=True): pass sigma [B]")
            sigma = torch.as_tensor(sigma, device=x.device)
            sigma = sigma.expand(x.shape[:2]) if sigma.dim() == 2 else sigma.reshape(-1).expand(x.shape[0])
            c = F.silu(self.time(sigma))
        return x, c

    def _out(self, x, c, targets=None, exclude=-1, chunk_size=0):
        x = self.norm(x)
        if self.final_ada is not None:
            shift, scale = adaln(self.final_ada, c, 2)
            x = modulate(x, shift, scale)
        if targets is not None:
            return self.head(x[0], targets, exclude, chunk_size)[None]
        return self.head(x)

    def _forward_cached(self, input_ids, inputs_embeds, sigma, attn_mask, cache, commit, *unsupported):
        if any(a is not None for a in unsupported):
            raise ValueError("with a cache, segment_ids / attention_mask / position_ids are not accepted: "
                             "express documents and padding as attn_mask over the cached keys")
        x, c = self._embed(input_ids, inputs_embeds, sigma)
        step = cache.step(x.shape[1], self.causal, attn_mask, x.device)
        cos, sin = self.rotary(cache.max_len, x.device)  # one table per cache size, sliced
        rope = (cos[step.start:step.end], sin[step.start:step.end])
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, step.layer(i), c)
        if commit:
            cache.length = step.end
        return self._out(x, c)


def count_params(module: nn.Module, non_embedding: bool = False) -> int:
    """Number of (unique) parameters; ``non_embedding`` leaves out token embeddings and
    the output head (the vocabulary-sized matrices), as in Kaplan et al. 2020."""
    skip = set()
    if non_embedding:
        for m in module.modules():
            if isinstance(m, (nn.Embedding, VocabHead)):
                skip.update(id(p) for p in m.parameters())
    return sum(p.numel() for p in module.parameters() if id(p) not in skip)


def param_summary(module: nn.Module) -> str:
    """Parameter counts per top-level child, the total and the non-embedding total."""
    rows = [(name, count_params(child)) for name, child in module.named_children()]
    rows = [r for r in rows if r[1]]
    rows += [("total", count_params(module)), ("non-embedding", count_params(module, non_embedding=True))]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {n:>15,}" for name, n in rows)


def flops_per_token(cfg, seq_len: int, vocab_size: int) -> float:
    """Training (forward + backward) FLOPs per token, PaLM appendix B / Chinchilla style.

    6 * N_matmul + 12 * n_layers * hidden * seq_len, where N_matmul counts the weights of
    every per-token matmul (attention qkv + out, MLP, output head hidden x vocab_size;
    not the embedding lookup, norms or the per-sequence time conditioning), and the
    second term is QK^T and AV (2 * 2 * L * hidden per layer forward, x3 for backward).
    The attention term is not halved for causal models (the PaLM convention).
    """
    h, n = cfg.hidden_size, cfg.n_layers
    mlp = (3 if cfg.mlp == "swiglu" else 2) * h * ffn_width(cfg)
    n_matmul = n * (4 * h * h + mlp) + h * vocab_size
    return 6.0 * n_matmul + 12.0 * n * h * seq_len
