"""Which samplers each objective supports, and what every sampler is handed.

An objective registers its samplers once, beside its class (see dlmtrain/modules/mdlm.py)::

    register_samplers(MDLM, {"ancestral": fn, ...})

A sampler is ``fn(module, fixed, opts, rng) -> (ids, nfe)``: ``fixed`` [B, L] long holds
the conditioning token ids and -1 at the free positions; it returns the finished ids
[B, L] and the number of network evaluations it made for this batch. Lookup follows the
class hierarchy, so a subclass of an objective inherits its samplers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dlmtrain.errors import ConfigError

_REGISTRY: dict[type, dict[str, Callable]] = {}


def register_samplers(objective: type, samplers: dict[str, Callable]) -> None:
    _REGISTRY.setdefault(objective, {}).update(samplers)


def samplers_for(module) -> dict[str, Callable]:
    """The samplers ``module``'s objective supports (name -> function), nearest class first."""
    out: dict[str, Callable] = {}
    for cls in reversed(type(module).__mro__):
        out.update(_REGISTRY.get(cls, {}))
    return out


def supported_samplers(module) -> list[str]:
    return list(samplers_for(module))


def get_sampler(module, name: str) -> Callable:
    table = samplers_for(module)
    if name not in table:
        known = ", ".join(table) or "none (this objective registers no sampler)"
        raise ConfigError(f"sampler={name!r} is not supported by {type(module).__name__}; choose one of: {known}")
    return table[name]


@dataclass
class SamplerOptions:
    """The knobs of sampling.* (dlmtrain/config.py SamplingConfig), checked by sample()."""

    steps: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    float64: bool = True
    cache: bool = True
    confidence: str = "max_prob"
    block_len: int = 32
    inner: str = "ancestral"
    cfg_scale: float = 0.0
    stop_at_eos: bool = False  # samplers that can (block diffusion) stop once every row drew EOS
    clamp: bool = False  # gaussian samplers: snap the x0 estimate to its argmax token (Diffusion-LM)
    on_nfe: Callable[[int], None] | None = None  # progress hook: called with each evaluation's count


class Rng:
    """Fresh generators keyed by (seed, batch, *keys): a draw depends on where it is made
    in the sampler, never on how many draws came before (the ancestral cache relies on it)."""

    def __init__(self, seed: int, batch: int, device):
        self.seed, self.batch, self.device = int(seed), int(batch), torch.device(device)

    def __call__(self, *keys: int) -> torch.Generator:
        h = (self.seed * 1_000_003 + self.batch) & (2**62 - 1)
        for k in keys:
            h = (h * 6364136223846793005 + 1442695040888963407 + int(k)) % (2**62)
        return torch.Generator(device=self.device).manual_seed(h)
