"""The shared backbone: ``Backbone`` plus helpers for masks, parameter and FLOP counts."""

from dlmtrain.backbone.attention import AttentionPlan, attention
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
    "attention", "AttentionPlan",
]
