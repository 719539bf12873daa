"""Exact denoisers for the gaussian objective on known sources, plugged in as the network's
context logits (``GaussianNet.context_logits``): the module adds the own position's
log-likelihood, so context logits log p(x^i | z^{-i}) make its x0 distribution the exact
posterior p(x^i | z) and e^ the exact posterior mean E[e(x^i) | z].

- i.i.d. tokens with probabilities pi: p(x^i | z^{-i}) = pi.
- the 3-state stationary Markov chain of chain_oracles.py: z is a hidden Markov model with
  Gaussian emissions, so p(x^i | z^{-i}) ∝ (forward message into i) x (backward message into i),
  by forward-backward in log space, exactly, for any length.
Importable from every test directory (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import torch

from dlmtrain import build_module, load_config
from dlmtrain.diffusion.gaussian import loglik_logits


def gaussian_module(vocab: int, *extra: str, seed: int = 0):
    """A small gaussian module (d = 8 unless overridden), no EMA, no self-conditioning unless asked;
    its initial weights (the random embedding table included) depend on ``seed`` only."""
    cfg = load_config(None, ["objective=gaussian", "model=tiny", f"model.vocab_size={vocab}", "optim.ema=0",
                             "model.n_layers=1", "model.hidden_size=32", "model.n_heads=2", "model.cond_dim=16",
                             "objective.embed_dim=8", "objective.self_conditioning=false", *extra])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_module(cfg)


class IIDContext:
    """Context logits log pi at every position, whatever z."""

    def __init__(self, pi: torch.Tensor):
        self.logpi = torch.log(torch.as_tensor(pi, dtype=torch.float64)).float()

    def __call__(self, z, gamma, self_cond=None, attention_mask=None):
        return self.logpi.expand(*z.shape[:2], -1).clone()


class ChainContext:
    """Context logits log p(x^i | z^{-i}) of a stationary chain (P, pi) under Gaussian emissions
    with the module's own embedding table."""

    def __init__(self, module, P: torch.Tensor, pi: torch.Tensor):
        self.net, self.logP, self.logpi = module.backbone, P.double().log(), pi.double().log()

    def __call__(self, z, gamma, self_cond=None, attention_mask=None):
        B, L, _ = z.shape
        em = loglik_logits(z, self.net.table(), gamma).double()  # [B, L, K]
        fwd = torch.empty_like(em)
        bwd = torch.zeros_like(em)
        fwd[:, 0] = self.logpi
        for i in range(1, L):
            f = torch.logsumexp((fwd[:, i - 1] + em[:, i - 1])[..., None] + self.logP, dim=1)
            fwd[:, i] = f - f.logsumexp(-1, keepdim=True)
        for i in range(L - 2, -1, -1):
            b = torch.logsumexp(self.logP + (em[:, i + 1] + bwd[:, i + 1])[:, None, :], dim=2)
            bwd[:, i] = b - b.logsumexp(-1, keepdim=True)
        return (fwd + bwd).float()
