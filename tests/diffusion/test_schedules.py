import math

import pytest
import torch

from dlmtrain.diffusion.schedules import SCHEDULES, get_schedule, stratified_times


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_alpha_prime_matches_finite_differences(name):
    s = get_schedule(name)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    h = 1e-6
    fd = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    assert torch.allclose(s.alpha_prime(t), fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_endpoints_and_monotone(name):
    s = get_schedule(name)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    a = s.alpha(t)
    assert a[0].item() == pytest.approx(1.0, abs=1e-12)
    assert a[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert (a[1:] <= a[:-1]).all()


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_weight_integrates_to_mask_probability(name):
    # int_eps^1 w(t) (1 - alpha(t)) dt = alpha(eps) - alpha(1) = alpha(eps): the NELBO's mass.
    s = get_schedule(name)
    eps = 1e-3
    t = torch.linspace(eps, 1, 200001, dtype=torch.float64)
    f = s.weight(t) * (1 - s.alpha(t))
    integral = torch.trapezoid(f, t).item()
    assert integral == pytest.approx(s.alpha(torch.tensor(eps, dtype=torch.float64)).item(), rel=1e-6)


def test_loglinear_weight_is_one_over_t():
    s = get_schedule("loglinear")
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(s.weight(t), 1 / t)


def test_stratified_times_cover_strata_across_ranks():
    world, b = 4, 8
    ts = torch.cat([stratified_times(b, offset=r * b, total=world * b) for r in range(world)])
    strata = torch.floor(ts * world * b).long()
    assert sorted(strata.tolist()) == list(range(world * b))
    assert ((ts >= 0) & (ts < 1)).all()


def test_stratified_times_generator_reproducible():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(stratified_times(5, generator=g1), stratified_times(5, generator=g2))
