"""SDE coefficients against their closed forms and against each other."""

import math

import numpy as np
import pytest
import torch

from augsvhn.sde import SDE_NAMES, get_sde, max_pairwise_distance, sde_from_config


def variance_rate(sde, t):
    """d std(t)^2 / dt by central differences, in float64."""
    h = 1e-5
    upper = sde.std(torch.tensor([t + h], dtype=torch.float64)) ** 2
    lower = sde.std(torch.tensor([t - h], dtype=torch.float64)) ** 2
    return float((upper - lower) / (2 * h))


@pytest.mark.parametrize("name", SDE_NAMES)
@pytest.mark.parametrize("t", [0.05, 0.3, 0.7, 0.95])
def test_sde_marginal_variance_obeys_its_ode(name, t):
    # For dx = -b(t) x / 2 dt + g(t) dw started at x0 = 0, Var' = -b(t) Var + g(t)^2 (b = 0 for VE).
    sde = get_sde(name)
    t_vec = torch.tensor([t], dtype=torch.float64)
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    linear_coefficient = float(sde.drift(x, t_vec).flatten()[0])  # f(x, t) = -b(t) x / 2 at x = 1
    variance = float(sde.std(t_vec)[0]) ** 2
    expected = 2 * linear_coefficient * variance + float(sde.diffusion(t_vec)[0]) ** 2
    assert math.isclose(variance_rate(sde, t), expected, rel_tol=1e-4)


@pytest.mark.parametrize("name", SDE_NAMES)
def test_sde_mean_coefficient_obeys_drift(name):
    # d alpha / dt = (linear drift coefficient) alpha.
    sde = get_sde(name)
    t, h = 0.4, 1e-5
    rate = (sde.alpha(torch.tensor([t + h], dtype=torch.float64)) -
            sde.alpha(torch.tensor([t - h], dtype=torch.float64))) / (2 * h)
    t_vec = torch.tensor([t], dtype=torch.float64)
    coefficient = float(sde.drift(torch.ones(1, 1, 1, 1, dtype=torch.float64), t_vec).flatten()[0])
    assert math.isclose(float(rate[0]), coefficient * float(sde.alpha(t_vec)[0]), rel_tol=1e-5, abs_tol=1e-12)


def test_vp_sde_preserves_unit_variance():
    sde = get_sde("vp")
    t = torch.linspace(0.01, 1, 9, dtype=torch.float64)
    assert torch.allclose(sde.alpha(t) ** 2 + sde.std(t) ** 2, torch.ones_like(t))


def test_subvp_std_below_vp_std():
    t = torch.linspace(0.01, 1, 9, dtype=torch.float64)
    assert bool((get_sde("subvp").std(t) < get_sde("vp").std(t)).all())


def test_ve_sigma_endpoints_and_prior():
    sde = get_sde("ve", sigma_min=0.02, sigma_max=30.0)
    ends = sde.std(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(ends, torch.tensor([0.02, 30.0], dtype=torch.float64))
    prior = sde.prior_sampling((4000, 3), torch.Generator().manual_seed(0))
    assert abs(prior.std().item() / 30.0 - 1) < 0.03


def test_marginal_prob_scales_data():
    sde = get_sde("vp")
    x0 = torch.full((2, 3, 4, 4), 0.5)
    t = torch.tensor([0.0, 1.0])
    mean, std = sde.marginal_prob(x0, t)
    assert torch.allclose(mean[0], x0[0])
    assert mean[1].abs().max() < 0.01
    assert std.shape == (2,)


@pytest.mark.parametrize("name", SDE_NAMES)
def test_sde_config_round_trip(name):
    sde = get_sde(name)
    rebuilt = sde_from_config(sde.config())
    assert type(rebuilt) is type(sde)
    assert rebuilt.config() == sde.config()


def test_sde_rejects_bad_names_and_parameters():
    with pytest.raises(ValueError, match="ve, vp, subvp"):
        get_sde("edm")
    with pytest.raises(ValueError, match="sigma_min"):
        get_sde("ve", sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="beta_min"):
        get_sde("vp", beta_min=-1.0)


def test_max_pairwise_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(37, 2, 3))
    brute = max(np.linalg.norm(a - b) for a in points.reshape(37, -1) for b in points.reshape(37, -1))
    assert math.isclose(max_pairwise_distance(points, chunk=5), brute, rel_tol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        max_pairwise_distance(points[:1])
