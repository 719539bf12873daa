"""The autoregressive likelihood, exactly: -log p(x) = sum_i -log p(x_i | x_<i) (no Monte Carlo).

First token: the network reads a start token, an input id of its own that is never
predicted, where a sequence begins. Input position i holds x_{i-1} (the start token at
i = 0) and its output is p(x_i | x_<i), so position 0 is p(x_0 | start) and every token of
x is scored: L tokens, L terms.

With document segments (``segment_ids``, a new document right after each EOS, the EOS
belonging to the document it ends), every document begins with the start token too and
attention stays inside it, so a row's likelihood is the product of its documents'
likelihoods, each scored as a sequence of its own. The segment of x_i is a function of
x_<i (the number of EOS before i), so this is still an exact autoregressive distribution
over the row, EOS tokens included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_right(x: torch.Tensor, start_id: int, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The network's inputs for targets x [B, L]: x moved one place right, ``start_id`` at
    position 0 and, with ``segment_ids``, at the first position of every document."""
    inp = torch.empty_like(x)
    inp[:, 0] = start_id
    inp[:, 1:] = x[:, :-1]
    if segment_ids is not None:
        starts = torch.zeros_like(x, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        inp = inp.masked_fill(starts, start_id)
    return inp


def token_nll(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor | None = None) -> torch.Tensor:
    """-log p(x_i | x_<i) [B, L] from logits [B, L, V] (float32 or wider); 0 where not ``scored``."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    return nll if scored is None else nll.masked_fill(~scored, 0.0)
