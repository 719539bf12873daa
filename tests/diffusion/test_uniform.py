"""Uniform-state diffusion (UDLM, and D3PM's uniform graph) against what is known exactly.

- The continuous-time integrand is the T -> infinity limit of T times one D3PM step's KL
  (the derivation in dlmtrain/diffusion/uniform.py), and equals the reference closed form
  (OBJECTIVES.md sec. 4(b)) written out naively.
- On a Markov chain, with the denoiser the x0-parameterization calls for (the leave-one-out
  posterior, tests/chain_oracles.py), the bound is -log p(x): exactly by enumeration over all
  noisy sequences and quadrature in t, and in expectation for the Monte Carlo estimator.
- The discrete T-step bound decreases to the continuous one.
"""

import math

import numpy as np
import pytest
import torch
from chain_oracles import K, ChainOracle, chain_nll, one_thread, sample_chain  # noqa: F401 (one_thread: autouse)

from dlmtrain import build_module, load_config
from dlmtrain.diffusion.schedules import get_schedule
from dlmtrain.diffusion.uniform import corrupt_uniform, uniform_integrand, uniform_prior_kl, uniform_step_kl


def reference_integrand(logp, x, z, a, da):
    """OBJECTIVES.md sec. 4(b), term by term, for one position (float64, small N)."""
    N = logp.shape[-1]
    xbar = N * a * torch.nn.functional.one_hot(x, N).double() + (1 - a)
    xth = N * a * logp.exp() + (1 - a)
    j = (xbar / xbar[z]) * torch.log(xth[z] * xbar / (xth * xbar[z]))
    return da / (N * a) * (N / xbar[z] - N / xth[z] - j.sum())


def random_case(N, B, g, dtype=torch.float64):
    logp = (2 * torch.randn(B, 1, N, generator=g, dtype=torch.float64)).log_softmax(-1).to(dtype)
    x = torch.randint(0, N, (B, 1), generator=g)
    z = torch.randint(0, N, (B, 1), generator=g)
    z[: B // 2] = x[: B // 2]  # both cases: z = x and z != x
    return logp, x, z


def test_integrand_matches_the_reference_closed_form():
    g = torch.Generator().manual_seed(0)
    logp, x, z = random_case(6, 40, g)
    s = get_schedule("cosine")
    t = torch.rand(40, generator=g, dtype=torch.float64) * 0.98 + 0.01
    ours = uniform_integrand(logp, x, z, s.alpha(t), s.alpha_prime(t))[:, 0]
    for b in range(40):
        ref = reference_integrand(logp[b, 0], x[b, 0], z[b, 0], s.alpha(t[b]), s.alpha_prime(t[b]))
        assert ours[b].item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
    assert (ours >= 0).all()


def test_integrand_is_the_limit_of_T_times_the_d3pm_step_kl():
    # T * KL(q(z_s | z_t, x) || p(z_s | z_t)) with s = t - 1/T  ->  l(t), error O(1/T)
    g = torch.Generator().manual_seed(1)
    logp, x, z = random_case(7, 60, g)
    s = get_schedule("loglinear")
    t = torch.rand(60, generator=g, dtype=torch.float64) * 0.9 + 0.05
    cont = uniform_integrand(logp, x, z, s.alpha(t), s.alpha_prime(t))
    err = {}
    for T in (1e3, 1e4, 1e5):
        disc = T * uniform_step_kl(logp, x, z, s.alpha(t - 1 / T), s.alpha(t))
        err[T] = ((disc - cont).abs() / cont).max().item()
    assert err[1e5] < 1e-3
    assert err[1e4] < 0.2 * err[1e3] and err[1e5] < 0.2 * err[1e4]  # first order in 1/T


def test_integrand_zero_at_the_truth_and_prior_kl_values():
    N = 5
    x = torch.tensor([[2]])
    onehot = torch.full((1, 1, N), -math.inf, dtype=torch.float64)
    onehot[..., 2] = 0.0
    for zz in (2, 4):
        val = uniform_integrand(onehot, x, torch.tensor([[zz]]), torch.tensor(0.6), torch.tensor(-1.0))
        assert abs(val.item()) < 1e-12
    assert uniform_prior_kl(0.0, N).item() == 0.0
    assert uniform_prior_kl(1.0, N).item() == pytest.approx(math.log(N))
    a = 0.3  # dense: q = a e_x + (1 - a)/N against Unif(N)
    q = torch.full((N,), (1 - a) / N, dtype=torch.float64)
    q[0] += a
    assert uniform_prior_kl(a, N).item() == pytest.approx((q * torch.log(q * N)).sum().item(), rel=1e-12)


@pytest.mark.parametrize("t", [1e-3, 0.3, 0.999, 1 - 1e-6])
def test_large_vocabulary_in_float32_matches_float64(t):
    # N = 50257 (GPT-2): the float32 path (one reduction over N) stays within 1e-4 nats of the
    # float64 one, also near pure noise where the bracket is O(r^2) and near t = eps
    g = torch.Generator().manual_seed(2)
    N = 50257
    logp64, x, z = random_case(N, 4, g)
    s = get_schedule("loglinear")
    tt = torch.full((4,), t, dtype=torch.float64)
    a, da = s.alpha(tt), s.alpha_prime(tt)
    for fn, args in ((uniform_integrand, (a, da)), (uniform_step_kl, (s.alpha(tt - 1e-3).clamp(max=1.0), a))):
        hi = fn(logp64, x, z, *args)
        lo = fn(logp64.float(), x, z, *args)
        assert torch.isfinite(lo).all()
        assert ((lo - hi).abs() <= 1e-4 * (1 + hi.abs())).all(), (fn.__name__, lo, hi)


def test_corrupt_uniform_rate_and_keep():
    g = torch.Generator().manual_seed(0)
    x0 = torch.zeros(400, 500, dtype=torch.long)
    keep = torch.zeros_like(x0, dtype=torch.bool)
    keep[:, :10] = True
    z = corrupt_uniform(x0, torch.full((400,), 0.4), 4, generator=g, keep=keep)
    assert (z[:, :10] == 0).all()
    # P(z = x) = alpha + (1 - alpha)/N = 0.55; the others 0.15 each
    frac = torch.bincount(z[:, 10:].flatten(), minlength=4).double() / z[:, 10:].numel()
    assert torch.allclose(frac, torch.tensor([0.55, 0.15, 0.15, 0.15], dtype=torch.float64), atol=0.003)


# ---- the bound on a Markov chain -------------------------------------------------------------


def udlm_module(schedule="loglinear", *extra):
    cfg = load_config(None, ["model=tiny", f"model.vocab_size={K}", "optim.ema=0", "objective=udlm",
                             f"objective.schedule={schedule}", *extra])
    m = build_module(cfg)
    m.backbone = ChainOracle("uniform", K, alpha_of=lambda sigma: torch.exp(-torch.as_tensor(sigma).double()))
    return m


def exact_udlm_bound(module, x, eps):
    """For one sequence x [1, L]: int_eps^1 E l dt (Gauss-Legendre, 2 x 40 nodes, split at 0.05)
    + E[-log p(x | z_eps)], every expectation over z by enumeration (K^L noisy sequences)."""
    L = x.shape[1]
    zs = torch.cartesian_prod(*[torch.arange(K)] * L).view(-1, L)
    xs = x.expand_as(zs)
    s = module.schedule

    def q(a):
        return torch.where(zs == x, a + (1 - a) / K, (1 - a) / K).prod(1)

    def expect(t, fn):
        tt = torch.tensor(t, dtype=torch.float64)
        a = s.alpha(tt)
        logp = module.denoise(zs, tt).double()
        return (q(a) * fn(logp, a, tt).sum(1)).sum().item()

    nodes, weights = np.polynomial.legendre.leggauss(40)
    total = 0.0
    for lo, hi in ((eps, 0.05), (0.05, 1.0)):
        for u, w in zip(nodes, weights):
            t = lo + (hi - lo) * (u + 1) / 2
            total += w * (hi - lo) / 2 * expect(t, lambda lp, a, tt: uniform_integrand(lp, xs, zs, a, s.alpha_prime(tt)))
    return total + expect(eps, lambda lp, a, tt: uniform_step_kl(lp, xs, zs, 1.0, a))


@pytest.mark.parametrize("schedule", ["loglinear", "cosine"])
def test_udlm_exact_bound_of_the_optimal_denoiser_is_the_log_likelihood(schedule):
    # enumeration + quadrature: the bound's exact expectation, deterministic to ~1e-6 here; the
    # one-shot decoder at eps costs only the posterior's total correlation, O(eps^2)
    module = udlm_module(schedule)
    x = sample_chain(2, 5, torch.Generator().manual_seed(4))
    for row in x:
        exact = exact_udlm_bound(module, row[None], module.cfg.objective.eps)
        assert exact == pytest.approx(chain_nll(row[None]).item(), rel=1e-4)
    # the posterior p(x^i | z) itself (what the masked models output) is not what this
    # parameterization wants: it double-counts z^i and the bound is clearly looser
    module.backbone.full = True
    assert exact_udlm_bound(module, x[:1], 1e-3) > chain_nll(x[:1]).item() + 0.3


@pytest.mark.parametrize("schedule,reps,power", [("cosine", 30000, True), ("loglinear", 8000, False)])
def test_udlm_estimator_is_unbiased_for_the_log_likelihood(schedule, reps, power):
    # loglinear: a token changed at small t weighs ~1/t (variance ~ log(1/eps)); the exact test
    # above pins its value, here only unbiasedness. cosine resolves a 3% weight error.
    module = udlm_module(schedule)
    g = torch.Generator().manual_seed(0)
    x = sample_chain(3, 6, g)
    est = module.nelbo(x.repeat_interleave(reps, 0), generator=g).double().view(3, reps)
    mean, se = est.mean(1), est.std(1) / math.sqrt(reps)
    truth = chain_nll(x)
    assert ((mean - truth).abs() < 4 * se).all(), (mean, truth, se)
    se_sum = se.pow(2).sum().sqrt()
    if power:
        assert (mean.sum() - truth.sum()).abs() < 4 * se_sum
        assert (1.03 * mean.sum() - truth.sum()).abs() > 4 * 1.03 * se_sum


def test_udlm_eps_branch_is_the_decoder_at_eps():
    # eps = 0.5: half the draws take the one-shot decoder at t = 0.5; with the optimal denoiser
    # the bound is still -log p(x) up to the decoder's factorisation, which enumeration gives
    module = udlm_module("cosine", "objective.eps=0.5")
    x = sample_chain(1, 5, torch.Generator().manual_seed(5))
    exact = exact_udlm_bound(module, x, 0.5)
    g = torch.Generator().manual_seed(6)
    reps = 20000
    est = module.nelbo(x.expand(reps, -1), generator=g).double()
    se = est.std() / math.sqrt(reps)
    assert abs(est.mean().item() - exact) < 4 * se
    assert exact > chain_nll(x).item() + 10 * se  # the factorised decoder at t = 0.5 costs something


def exact_discrete_uniform_bound(module, x, T):
    """The T-step bound of the uniform process on the grid i/T, enumerated: sum_i E KL_i + L prior."""
    L = x.shape[1]
    zs = torch.cartesian_prod(*[torch.arange(K)] * L).view(-1, L)
    s = module.schedule
    total = 0.0
    for i in range(1, T + 1):
        a_t, a_s = s.alpha(torch.tensor(i / T, dtype=torch.float64)), s.alpha(torch.tensor((i - 1) / T, dtype=torch.float64))
        q = torch.where(zs == x, a_t + (1 - a_t) / K, (1 - a_t) / K).prod(1)
        logp = module.denoise(zs, torch.tensor(i / T)).double()
        total += (q * uniform_step_kl(logp, x.expand_as(zs), zs, a_s, a_t).sum(1)).sum().item()
    return total + L * module.prior_nats


def test_discrete_bound_decreases_in_T_to_the_continuous_one():
    module = udlm_module("loglinear")
    x = sample_chain(1, 4, torch.Generator().manual_seed(7))
    nll = chain_nll(x).item()
    vals = [exact_discrete_uniform_bound(module, x, T) for T in (1, 4, 16, 64, 256)]
    assert all(a > b for a, b in zip(vals, vals[1:])), vals
    assert vals[-1] > nll and vals[-1] - nll < 0.02 * (vals[1] - nll)
    # the estimator with eval.discrete_steps = T is unbiased for the enumerated value
    g = torch.Generator().manual_seed(8)
    reps = 20000
    nats, t = module.nelbo_draws(x.expand(reps, -1), generator=g, discrete_steps=4)
    assert set(torch.unique(t).tolist()) == {0.25, 0.5, 0.75, 1.0}
    se = nats.double().std() / math.sqrt(reps)
    assert abs(nats.double().mean().item() - vals[1]) < 4 * se
