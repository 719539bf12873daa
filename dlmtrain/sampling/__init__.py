"""Samplers behind one interface: ``sample(module, num_samples, seq_len, steps, sampler=...)``.

Objectives register the samplers they support (registry.py); the masked-diffusion family
(ancestral, first_hitting, confidence, semi_ar) and what ``steps`` means for each is in
masked.py, SEDD's (euler, tweedie) in sedd.py, block diffusion's (the masked loops inside blocks,
KV cache of the clean prefix) in block.py; categorical draws (float64, temperature, top-k, top-p) in categorical.py.
"""

from dlmtrain.sampling.api import SampleResult, conditioning, sample, sample_from_config
from dlmtrain.sampling.registry import register_samplers, supported_samplers

__all__ = ["sample", "sample_from_config", "SampleResult", "conditioning", "register_samplers",
           "supported_samplers"]
