"""D3PM against what is known exactly: the schedules' closed forms, the step KLs against dense
transition matrices, the bound of an exact denoiser on a Markov chain (-log p(x)), and the
absorbing bound's T -> infinity limit (MDLM's continuous bound, approached from above)."""

import math

import pytest
import torch
from chain_oracles import K, ChainOracle, chain_nll, one_thread, sample_chain  # noqa: F401 (one_thread: autouse)
from torch import nn

from dlmtrain import build_module, load_config
from dlmtrain.diffusion.d3pm import alpha_bars, prior_kl, step_kl
from dlmtrain.diffusion.masked import discrete_weights
from dlmtrain.diffusion.schedules import get_schedule
from dlmtrain.diffusion.uniform import uniform_posterior_log_probs
from dlmtrain.errors import ConfigError


def d3pm_module(graph="absorb", T=1000, schedule="auto", *extra):
    cfg = load_config(None, ["model=tiny", f"model.vocab_size={K}", "optim.ema=0", "objective=d3pm",
                             f"objective.graph={graph}", f"objective.T={T}", f"objective.schedule={schedule}", *extra])
    return build_module(cfg)


def with_oracle(module, temper=1.0):
    """The module with the exact chain denoiser (logits times ``temper``: 1 exact, < 1 worse)."""
    if module.graph == "absorb":
        oracle = ChainOracle("absorb", K + 1, mask_id=module.mask_id)
    else:
        abar = module.abar
        oracle = ChainOracle("uniform", K, alpha_of=lambda s: abar[torch.as_tensor(s).long().cpu()])

    class Tempered(nn.Module):
        def __init__(self):
            super().__init__()
            self.oracle = oracle

        def forward(self, z, **kw):
            return self.oracle(z, **kw) * temper

    module.backbone = Tempered() if temper != 1.0 else oracle
    return module


def test_schedules_closed_forms():
    T = 10
    jsd = alpha_bars("jsd", T)
    beta = 1.0 / (T - torch.arange(1, T + 1, dtype=torch.float64) + 1)  # beta_t = 1/(T - t + 1)
    assert torch.allclose(jsd[1:], torch.cumprod(1 - beta, 0), atol=1e-15, rtol=0)
    assert jsd[0] == 1 and jsd[-1] == 0
    cos = alpha_bars("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2)  # noqa: E731
    assert cos[500].item() == pytest.approx(f(500) / f(0), rel=1e-12)
    assert cos[-1].item() == pytest.approx(0.001 * cos[-2].item(), rel=1e-9)  # beta_T clipped at 0.999
    lin = alpha_bars("linear", 1000)
    expect = math.prod(1 - (1e-4 + (0.02 - 1e-4) * k / 999) for k in range(1000))
    assert lin[-1].item() == pytest.approx(expect, rel=1e-9)
    # rescaled by 1000/T: about the same total noise for any T (sum beta = 10.05; e^-10.05 = 4.3e-5)
    assert abs(math.log(alpha_bars("linear", 250)[-1].item()) - math.log(expect)) < 0.3
    for a in (jsd, cos, lin):
        assert (a[1:] < a[:-1]).all() and a[0] == 1


def dense_step(graph, n, a_s, a_t, logp, x0, z):
    """(KL, log p) from D3PM's matrices: q(x_s | x_t, x0) ∝ x_t Q^T ⊙ x0 Qbar_s, p ∝ x_t Q^T ⊙ p~ Qbar_s,
    with Q the s -> t transition (retention a_t / a_s) and [MASK] = n - 1 for absorbing."""
    eye = torch.eye(n, dtype=torch.float64)

    def mat(keep):
        if graph == "absorb":
            return keep * eye + (1 - keep) * torch.zeros(n, n, dtype=torch.float64).index_fill_(1, torch.tensor([n - 1]), 1.0)
        return keep * eye + (1 - keep) / n

    Q, Qbar = mat(a_t / a_s), mat(a_s)
    q = Q[:, z] * Qbar[x0]
    q = q / q.sum()
    p = Q[:, z] * (logp.exp().double() @ Qbar)
    p = p / p.sum()
    kl = torch.where(q > 0, q * (q.log() - p.log()), torch.zeros_like(q)).sum()
    return kl, p.log()


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_step_kl_and_posterior_match_dense_transition_matrices(graph):
    g = torch.Generator().manual_seed(0)
    V = 5  # data tokens; absorbing adds [MASK] = 5
    n = V + (graph == "absorb")
    B = 48
    logits = 2 * torch.randn(B, 1, n, generator=g, dtype=torch.float64)
    if graph == "absorb":
        logits[..., V] = -math.inf
    logp = logits.log_softmax(-1)
    x0 = torch.randint(0, V, (B, 1), generator=g)
    if graph == "absorb":  # the only x_t with q(x_t | x0) > 0
        z = torch.where(torch.rand(B, 1, generator=g) < 0.7, V, x0)
    else:
        z = torch.randint(0, V, (B, 1), generator=g)
        z[:8] = x0[:8]
    a_s = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
    a_s[:6] = 1.0  # the reconstruction step
    a_t = a_s * torch.rand(B, generator=g, dtype=torch.float64)
    kl = step_kl(graph, logp, x0, z, a_s, a_t, mask_id=V if graph == "absorb" else None)
    for b in range(B):
        ref, ref_logp = dense_step(graph, n, a_s[b].item(), a_t[b].item(), logp[b, 0], x0[b, 0], z[b, 0])
        assert kl[b, 0].item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12), b
        if graph == "uniform":
            post = uniform_posterior_log_probs(logp[b:b + 1], z[b:b + 1], a_s[b], a_t[b])[0, 0]
            assert torch.allclose(post, ref_logp, atol=1e-12), b
    assert (kl >= -1e-12).all()


# (graph, schedule, draws per sequence, whether the test must resolve a 3% weight error). Uniform
# noise under jsd (abar linear in t) is heavy-tailed: a token changed at small t weighs ~T/t with
# probability ~t, so its variance grows like log T and 3% would need ~2e5 draws per sequence;
# there the enumeration in tests/diffusion/test_uniform.py pins the value instead.
EXACT = [("absorb", "auto", 6000, True), ("absorb", "cosine", 6000, True), ("uniform", "auto", 30000, True),
         ("uniform", "jsd", 6000, False)]


@pytest.mark.parametrize("graph,schedule,reps,power", EXACT)
def test_nelbo_of_exact_denoiser_equals_log_likelihood(graph, schedule, reps, power):
    # With the exact denoiser the T-step bound exceeds -log p(x) by O(1/T) only (T = 1000:
    # below 0.1%, see the enumerations); the estimate must be unbiased for it.
    module = with_oracle(d3pm_module(graph, 1000, schedule))
    g = torch.Generator().manual_seed(0)
    x = sample_chain(3, 6, g)
    est = module.nelbo(x.repeat_interleave(reps, 0), generator=g).double().view(3, reps)
    mean, se = est.mean(1), est.std(1) / math.sqrt(reps)
    truth = chain_nll(x)
    assert ((mean - truth).abs() < 4 * se).all(), (mean, truth, se)
    se_sum = se.pow(2).sum().sqrt()
    assert (mean.sum() - truth.sum()).abs() < 4 * se_sum
    if power:  # a weight 3% off would be caught
        assert (1.03 * mean.sum() - truth.sum()).abs() > 4 * 1.03 * se_sum


def mask_patterns(x, mask_id):
    L = x.shape[1]
    pats = torch.cartesian_prod(*[torch.tensor([False, True])] * L).view(-1, L)
    return pats, torch.where(pats, mask_id, x)


def exact_absorbing_bounds(module, x, Ts):
    """For one sequence x [1, L]: {T: L_T} enumerated over all mask patterns through the module's
    own step KL (D3PM), MDLM's discrete bound from ``discrete_weights``, and MDLM's continuous
    bound for alpha = 1 - t: sum_M c(M) int_0^1 t^(m-1) (1-t)^(L-m) dt = sum_M c(M) B(m, L-m+1)."""
    L = x.shape[1]
    pats, z = mask_patterns(x, module.mask_id)
    logp = module.denoise(z, 1.0).double()  # the exact absorbing denoiser does not depend on t
    m = pats.sum(1).double()
    cost = -(logp.gather(-1, x.expand_as(z)[..., None]).squeeze(-1) * pats).sum(1)  # c(M)
    beta = torch.exp(torch.lgamma(m) + torch.lgamma(L - m + 1) - math.lgamma(L + 1))
    cont = (cost[1:] * beta[1:]).sum().item()
    out = {}
    for T in Ts:
        abar = alpha_bars("jsd", T)
        d3pm, mdlm = L * prior_kl("absorb", abar[-1].item(), K), 0.0
        for i in range(1, T + 1):
            q = (1 - abar[i]) ** m * abar[i] ** (L - m)
            kl = step_kl("absorb", logp, x.expand_as(z), z, abar[i - 1], abar[i], module.mask_id).sum(1)
            d3pm += (q * kl).sum().item()
            _, w = discrete_weights(torch.tensor([(i - 0.5) / T], dtype=torch.float64), T, get_schedule("loglinear"))
            mdlm += (q * cost).sum().item() * w.item() / T
        out[T] = (d3pm, mdlm)
    return out, cont


@pytest.mark.parametrize("temper", [1.0, 0.6])
def test_absorbing_bound_decreases_in_T_to_the_mdlm_continuous_bound(temper):
    # temper 0.6: a deliberately imperfect denoiser, so the limit is not simply -log p(x)
    module = with_oracle(d3pm_module("absorb", 8), temper)
    x = sample_chain(1, 6, torch.Generator().manual_seed(3))
    Ts = [1, 2, 4, 16, 64, 512]
    bounds, cont = exact_absorbing_bounds(module, x, Ts)
    vals = [bounds[T][0] for T in Ts]
    for T in Ts:  # D3PM-absorbing with the jsd schedule is MDLM's discrete bound, term by term
        assert bounds[T][0] == pytest.approx(bounds[T][1], rel=1e-12)
    assert all(a > b for a, b in zip(vals, vals[1:])), vals
    assert vals[-1] > cont
    assert vals[-1] - cont < 0.02 * (vals[2] - cont)  # O(1/T): 512 vs 4 steps
    nll = chain_nll(x).item()
    if temper == 1.0:
        assert cont == pytest.approx(nll, rel=1e-6)  # the exact denoiser makes the continuous bound tight
    else:
        assert cont > nll + 0.1


def test_estimator_matches_the_enumerated_absorbing_bound_at_small_T():
    # T = 4: L_T is far above -log p(x); the one-step-times-T estimator must still be unbiased for it
    module = with_oracle(d3pm_module("absorb", 4))
    x = sample_chain(1, 6, torch.Generator().manual_seed(3))
    exact = exact_absorbing_bounds(module, x, [4])[0][4][0]
    g = torch.Generator().manual_seed(1)
    reps = 20000
    est = module.nelbo(x.expand(reps, -1), generator=g).double()
    se = est.std() / math.sqrt(reps)
    assert abs(est.mean().item() - exact) < 4 * se
    assert exact > chain_nll(x).item() + 20 * se


def test_prior_term_with_abar_T_above_zero():
    # cosine leaves abar_T ~ 1e-6: the prior KL (abar_T log N for absorbing) is in the bound
    m = d3pm_module("absorb", 1000, "cosine")
    assert m.prior_nats == pytest.approx(m.abar[-1].item() * math.log(K))
    assert m.prior_nats > 0
    assert d3pm_module("absorb", 1000).prior_nats == 0.0


def test_config_errors():
    with pytest.raises(ConfigError, match="hybrid_lambda"):
        d3pm_module("absorb", 10, "auto", "objective.hybrid_lambda=-0.1")
    with pytest.raises(ConfigError, match="graph"):
        d3pm_module("band", 10)
