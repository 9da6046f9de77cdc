"""Denoising score matching losses at the exact denoiser of Gaussian data, where their values are known."""

import math

import numpy as np
import pytest
import torch

from augsvhn.losses import drop_labels, get_loss
from augsvhn.models import NULL_LABEL
from augsvhn.sde import get_sde


class ExactGaussianDenoiser:
    """E[x0 | x0 + sigma n] for x0 ~ N(0, s^2 I)."""

    def __init__(self, std):
        self.sigma_data = std
        self.std = std

    def __call__(self, x, sigma, labels):
        return self.std**2 / (self.std**2 + sigma.reshape(-1, 1, 1, 1) ** 2) * x


def gaussian_batch(std, n=512, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * std


def test_edm_loss_of_exact_denoiser_is_one():
    # With sigma_data = s, E|D - x0|^2 per pixel is s^2 sigma^2 / (s^2 + sigma^2), and the EDM weight
    # (sigma^2 + s^2) / (sigma s)^2 turns it into exactly 1 at every noise level.
    std = 0.5
    loss = get_loss("edm", get_sde("ve"))
    values = loss(ExactGaussianDenoiser(std), gaussian_batch(std), torch.zeros(512, dtype=torch.long),
                  generator=torch.Generator().manual_seed(1))
    assert values.shape == (512,)
    assert abs(values.mean().item() - 1) < 0.01


def test_dsm_loss_of_exact_denoiser_matches_integral():
    # VE: the per-image loss is sum over pixels of |D - x0|^2 / sigma^2, whose expectation is
    # 3072 * E_t[s^2 / (s^2 + sigma(t)^2)] with sigma(t) log-uniform between sigma_min and sigma_max.
    std, sigma_min, sigma_max = 0.5, 0.01, 20.0
    sde = get_sde("ve", sigma_min=sigma_min, sigma_max=sigma_max)
    t = np.linspace(sde.eps, 1, 200001)
    sigma = sigma_min * (sigma_max / sigma_min) ** t
    expected = 3072 * np.trapezoid(std**2 / (std**2 + sigma**2), t) / (1 - sde.eps)
    loss = get_loss("dsm", sde)
    values = loss(ExactGaussianDenoiser(std), gaussian_batch(std, n=2048), torch.zeros(2048, dtype=torch.long),
                  generator=torch.Generator().manual_seed(2))
    assert math.isclose(values.mean().item(), expected, rel_tol=0.04)


@pytest.mark.parametrize("name", ["edm", "dsm"])
@pytest.mark.parametrize("sde_name", ["ve", "vp"])
def test_loss_is_lower_for_exact_denoiser(name, sde_name):
    std = 0.5
    loss = get_loss(name, get_sde(sde_name))
    x0 = gaussian_batch(std, n=256)
    labels = torch.zeros(256, dtype=torch.long)
    exact = ExactGaussianDenoiser(std)

    def biased(x, sigma, labels):
        return exact(x, sigma, labels) * 0.8

    biased.sigma_data = std
    exact_loss = loss(exact, x0, labels, generator=torch.Generator().manual_seed(3)).mean()
    biased_loss = loss(biased, x0, labels, generator=torch.Generator().manual_seed(3)).mean()
    assert exact_loss < biased_loss


def test_drop_labels_rate():
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = drop_labels(labels, 0.1, torch.Generator().manual_seed(0))
    share = (dropped == NULL_LABEL).float().mean().item()
    assert abs(share - 0.1) < 0.01
    assert set(dropped.unique().tolist()) == {0, NULL_LABEL}
    assert torch.equal(drop_labels(labels, 0.0), labels)


def test_get_loss_rejects_unknown_name():
    with pytest.raises(ValueError, match="edm, dsm"):
        get_loss("l2", get_sde("ve"))
