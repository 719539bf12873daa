"""The shared backbone: ``Backbone`` plus helpers for masks, parameter and FLOP counts, and a KV cache."""

from dlmtrain.backbone.attention import AttentionPlan, attention
from dlmtrain.backbone.kv_cache import KVCache
from dlmtrain.backbone.transformer import (
    Backbone,
    count_params,
    ffn_width,
    flops_per_token,
    param_summary,
    segment_ids_from_eos,
)

__all__ = [
    "Backbone", "segment_ids_from_eos", "count_params", "flops_per_token", "ffn_width", "param_summary",
    "attention", "AttentionPlan", "KVCache",
]
