"""Exponential moving average of weights, stored by parameter name.

Stored by name (not by position, as some peers do) so a checkpoint's EMA survives
reordering, added parameters and conversion tools that read it without the model.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad
        }
        self.num_updates = 0
        self._backup: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        # Warm-up as in Polyak averaging with a growing horizon: early EMA tracks the weights.
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for n, p in model.named_parameters():
            if n in self.shadow:
                s = self.shadow[n]
                if s.device != p.device:
                    s = self.shadow[n] = s.to(p.device)
                s.lerp_(p.detach().float(), 1.0 - d)

    @torch.no_grad()
    def swap_in(self, model: nn.Module) -> None:
        """Load the EMA weights into ``model``, keeping the training weights aside."""
        if self._backup is not None:
            return
        self._backup = {}
        for n, p in model.named_parameters():
            if n in self.shadow:
                self._backup[n] = p.detach().clone()
                p.copy_(self.shadow[n].to(p.device, p.dtype))

    @torch.no_grad()
    def swap_out(self, model: nn.Module) -> None:
        """Put the training weights back."""
        if self._backup is None:
            return
        for n, p in model.named_parameters():
            if n in self._backup:
                p.copy_(self._backup[n])
        self._backup = None

    @property
    def active(self) -> bool:
        return self._backup is not None

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """Temporarily load the EMA weights into ``model`` (validation, sampling)."""
        was_active = self.active
        self.swap_in(model)
        try:
            yield
        finally:
            if not was_active:
                self.swap_out(model)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        self.num_updates = int(state["num_updates"])
        for n in self.shadow:
            self.shadow[n] = state["shadow"][n].float().to(self.shadow[n].device)
