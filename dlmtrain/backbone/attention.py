"""Scaled dot-product attention with document, padding, causal and arbitrary masks.

Two backends compute the same thing:

* ``sdpa``: :func:`torch.nn.functional.scaled_dot_product_attention` with one
  boolean mask (True = may attend) combined from every masking input. Runs
  everywhere; on CUDA it dispatches to fused kernels itself.
* ``flash``: flash-attn (the optional ``flash`` extra). Document masking and
  padding become a packed "varlen" batch (``cu_seqlens``): no L x L mask is ever
  built. It cannot take an arbitrary ``attn_mask``.

``auto`` picks flash when flash-attn is importable, the tensors are fp16/bf16 on
CUDA and there is no arbitrary mask; otherwise sdpa.

A structured ``attn_mask`` may come with a ``block_mask``: a
:class:`torch.nn.attention.flex_attention.BlockMask` of the same mask (the caller's
promise; e.g. block diffusion's, dlmtrain/diffusion/block.py). Under ``auto`` on CUDA,
with no other mask and no dropout, compiled ``flex_attention`` then runs instead of SDPA:
it skips the fully masked tiles and never builds the L x L mask. Everywhere else (CPU,
where flex_attention has no backward; padding; dropout; ``sdpa`` chosen; a failed
compile, reported once) SDPA with ``attn_mask`` computes the same thing.

Masking inputs (all optional, combined with AND):
  causal            query i sees keys j <= i
  segment_ids       [B, L] int; a query sees only keys of its own segment (packed
                    documents). Segments must be contiguous runs along L.
  key_padding_mask  [B, L] bool, True = real token; padding keys are never seen
  attn_mask         bool, broadcastable to [B, H, L, L], True = may attend

A query row that may attend to nothing (e.g. a padding query under a padding mask)
attends to itself instead, so no NaN appears; its output is meaningless and should be
ignored by the caller (under flash-attn it is zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flash")


def _flash_attn():
    try:
        import flash_attn
    except ImportError as e:
        raise ImportError(
            "attention backend 'flash' needs the flash-attn package: `pip install flash-attn` "
            "(or `pip install dlmtrain[flash]`; needs CUDA), or set model.attn_backend=sdpa"
        ) from e
    return flash_attn


_FLEX = {"fn": None, "failed": False}


def _flex_attention():
    """flex_attention compiled once per process (eager flex materialises the scores)."""
    if _FLEX["fn"] is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


class AttentionPlan:
    """The masking of one forward pass, shared by every layer.

    Derived structures (the SDPA boolean mask, flash-attn's cu_seqlens) are built on
    the first call and reused, so a 24-layer model builds them once, not 24 times.
    """

    def __init__(self, *, causal=False, segment_ids=None, key_padding_mask=None, attn_mask=None, backend="auto",
                 block_mask=None):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            raise ValueError(f"attn_mask must be a bool tensor (True = may attend), got {attn_mask.dtype}")
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            raise ValueError(f"attention_mask must be a bool tensor (True = real token), got {key_padding_mask.dtype}")
        self.causal = causal
        self.segment_ids = segment_ids
        self.key_padding_mask = key_padding_mask
        self.attn_mask = attn_mask
        self.backend = backend
        self.block_mask = block_mask  # flex_attention's form of attn_mask (see the module docstring)
        self._sdpa_mask = None  # built lazily
        self._varlen = None

    def choose_backend(self, q: torch.Tensor) -> str:
        if self.backend == "flash":
            _flash_attn()
            if self.attn_mask is not None:
                raise ValueError("the flash backend cannot take an arbitrary attn_mask; use model.attn_backend=sdpa")
            return "flash"
        if self.backend == "sdpa":
            return "sdpa"
        ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and self.attn_mask is None
        return "flash" if ok and flash_available() else "sdpa"

    def use_flex(self, q, dropout_p: float = 0.0) -> bool:
        return (self.block_mask is not None and self.backend == "auto" and q.is_cuda and dropout_p == 0.0
                and not self.causal and self.segment_ids is None and self.key_padding_mask is None
                and not _FLEX["failed"])

    def __call__(self, q, k, v, dropout_p: float = 0.0) -> torch.Tensor:
        """q, k, v: [B, H, L, D] -> [B, H, L, D]."""
        if self.use_flex(q, dropout_p):
            try:
                return _flex_attention()(q, k, v, block_mask=self.block_mask)
            except Exception as e:  # noqa: BLE001 - an unsupported shape/dtype/toolchain: SDPA computes the same
                _FLEX["failed"] = True
                print(f"[dlmtrain] WARNING: flex_attention failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      "using SDPA with the boolean mask from now on", flush=True)
        if self.choose_backend(q) == "flash":
            return self._flash(q, k, v, dropout_p)
        return self._sdpa(q, k, v, dropout_p)

    # ---- SDPA -------------------------------------------------------------------
    def sdpa_mask(self, L: int, device) -> torch.Tensor | None:
        """The combined boolean mask (broadcastable to [B, H, L, L]), or None if only causal/no masking."""
        if self._sdpa_mask is not None:
            return self._sdpa_mask
        m = None
        if self.segment_ids is not None:
            s = self.segment_ids
            m = s[:, None, :, None] == s[:, None, None, :]  # [B, 1, L, L] block diagonal
        if self.key_padding_mask is not None:
            kp = self.key_padding_mask[:, None, None, :]
            m = kp if m is None else m & kp
        if self.attn_mask is not None:
            m = self.attn_mask if m is None else m & self.attn_mask
        if m is None:
            return None
        if self.causal:
            m = m & torch.ones(L, L, dtype=torch.bool, device=device).tril()
        if self.key_padding_mask is not None or self.attn_mask is not None:
            # rows with nothing to attend to attend to themselves (no NaN from softmax over -inf)
            eye = torch.eye(L, dtype=torch.bool, device=device)
            m = m | (eye & ~m.any(-1, keepdim=True))
        self._sdpa_mask = m
        return m

    def _sdpa(self, q, k, v, dropout_p):
        mask = self.sdpa_mask(q.shape[-2], q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=self.causal and mask is None
        )

    # ---- flash-attn ------------------------------------------------------------
    def varlen(self, B: int, L: int, device):
        """(indices of kept tokens in the flattened [B*L], cu_seqlens int32, max_seqlen) or None."""
        if self.segment_ids is None and self.key_padding_mask is None:
            return None
        if self._varlen is None:
            start = torch.ones(B, L, dtype=torch.bool, device=device)
            if self.segment_ids is not None:
                start[:, 1:] = self.segment_ids[:, 1:] != self.segment_ids[:, :-1]
            run = start.reshape(-1).cumsum(0)  # one id per contiguous segment run
            if self.key_padding_mask is not None:
                idx = self.key_padding_mask.reshape(-1).nonzero().squeeze(1)
            else:
                idx = torch.arange(B * L, device=device)
            counts = torch.unique_consecutive(run[idx], return_counts=True)[1]
            cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
            max_len = int(counts.max()) if counts.numel() else 0
            self._varlen = (idx, cu, max_len)
        return self._varlen

    def _flash(self, q, k, v, dropout_p):
        fa = _flash_attn()
        B, H, L, D = q.shape
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flash-attn layout [B, L, H, D]
        meta = self.varlen(B, L, q.device)
        if meta is None:
            out = fa.flash_attn_func(q, k, v, dropout_p, causal=self.causal)
            return out.transpose(1, 2)
        idx, cu, max_len = meta
        flat = [t.reshape(B * L, H, D).index_select(0, idx) for t in (q, k, v)]
        out = torch.zeros(B * L, H, D, dtype=q.dtype, device=q.device)
        if idx.numel():
            packed = fa.flash_attn_varlen_func(*flat, cu, cu, max_len, max_len, dropout_p, causal=self.causal)
            out = out.index_copy(0, idx, packed)
        return out.view(B, L, H, D).transpose(1, 2)


def attention(q, k, v, *, causal=False, segment_ids=None, key_padding_mask=None, attn_mask=None,
              backend="auto", dropout_p=0.0, block_mask=None) -> torch.Tensor:
    """Attention over q, k, v [B, H, L, D] with every mask combined; see the module docstring."""
    plan = AttentionPlan(causal=causal, segment_ids=segment_ids, key_padding_mask=key_padding_mask,
                         attn_mask=attn_mask, backend=backend, block_mask=block_mask)
    return plan(q, k, v, dropout_p)
