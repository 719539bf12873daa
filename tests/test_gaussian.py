"""The gaussian objective (embedding diffusion, VDM bound): each term of the bound against a
closed form or a quadrature, the total against the exact -log p(x) of known sources (with a
deliberately wrong weight caught), the schedules, the samplers, config errors, and a tiny
`train` run on Markov shards."""

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from chain_oracles import PI, P, chain_nll, chi2_pvalue, exact_pair, held_out_bound, one_thread, sample_chain  # noqa: F401
from gaussian_oracles import ChainContext, IIDContext, gaussian_module

import dlmtrain.diffusion.gaussian as G
from dlmtrain import load_checkpoint, load_config
from dlmtrain.data.synthetic import write_markov
from dlmtrain.diffusion.schedules import stratified_times
from dlmtrain.errors import ConfigError
from dlmtrain.sampling.api import sample
from dlmtrain.train import train

SCHEDULES = ["linear", "cosine", "learned"]
G_MIN, G_MAX = -6.0, 10.0  # the config's defaults


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- closed forms ---------------------------------------------------------------------------------


def test_prior_kl_is_the_analytic_gaussian_kl():
    e = torch.randn(4, 5, 6, generator=gen(0), dtype=torch.float64)  # any norm, not only unit rows
    for g1 in (-2.0, 0.0, 3.0, 10.0):
        a, s = (math.sqrt(v) for v in (1 / (1 + math.exp(g1)), 1 / (1 + math.exp(-g1))))
        ref = torch.distributions.kl_divergence(torch.distributions.Normal(a * e, s),
                                                torch.distributions.Normal(0.0, 1.0)).sum(-1)
        assert torch.allclose(G.prior_kl(e, torch.tensor(g1)).double(), ref, rtol=1e-5, atol=1e-7), g1
    # unit-norm rows at gamma_max = 10: 1/2 sigmoid(-10) (1 - d) + d/2 softplus(-10) ~ exp(-10) / 2 nats per token
    m = gaussian_module(5)
    x = torch.randint(0, 5, (2, 7), generator=gen(1))
    prior = m.nelbo_terms(x, torch.rand(2), generator=gen(2))["prior"]
    assert torch.allclose(prior, torch.full_like(prior, 0.5 * math.exp(-10)), rtol=1e-3)


def test_reconstruction_is_the_decoder_posterior_at_gamma_min():
    table = G.normalize_embeddings(torch.randn(4, 3, generator=gen(0)))
    z = torch.randn(2, 5, 3, generator=gen(1))
    x = torch.randint(0, 4, (2, 5), generator=gen(2))
    a2, s2 = torch.sigmoid(torch.tensor(1.5)), torch.sigmoid(torch.tensor(-1.5))  # gamma = -1.5
    logn = -((z[..., None, :] - a2.sqrt() * table) ** 2).sum(-1) / (2 * s2)  # log N(z; alpha e_v, sigma^2) + c
    ref = -torch.log_softmax(logn, -1).gather(-1, x[..., None])[..., 0]
    assert torch.allclose(G.reconstruction_nll(z, x, table, torch.tensor(-1.5)), ref, atol=1e-5)


@pytest.mark.parametrize("name", SCHEDULES)
def test_gamma_schedules_exact_derivative_endpoints_and_monotone(name):
    sch = G.make_gamma(name, G_MIN, G_MAX)
    if name == "learned":
        sch = sch.double()
        with torch.no_grad():  # away from the initial near-linear shape: random positive coefficients
            for p in (sch.w, sch.a, sch.b, sch.c):
                p.add_(torch.randn(p.shape, generator=gen(3), dtype=torch.float64))
            sch.gamma_0.fill_(-5.0)
            sch.delta.fill_(2.0)
        g0, g1 = (v.item() for v in sch.endpoints())
        assert (g0, g1) == pytest.approx((-5.0, -5.0 + math.log1p(math.exp(2.0))))
    else:
        g0, g1 = G_MIN, G_MAX
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    gamma, dgamma = sch(t)
    assert gamma[0].item() == pytest.approx(g0, abs=1e-9) and gamma[-1].item() == pytest.approx(g1, abs=1e-9)
    assert (gamma.diff() > 0).all() and (dgamma > 0).all()
    h = 1e-6
    tc = t.clamp(h, 1 - h)
    fd = (sch(tc + h)[0] - sch(tc - h)[0]) / (2 * h)
    assert torch.allclose(sch(tc)[1], fd, rtol=1e-6, atol=1e-6)
    # the diffusion weight integrates to (SNR(0) - SNR(1)) / 2 (trapezoid on 2001 points)
    w = G.diffusion_weight(gamma, dgamma)
    integral = torch.trapezoid(w, t).item()
    assert integral == pytest.approx(0.5 * (math.exp(-g0) - math.exp(-g1)), rel=2e-4)


@pytest.mark.parametrize("name", SCHEDULES)
def test_fixed_estimate_gives_half_the_snr_drop_times_the_squared_error(name):
    # context logits +1e4 on token 0: e^ = e_0 at every t, so the diffusion term's expectation
    # over t is 1/2 (SNR(0) - SNR(1)) ||e(x) - e_0||^2; t stratified over 8192 rows
    m = gaussian_module(4, f"objective.schedule={name}")
    fixed = torch.tensor([1e4, 0.0, 0.0, 0.0])
    m.backbone.context_logits = lambda z, gamma, *a: fixed.expand(*z.shape[:2], -1)
    x = torch.tensor([[0, 1, 2, 3]]).expand(8192, -1)
    with torch.no_grad():
        d = m.nelbo_terms(x, stratified_times(8192, generator=gen(1)), generator=gen(2))["diffusion"].double()
        table = m.backbone.table().double()
    g0, g1 = (v.item() for v in m.backbone.endpoints())
    expect = 0.5 * (math.exp(-g0) - math.exp(-g1)) * ((table - table[0]) ** 2).sum(-1)
    assert (d[:, 0] == 0).all()
    # within 1% (the cosine schedule's weight peaks steeply at t = 0: one stratum holds much of it)
    assert torch.allclose(d.mean(0), expect, rtol=1e-2)


# ---- an exact denoiser on a tiny vocabulary: quadrature ------------------------------------------


def _gauss_grid(n=120, lim=8.0):
    """Nodes eps [n*n, 2] and weights for E over N(0, I_2): Gauss-Legendre on [-lim, lim]^2."""
    u, w = np.polynomial.legendre.leggauss(n)
    u, w = torch.tensor(u * lim), torch.tensor(w * lim * np.exp(-0.5 * (u * lim) ** 2) / math.sqrt(2 * math.pi))
    eps = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    return eps, (w[:, None] * w[None, :]).reshape(-1)


def _posterior_stats(table, pi, gamma, eps, weights):
    """(mmse, I(X; Z)) at gamma for i.i.d. tokens pi, by quadrature over z = alpha e_x + sigma eps."""
    a, s = math.sqrt(1 / (1 + math.exp(gamma))), math.sqrt(1 / (1 + math.exp(-gamma)))
    z = a * table[:, None, :] + s * eps[None]  # [V, Q, 2]
    logits = pi.log() + (a * z @ table.T - 0.5 * a * a) / (s * s)  # unit-norm rows
    logp = torch.log_softmax(logits, -1)  # p(v | z) [V, Q, V]
    e_hat = logp.exp() @ table
    mmse = (pi[:, None] * ((table[:, None] - e_hat) ** 2).sum(-1) * weights).sum()
    own = logp.diagonal(dim1=0, dim2=2).T  # log p(x | z) at z drawn from x [V, Q]
    info = (pi[:, None] * (own - pi.log()[:, None]) * weights).sum()
    return mmse.item(), info.item()


@pytest.fixture(scope="module")
def iid_setup():
    """V = 3 tokens at 120 degrees on the unit circle (d = 2), pi = (0.5, 0.3, 0.2), and the
    quadrature reference of the diffusion term of the exact denoiser."""
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ang = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=torch.float64)
    table = torch.stack([ang.cos(), ang.sin()], -1)
    n_threads = torch.get_num_threads()  # module-scoped: set up before the autouse one_thread
    torch.set_num_threads(1)
    eps, w = _gauss_grid()
    # int_0^1 1/2 gamma' exp(-gamma) mmse dt = int_{g_min}^{g_max} 1/2 exp(-gamma) mmse(gamma) d gamma,
    # Gauss-Legendre on 40 nodes in gamma
    gx, gw = np.polynomial.legendre.leggauss(40)
    gammas = 0.5 * (G_MAX - G_MIN) * gx + 0.5 * (G_MAX + G_MIN)
    integral = sum(0.5 * (G_MAX - G_MIN) * wk * 0.5 * math.exp(-gk) * _posterior_stats(table, pi, gk, eps, w)[0]
                   for gk, wk in zip(gammas, gw))
    info0, info1 = (_posterior_stats(table, pi, g, eps, w)[1] for g in (G_MIN, G_MAX))
    torch.set_num_threads(n_threads)
    return {"pi": pi, "table": table, "eps": eps, "w": w, "integral": integral, "info": (info0, info1)}


def test_quadrature_reference_satisfies_i_mmse(iid_setup):
    # I-MMSE (Guo, Shamai & Verdu 2005): the weighted MMSE integral is I(X; Z_0) - I(X; Z_1); two
    # quadratures that share no weight, so a wrong factor in 1/2 exp(-gamma) would show
    info0, info1 = iid_setup["info"]
    h = -(iid_setup["pi"] * iid_setup["pi"].log()).sum().item()
    assert info0 == pytest.approx(h, abs=1e-6) and info1 == pytest.approx(0.0, abs=1e-4)
    assert iid_setup["integral"] == pytest.approx(info0 - info1, rel=1e-6)


def _iid_module(setup, *extra):
    m = gaussian_module(3, "objective.embed_dim=2", *extra)
    with torch.no_grad():
        m.backbone.embedding.weight.copy_(setup["table"].float())
    m.backbone.context_logits = IIDContext(setup["pi"])
    return m


def test_ideal_denoiser_estimate_is_the_posterior_mean(iid_setup):
    # at gamma = 0 (linear schedule, t = 0.375): the mean squared error of e^ over 16384 tokens
    # equals the quadrature MMSE within 3 standard errors
    m = _iid_module(iid_setup, "objective.schedule=linear")
    pi = iid_setup["pi"]
    x = torch.multinomial(pi, 16384, replacement=True, generator=gen(0)).reshape(512, 32)
    with torch.no_grad():
        d = m.nelbo_terms(x, torch.full((512,), 0.375), generator=gen(1))["diffusion"].double()
    w = G.diffusion_weight(torch.tensor(0.0), torch.tensor(G_MAX - G_MIN)).item()
    mse = d / w
    ref = _posterior_stats(iid_setup["table"], pi, 0.0, iid_setup["eps"], iid_setup["w"])[0]
    se = mse.std().item() / math.sqrt(mse.numel())
    assert abs(mse.mean().item() - ref) < 3 * se, (mse.mean().item(), ref, se)


@pytest.mark.parametrize("name", SCHEDULES)
def test_ideal_denoiser_diffusion_term_matches_the_quadrature(iid_setup, name):
    # The module's diffusion term (its gamma(t), gamma'(t) and weight) at the 48 Gauss-Legendre
    # nodes of t in [0, 1], 8 rows x 1024 i.i.d. tokens each, summed with the nodes' weights: the
    # quadrature value of int 1/2 exp(-gamma) mmse d gamma, the same for every schedule, within
    # 4 standard errors (from the 8 replicates) and 1.5%
    m = _iid_module(iid_setup, f"objective.schedule={name}")
    tx, tw = np.polynomial.legendre.leggauss(48)
    t = torch.tensor(0.5 * tx + 0.5, dtype=torch.float32).repeat(8)
    x = torch.multinomial(iid_setup["pi"], 48 * 8 * 1024, replacement=True, generator=gen(5)).reshape(48 * 8, 1024)
    with torch.no_grad():
        d = m.nelbo_terms(x, t, generator=gen(6))["diffusion"].double().mean(1).reshape(8, 48)
    est = (d * torch.tensor(0.5 * tw)).sum(1)  # [8] replicates
    ref = iid_setup["integral"]
    se = est.std().item() / math.sqrt(8)
    assert abs(est.mean().item() - ref) < 4 * se and est.mean().item() == pytest.approx(ref, rel=0.015), \
        (est.mean().item(), se, ref)
    # and nelbo_draws (stratified t, every term) on 1024 x 32 tokens: the same within 4 naive se
    x = torch.multinomial(iid_setup["pi"], 32768, replacement=True, generator=gen(7)).reshape(1024, 32)
    with torch.no_grad():
        per_tok = m.nelbo_draws(x, num_samples=1, generator=gen(8))[0][:, 0].double() / 32
    mean = per_tok.mean().item() - 0.5 * math.exp(-G_MAX)  # the prior; reconstruction ~ 1e-30 here
    se = per_tok.std().item() / math.sqrt(1024)
    assert abs(mean - ref) < 4 * se, (mean, se, ref)


def test_discrete_time_bound_matches_its_quadrature_and_exceeds_the_continuous_one(iid_setup):
    # eval.discrete_steps = T: T/2 (SNR(s) - SNR(t)) ||e - e^||^2 at a uniform step (VDM eq. 13);
    # with the exact denoiser its mean is sum_i 1/2 (SNR(s_i) - SNR(t_i)) mmse(gamma(t_i)), T = 8,
    # linear schedule, 64 rows x 512 tokens per step (within 4 se and 4%); above the continuous value
    T = 8
    m = _iid_module(iid_setup, "objective.schedule=linear")
    t = ((torch.arange(T) + 0.5) / T).repeat(64)
    x = torch.multinomial(iid_setup["pi"], len(t) * 512, replacement=True, generator=gen(9)).reshape(len(t), 512)
    with torch.no_grad():
        d = m.nelbo_terms(x, t, generator=gen(10), discrete_steps=T)["diffusion"].double().mean(1)
    gam = lambda u: G_MIN + (G_MAX - G_MIN) * u  # noqa: E731
    ref = sum(0.5 * (math.exp(-gam((i - 1) / T)) - math.exp(-gam(i / T)))
              * _posterior_stats(iid_setup["table"], iid_setup["pi"], gam(i / T), iid_setup["eps"], iid_setup["w"])[0]
              for i in range(1, T + 1))
    est = d.reshape(64, T).mean(1)  # 64 replicates of the uniform-step average
    se = est.std().item() / 8
    assert abs(est.mean().item() - ref) < 4 * se and est.mean().item() == pytest.approx(ref, rel=0.04), \
        (est.mean().item(), se, ref)
    assert ref > 1.1 * iid_setup["integral"]


def test_training_self_conditions_half_the_rows_through_inputs_embeds():
    # loss(): a first pass without gradient, its estimate fed back through the self_cond projection
    # of the input embedding on ~50% of the rows (2000 rows: 0.5 +- 0.035); nelbo: every row
    m = gaussian_module(5, "objective.self_conditioning=true")
    calls, sc_in = [], []
    fwd = m.backbone.transformer.forward
    m.backbone.transformer.forward = lambda *a, **kw: calls.append((a, kw)) or fwd(*a, **kw)
    m.backbone.self_cond.register_forward_hook(lambda mod, inp, out: sc_in.append(inp[0].detach()))
    m.step_generator = lambda device: gen(4)
    x = torch.randint(0, 5, (2000, 2), generator=gen(5))
    m.loss({"input_ids": x})
    assert len(calls) == 2 and all(a == () and kw["inputs_embeds"].shape == (2000, 2, 32) for a, kw in calls)
    assert (sc_in[0] == 0).all()  # the first pass has no estimate yet
    on = (sc_in[1] != 0).any(-1).any(-1)
    assert abs(on.double().mean().item() - 0.5) < 0.035
    # the estimate fed back has norm <= 1 (a mean of unit vectors) before the x sqrt(d) scaling
    assert (sc_in[1].norm(dim=-1) <= 8 ** 0.5 + 1e-4).all()
    sc_in.clear()
    with torch.no_grad():
        m.nelbo_draws(x[:50], generator=gen(6))
    assert len(sc_in) == 2 and (sc_in[1] != 0).any(-1).any(-1).all()
    m0 = gaussian_module(5, "objective.self_conditioning=true", "objective.self_cond_prob=0")
    m0.step_generator = lambda device: gen(4)
    fwd0, n0 = m0.backbone.transformer.forward, []
    m0.backbone.transformer.forward = lambda *a, **kw: n0.append(1) or fwd0(*a, **kw)
    m0.loss({"input_ids": x[:50]})
    assert len(n0) == 1  # no row self-conditioned: no first pass


def test_training_times_are_stratified_over_the_batch():
    m = gaussian_module(5)
    seen = []
    terms = m.nelbo_terms
    m.nelbo_terms = lambda x0, t, *a, **kw: seen.append(t) or terms(x0, t, *a, **kw)
    m.step_generator = lambda device: gen(7)
    m.loss({"input_ids": torch.randint(0, 5, (64, 3), generator=gen(8))})
    assert torch.equal((seen[0] * 64).floor().long().sort().values, torch.arange(64))  # one per 1/64 stratum


def test_learned_schedule_gradients_bound_for_endpoints_variance_for_the_interior():
    # VDM sec. 5.1: the endpoints get the gradient of the bound; the interior (which leaves the
    # bound unchanged in expectation) the gradient of E[L_diff^2], through a hook on gamma(t)
    m = gaussian_module(5, "objective.schedule=learned")
    sch = m.backbone.gamma
    with torch.no_grad():
        sch.a.add_(torch.randn(sch.a.shape, generator=gen(1)))
    x = torch.randint(0, 5, (6, 7), generator=gen(2))
    m.step_generator = lambda device: gen(3)
    m.loss({"input_ids": x}).backward()
    got = {n: p.grad.clone() for n, p in sch.named_parameters()}
    g = gen(3)  # the same draws as loss(): times, then the self-conditioning rows, then noise
    t = stratified_times(6, generator=g)
    rows = torch.rand(6, generator=g) < 0.5
    terms = m.nelbo_terms(x, t, None, g, rows)
    n = x.numel()
    ends = torch.autograd.grad(sum(terms.values()).sum() / n, [sch.gamma_0, sch.delta], retain_graph=True)
    inner = torch.autograd.grad((terms["diffusion"].sum(-1) ** 2).sum() / n, [sch.w, sch.a, sch.b, sch.c])
    for name, ref in zip(["gamma_0", "delta", "w", "a", "b", "c"], [*ends, *inner]):
        assert torch.allclose(got[name], ref, rtol=1e-4, atol=1e-7), name
    assert got["a"].abs().max() > 0 and got["gamma_0"].abs() > 0


# ---- the total bound on a Markov chain with the exact denoiser -------------------------------------


def _chain_gap(m, n=2048, L=8, draws=2, seed=0):
    x = sample_chain(n, L, gen(seed))
    with torch.no_grad():
        nats = m.nelbo_draws(x, num_samples=draws, generator=gen(seed + 1))[0].double().mean(1)
    gap = nats - chain_nll(x)
    return gap.mean().item() / L, gap.std().item() / math.sqrt(n) / L, chain_nll(x).mean().item() / L


def test_total_bound_with_the_exact_denoiser_is_tight_above_the_chain_nll(monkeypatch):
    # the exact posterior (forward-backward over the chain's HMM) makes E nelbo = H(x) + the prior
    # KL (~2e-5 nats/token) + the decoder's gap at gamma_min (~0): the paired gap is >= 0 within
    # 3 se and small; a diffusion weight halved (a wrong bound) falls far below -log p(x)
    m = gaussian_module(3)
    m.backbone.context_logits = ChainContext(m, P, PI)
    gap, se, nll = _chain_gap(m)
    assert gap > -3 * se and gap < 3 * se + 1e-3, (gap, se)
    assert se < 0.03 * nll
    monkeypatch.setattr(G, "diffusion_weight", lambda g, dg: 0.25 * dg * torch.exp(-g))
    gap_half, se_half, _ = _chain_gap(m)
    assert gap_half < -10 * se_half and gap_half < -0.2 * nll, (gap_half, se_half)


# ---- samplers ---------------------------------------------------------------------------------------


@pytest.fixture
def chain_module():
    m = gaussian_module(3)
    m.backbone.context_logits = ChainContext(m, P, PI)
    return m.eval()


def _pairs(x, i, j):
    c = torch.zeros(3, 3)
    c.index_put_((x[:, i], x[:, j]), torch.ones(len(x)), accumulate=True)
    return c


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_with_the_exact_denoiser_draw_the_chain(chain_module, sampler):
    # 2048 sequences of 4 tokens, 32 steps: pairs (x0, x1) and (x1, x3) pass a chi-square test
    # against the chain's exact joints (p > 1e-3; measured p = 0.3 .. 0.9 at 16 to 256 steps)
    x = sample(chain_module, 2048, 4, 32, sampler=sampler, seed=0).ids
    assert chi2_pvalue(_pairs(x, 0, 1), exact_pair(4, 0, 1)) > 1e-3
    assert chi2_pvalue(_pairs(x, 1, 3), exact_pair(4, 1, 3)) > 1e-3


def test_fixed_tokens_stay_and_pull_their_neighbours(chain_module):
    # Conditioning by replacement keeps the given tokens exactly. It is approximate for the free
    # positions (the denoiser sees the given tokens only through their noisy vectors): with the
    # exact denoiser, P(x1 = 1 | x2 = 1) = 0.6 against 0.315 unconditionally; replacement gets
    # about halfway (measured 0.45 ddpm / 0.42 ddim at 64 steps)
    for sampler in ("ddpm", "ddim"):
        x = sample(chain_module, 1024, 4, 16, sampler=sampler, seed=1, fixed={2: 1}).ids
        assert (x[:, 2] == 1).all()
        p1 = (x[:, 1] == 1).double().mean().item()
        assert 0.36 < p1 < 0.62, (sampler, p1)


@pytest.mark.parametrize("sampler", ["ddpm", "ancestral", "ddim"])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_any_step_count_conditioning_and_seeds(sampler, steps):
    # an untrained network with self-conditioning and the learned schedule: valid ids, NFE = steps,
    # prompt and suffix kept, the same seed gives the same samples, another seed others
    m = gaussian_module(6, "objective.self_conditioning=true", "objective.schedule=learned")
    kw = dict(sampler=sampler, prompt_ids=[5, 4], suffix_ids=[3], seed=7)
    a = sample(m, 16, 10, steps, **kw)
    assert a.ids.shape == (16, 10) and a.nfe == steps and ((a.ids >= 0) & (a.ids < 6)).all()
    assert (a.ids[:, :2] == torch.tensor([5, 4])).all() and (a.ids[:, -1] == 3).all()
    assert torch.equal(a.ids, sample(m, 16, 10, steps, **kw).ids)
    assert not torch.equal(a.ids, sample(m, 16, 10, steps, **{**kw, "seed": 8}).ids)


@pytest.mark.parametrize("clamp", [False, True])
def test_rounding_is_the_nearest_embedding_and_clamp_uses_token_embeddings(chain_module, monkeypatch, clamp):
    import dlmtrain.sampling.gaussian as S

    seen = {"z": [], "e_hat": []}
    loglik, ddim = S.loglik_logits, S.ddim_step
    monkeypatch.setattr(S, "loglik_logits", lambda z, *a: seen["z"].append(z.clone()) or loglik(z, *a))
    monkeypatch.setattr(S, "ddim_step", lambda z, e_hat, *a: seen["e_hat"].append(e_hat.clone()) or ddim(z, e_hat, *a))
    ids = sample(chain_module, 64, 5, 3, sampler="ddim", seed=2, clamp=clamp).ids
    z0 = seen["z"][-1]  # the final rounding's input (the denoiser's own calls come before it)
    assert torch.isfinite(z0).all()
    with torch.no_grad():
        table = chain_module.backbone.table()
    assert torch.equal(ids, torch.cdist(z0, table[None].expand(64, -1, -1)).argmin(-1))  # nearest token
    dist = torch.cdist(torch.stack(seen["e_hat"]).reshape(-1, table.shape[1]), table,
                       compute_mode="donot_use_mm_for_euclid_dist").min(-1).values
    assert (dist.max() < 1e-6) if clamp else (dist.max() > 1e-2)  # clamp: e^ is a token's embedding


def test_cfg_scale_is_refused():
    with pytest.raises(ConfigError, match="cfg_scale"):
        sample(gaussian_module(4), 2, 6, 3, sampler="ddim", prompt_ids=[1], cfg_scale=1.0)


# ---- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("override,match", [
    ("objective.T=10", "option of objective d3pm, not of gaussian"),
    ("objective.eps=0.1", "not of gaussian"),
    ("objective.schedule=cosine_x", "objective.schedule"),
    ("objective.gamma_min=12", "gamma_min=12.0 must be below objective.gamma_max"),
    ("objective.self_cond_prob=1.5", "self_cond_prob"),
    ("objective.embed_dim=-1", "embed_dim"),
    ("model.document_mask=true", "document_mask"),
])
def test_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        gaussian_module(4, override)


def test_clamp_belongs_to_gaussian():
    with pytest.raises(ConfigError, match="sampling.clamp"):
        load_config(None, ["objective=mdlm", "model=tiny", "sampling.clamp=true"])
    assert load_config(None, ["objective=gaussian", "model=tiny", "sampling.clamp=true"]).sampling.clamp


# ---- a tiny run on Markov shards ----------------------------------------------------------------


class Steps(L.Callback):
    def __init__(self):
        self.n = 0

    def on_train_batch_end(self, *args):
        self.n += 1


def run_config(manifest, run_dir, steps):
    return load_config("configs/demo.yaml", [
        "objective=gaussian", f"data.manifest={manifest}", f"run.dir={run_dir}", "data.num_workers=0",
        "model.hidden_size=64", "model.n_heads=2", "model.cond_dim=32", "optim.lr=3e-3", "optim.ema=0.9",
        "optim.warmup_steps=10", f"trainer.max_steps={steps}", "trainer.global_batch_size=16",
        "trainer.val_every_n_steps=60", "trainer.limit_val_batches=2", "trainer.ckpt_every_n_steps=30",
        "trainer.progress_bar=false", "eval.sample_every_n_steps=60", "eval.num_samples=4", "sampling.steps=16"])


def test_tiny_run_resumes_and_its_held_out_bound_is_above_the_exact_nll(tmp_path):
    markov = write_markov(tmp_path / "markov", P.numpy(), seq_len=32, train_samples=2048, val_samples=96)
    first = train(run_config(markov, tmp_path / "run", 60))
    assert first["step"] == 60 and math.isfinite(first["val/nelbo"])
    steps = Steps()
    second = train(run_config(markov, tmp_path / "run", 120), extra_callbacks=[steps])
    assert second["step"] == 120 and steps.n == 60  # resumed from last.ckpt at step 60
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert second["val/nelbo"] < first["val_nelbo_before"]
    rows = [json.loads(s) for s in (tmp_path / "run" / "samples" / "step120.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["tokens"]) == 32 and max(r["tokens"]) < 4 for r in rows)

    # held out: fresh sequences of the chain, 8 draws each, paired with their exact -log p(x)
    # (measured: nelbo 1.062 +- 0.018 against the exact 0.811 nats/token; log 4 = 1.386)
    module = load_checkpoint(ckpt)
    x = sample_chain(256, 32, gen(11))
    with torch.no_grad():
        per_seq = module.nelbo_draws(x, num_samples=8, generator=gen(12))[0].double().mean(1)
    gap, gap_se, nelbo, nelbo_se = held_out_bound(per_seq, x)  # nats/token; gap: above the exact NLL
    assert gap > -3 * gap_se, (gap, gap_se)  # a bound: not below -log p(x) beyond noise
    assert nelbo + 3 * nelbo_se < 0.85 * math.log(4), (nelbo, nelbo_se)  # learned: well below log V
    # the export directory (safetensors) holds the same model: the same draws give the same bound
    from dlmtrain.checkpoint.export import export_checkpoint, load_pretrained

    exported = load_pretrained(export_checkpoint(ckpt, tmp_path / "export", say=lambda *a: None))
    with torch.no_grad():
        a = module.nelbo_draws(x[:8], num_samples=2, generator=gen(13))[0]
        b = exported.nelbo_draws(x[:8], num_samples=2, generator=gen(13))[0]
    assert torch.equal(a, b)
    # sampling from the checkpoint with both samplers and few steps
    for sampler in ("ddpm", "ddim"):
        ids = sample(module, 8, 32, 4, sampler=sampler, prompt_ids=[2, 2], seed=0).ids
        assert (ids[:, :2] == 2).all() and ((ids >= 0) & (ids < 4)).all()


def test_padding_is_not_scored_and_draws_are_reproducible():
    m = gaussian_module(6, "objective.self_conditioning=true")
    x = torch.randint(0, 6, (3, 10), generator=gen(0))
    am = torch.ones(3, 10, dtype=torch.bool)
    am[1, 6:] = False
    am[2, :] = False
    with torch.no_grad():
        a, t = m.nelbo_draws(x, am, num_samples=2, generator=gen(1))
        b, _ = m.nelbo_draws(x, am, num_samples=2, generator=gen(1))
        x2 = x.clone()
        x2[1, 6:] = (x2[1, 6:] + 1) % 6  # padding content does not change the bound
        c, _ = m.nelbo_draws(x2, am, num_samples=2, generator=gen(1))
    assert a.shape == t.shape == (3, 2) and torch.equal(a, b) and torch.isfinite(a).all()
    assert (a[2] == 0).all() and (a[:2] > 0).all() and m.scored_tokens(x, am).tolist() == [10, 6, 0]
    assert torch.allclose(a, c)
