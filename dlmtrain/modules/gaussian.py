"""Gaussian: continuous diffusion of learned token embeddings (math in diffusion/gaussian.py).

Diffusion-LM (Li et al., 2022), CDCD (Dieleman et al., 2022) and Plaid (Gulrajani &
Hashimoto, 2023) on the shared backbone, with VDM's bound (Kingma et al., 2021).

What is learned (all in ``self.backbone``, a :class:`GaussianNet`, so the optimizer, EMA and
checkpoints see it): the token embeddings (V x d, rows normalised to unit norm), an input
projection d -> hidden (of z_t rescaled to unit variance per dimension), the transformer
(``Backbone`` without a token embedding, conditioned on gamma(t) = -log SNR through adaLN, V
output logits), a zero-initialised projection of the self-conditioning input, and with
``objective.schedule=learned`` the noise schedule.

Denoiser: x0 logits = the transformer's context logits + the own position's exact
log-likelihood under each token (diffusion/gaussian.py ``loglik_logits``); the embedding
estimate e^ is their softmax expectation over the embedding table.

Self-conditioning (Chen et al., 2023, "Analog Bits"): the network also reads a previous
estimate of e^ through its own projection, added to the input. Training: with probability
``objective.self_cond_prob`` a row first runs the denoiser without it (no gradient) and feeds
that estimate back; other rows get zeros. ``nelbo``: always self-conditioned on the first
pass at the same z_t (two network passes per draw); e^ is still a function of (z_t, t) only,
so the bound stays valid. Samplers feed the previous step's estimate (one pass per step).

``nelbo`` per sequence, every term (diffusion/gaussian.py): reconstruction E -log p(x | z_0)
(VDM's decoder at gamma_min, one noise draw) + the diffusion integral at one stratified t
+ the prior KL at gamma_max, summed over the scored (non-padding) positions.
``eval.discrete_steps = T`` reports the T-step bound too (VDM eq. 13).

Learned schedule: the endpoints get the bound's gradient; the interior, which leaves the
bound unchanged in expectation, gets the gradient of E[L_diff^2] instead, i.e. its gradient
is rescaled by 2 L_diff per row (VDM: minimise the estimator's variance; checked in
tests/test_gaussian.py). ``model.document_mask`` is refused: noisy embeddings do not show where documents
end, so a sampler could not know the boundaries. ``model.tie_weights`` has no effect.
Samplers: dlmtrain/sampling/gaussian.py (ddpm = ancestral, ddim).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from dlmtrain.backbone import Backbone
from dlmtrain.diffusion.d3pm import draw_steps
from dlmtrain.diffusion.gaussian import (diffuse, diffusion_term, discrete_diffusion_term, input_scale, loglik_logits,
                                         make_gamma, normalize_embeddings, prior_kl, reconstruction_nll, x0_embedding)
from dlmtrain.diffusion.schedules import draw_times
from dlmtrain.errors import ConfigError
from dlmtrain.modules.base import DiffusionModule
from dlmtrain.sampling.gaussian import GAUSSIAN_SAMPLERS
from dlmtrain.sampling.registry import register_samplers


class GaussianNet(nn.Module):
    """Embeddings, schedule, projections and transformer: everything the objective learns."""

    def __init__(self, m, o):
        super().__init__()
        self.vocab_size, self.dim = int(m.vocab_size), int(o.embed_dim or m.hidden_size)
        self.embedding = nn.Embedding(self.vocab_size, self.dim)
        nn.init.normal_(self.embedding.weight)  # random directions; the scale is normalised away
        self.gamma = make_gamma(o.schedule, o.gamma_min, o.gamma_max)  # an nn.Module only when learned
        self.in_proj = nn.Linear(self.dim, m.hidden_size, bias=False)
        self.self_cond = nn.Linear(self.dim, m.hidden_size, bias=False) if o.self_conditioning else None
        if self.self_cond is not None:
            nn.init.zeros_(self.self_cond.weight)  # starts as the plain denoiser
        self.transformer = Backbone(m, vocab_size=0, use_cond=True, out_dim=self.vocab_size)

    @property
    def out_dim(self) -> int:
        return self.vocab_size

    @property
    def blocks(self) -> nn.ModuleList:  # what parallel wrappers (activation checkpointing, FSDP) look for
        return self.transformer.blocks

    def table(self) -> torch.Tensor:
        """The normalised embedding table [V, d] (float32)."""
        return normalize_embeddings(self.embedding.weight)

    def schedule(self, t: torch.Tensor, grad_scale: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma(t), gamma'(t)) float32, shaped like t."""
        if self.gamma.learned:
            return self.gamma(t.float(), grad_scale)
        return tuple(x.float() for x in self.gamma(t.double()))

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma(0), gamma(1)) as float32 tensors (learned: with gradients)."""
        if self.gamma.learned:
            return self.gamma.endpoints()
        dev = self.embedding.weight.device
        return torch.tensor(self.gamma.g0, device=dev), torch.tensor(self.gamma.g1, device=dev)

    def context_logits(self, z, gamma, self_cond=None, attention_mask=None) -> torch.Tensor:
        """The transformer's share of the x0 logits [B, L, V]: what the other positions say."""
        scale = input_scale(gamma.float(), self.dim)[:, None, None]
        h = self.in_proj((z * scale).to(self.in_proj.weight.dtype))
        if self.self_cond is not None:  # e^ has norm <= 1: x sqrt(d) for unit variance per dimension
            sc = torch.zeros_like(z) if self_cond is None else self_cond * self.dim ** 0.5
            h = h + self.self_cond(sc.to(self.self_cond.weight.dtype))
        return self.transformer(inputs_embeds=h, sigma=gamma, attention_mask=attention_mask)

    def forward(self, z, gamma, self_cond=None, attention_mask=None, table=None) -> torch.Tensor:
        """x0 logits [B, L, V] (float32) at noisy embeddings z [B, L, d] and gamma [B]: context
        logits + the own position's log-likelihood under each token."""
        table = self.table() if table is None else table
        ctx = self.context_logits(z, gamma, self_cond, attention_mask)
        return ctx.float() + loglik_logits(z, table, gamma)


def _randn(shape, generator, device) -> torch.Tensor:
    dev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=dev).to(device)


class Gaussian(DiffusionModule):
    discrete_bound = True
    mask_id = None

    def __init__(self, cfg: DictConfig | None = None, config: dict | None = None):
        super().__init__(cfg, config)
        m = self.cfg.model
        if m.document_mask:
            raise ConfigError("model.document_mask=true with objective gaussian: noisy embeddings do not show where "
                              "documents end, so sampling could not know the boundaries; set model.document_mask=false")
        self.backbone = GaussianNet(m, self.cfg.objective)
        self.n_tokens = int(m.vocab_size)

    # ---- the bound ---------------------------------------------------------------------------
    def denoise_logits(self, z, gamma, self_cond=None, attention_mask=None, table=None) -> torch.Tensor:
        """x0 logits [B, L, V]; gamma a scalar or [B]."""
        gamma = torch.as_tensor(gamma, dtype=torch.float32, device=z.device).reshape(-1).expand(z.shape[0])
        return self.backbone(z, gamma, self_cond, attention_mask, table)

    def _e_hat(self, z, gamma, table, attention_mask, sc_rows) -> torch.Tensor:
        """e^(z_t) [B, L, d]; rows in sc_rows [B] (bool) are self-conditioned on a first pass."""
        sc = None
        if self.backbone.self_cond is not None:
            sc = torch.zeros_like(z)
            if sc_rows is not None and bool(sc_rows.any()):
                with torch.no_grad():
                    first = x0_embedding(self.backbone(z, gamma.detach(), sc, attention_mask, table.detach()),
                                         table.detach())
                sc = torch.where(sc_rows[:, None, None], first, sc)
        return x0_embedding(self.backbone(z, gamma, sc, attention_mask, table), table)

    def nelbo_terms(self, x0, t, attention_mask=None, generator=None, sc_rows=None, discrete_steps=0,
                    grad_scale=None) -> dict:
        """One draw of each term per position [B, L] (float32, 0 at padding) at times t [B]:
        ``diffusion`` (continuous, or the T-step term with discrete_steps = T), ``reconstruction``,
        ``prior``. ``sc_rows`` [B] bool: self-conditioned rows (None: all, when enabled)."""
        net = self.backbone
        B, L = x0.shape
        dev = x0.device
        if sc_rows is None:
            sc_rows = torch.ones(B, dtype=torch.bool, device=dev)
        table = net.table()
        e = table[x0]
        if discrete_steps > 0:
            i = draw_steps(t, discrete_steps).to(dev)
            gamma_s, _ = net.schedule((i - 1).double() / discrete_steps)
            gamma, _ = net.schedule(i.double() / discrete_steps)
        else:
            gamma, dgamma = net.schedule(t.to(dev), grad_scale)
        z = diffuse(e, gamma, _randn(e.shape, generator, dev))
        am = None if attention_mask is None else attention_mask.bool()
        e_hat = self._e_hat(z, gamma, table, am, sc_rows)
        if discrete_steps > 0:
            diff = discrete_diffusion_term(e, e_hat, gamma_s, gamma, discrete_steps)
        else:
            diff = diffusion_term(e, e_hat, gamma, dgamma)
        gamma_0, gamma_1 = net.endpoints()
        z0 = diffuse(e, gamma_0, _randn(e.shape, generator, dev))
        terms = {"diffusion": diff, "reconstruction": reconstruction_nll(z0, x0, table, gamma_0),
                 "prior": prior_kl(e, gamma_1)}
        scored = torch.ones_like(x0, dtype=torch.bool) if am is None else am
        return {k: torch.where(scored, v, torch.zeros_like(v)) for k, v in terms.items()}

    def loss(self, batch: dict) -> torch.Tensor:
        x0, am = batch["input_ids"], batch.get("attention_mask")
        o = self.cfg.objective
        b = x0.shape[0]
        g = self.step_generator(x0.device)
        t = self.training_times(x0, g)
        sc_rows = (torch.rand(b, generator=g, device=g.device) < o.self_cond_prob).to(x0.device)
        grad_scale = [None]
        terms = self.nelbo_terms(x0, t, am, g, sc_rows, grad_scale=grad_scale)
        grad_scale[0] = 2.0 * terms["diffusion"].detach().sum(-1)  # learned schedule: d E[L_diff^2] on the interior
        total = sum(terms.values()).sum()
        return total / self.scored_tokens(x0, am).sum().clamp_min(1)

    def nelbo_draws(self, input_ids, attention_mask=None, num_samples=1, generator=None, segment_ids=None,
                    discrete_steps=0):
        """(nats [B, K], t [B, K]): K draws per sequence, times stratified (see draw_times); with
        discrete_steps = T the T-step bound and the grid time i/T of each draw."""
        b, dev = input_ids.shape[0], input_ids.device
        t = draw_times(b, num_samples, antithetic=self.cfg.objective.antithetic, generator=generator, device=dev)
        nats = torch.stack([
            sum(self.nelbo_terms(input_ids, t[:, k], attention_mask, generator,
                                 discrete_steps=discrete_steps).values()).double().sum(-1)
            for k in range(num_samples)
        ], 1)
        if discrete_steps > 0:
            t = (draw_steps(t, discrete_steps).double() / discrete_steps).to(t.dtype)
        return nats.float(), t

    # ---- what the samplers use (dlmtrain/sampling/gaussian.py) --------------------------------
    @torch.no_grad()
    def gamma_grid(self, steps: int) -> torch.Tensor:
        """gamma on the uniform grid 1 = t_0 > ... > t_steps = 0, float64 [steps + 1] on the CPU."""
        t = torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64,
                           device=self.backbone.embedding.weight.device)
        return self.backbone.schedule(t)[0].double().cpu()


register_samplers(Gaussian, GAUSSIAN_SAMPLERS)
