"""Samplers against the exact denoiser of Gaussian data, whose samples must have the data's mean and variance."""

import math

import numpy as np
import pytest
import torch

from augsvhn.models import NULL_LABEL, build_denoiser
from augsvhn.sampling import (
    DEFAULT_STEPS,
    SAMPLER_NAMES,
    GuidedDenoiser,
    expected_nfe,
    get_sampler,
    karras_sigmas,
    shard_generator,
    to_uint8,
)
from augsvhn.sde import get_sde

DATA_MEAN = 0.1
DATA_STD = 0.25


class GaussianDenoiser:
    """Exact E[x0 | x0 + sigma n] for x0 ~ N(mean_of_label, DATA_STD^2 I): mean + s^2 / (s^2 + sigma^2) (x - mean).

    Label c has mean DATA_MEAN + 0.05 c; NULL_LABEL (unconditional) has mean DATA_MEAN.
    """

    def __call__(self, x, sigma, labels):
        mean = DATA_MEAN + 0.05 * torch.where(labels == NULL_LABEL, torch.zeros_like(labels), labels).float()
        mean = mean.reshape(-1, 1, 1, 1)
        sigma = sigma.reshape(-1, 1, 1, 1)
        return mean + DATA_STD**2 / (DATA_STD**2 + sigma**2) * (x - mean)


def prior_shrink(sde_name):
    """Factor by which the exact probability-flow map from the VE prior N(0, sigma_max^2) shrinks the data mean.

    The ODE maps N(m, s^2 + sigma_max^2) affinely onto N(m, s^2), x0 = m + s / sqrt(s^2 + sigma_max^2) (x - m),
    so a prior centred on 0 instead of m gives the mean m (1 - s / sqrt(s^2 + sigma_max^2)).
    """
    return 1 - DATA_STD / math.sqrt(DATA_STD**2 + 20.0**2) if sde_name == "ve" else 1.0


def make_sde(name):
    return get_sde(name, sigma_max=20.0) if name == "ve" else get_sde(name)


# Steps high enough that the discretisation error is well inside the tolerances below.
HIGH_STEPS = {"heun": 60, "dpm2m": 120, "pc": 400, "em": 600, "ode": None}


@pytest.mark.parametrize("sde_name", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("sampler_name", SAMPLER_NAMES)
def test_sampler_matches_gaussian(sde_name, sampler_name):
    if sde_name == "subvp" and sampler_name in ("pc", "em"):
        pytest.skip("sub-VP shares the VP drift; its SDE samplers are covered by the VP case")
    labels = torch.zeros(48, dtype=torch.long)
    result = get_sampler(sampler_name)(
        GaussianDenoiser(), make_sde(sde_name), labels, generator=torch.Generator().manual_seed(1),
        steps=HIGH_STEPS[sampler_name],
    )
    sample_mean = result.images.mean().item()
    sample_std = result.images.std().item()
    assert result.images.shape == (48, 3, 32, 32)
    assert abs(sample_mean - DATA_MEAN) < 0.01, sample_mean
    assert abs(sample_std / DATA_STD - 1) < 0.03, sample_std
    if sampler_name != "ode":
        assert result.nfe == expected_nfe(sampler_name, HIGH_STEPS[sampler_name])


def test_sampler_conditional_means_follow_labels():
    labels = torch.arange(10).repeat_interleave(8)
    result = get_sampler("heun")(GaussianDenoiser(), make_sde("ve"), labels,
                                 generator=torch.Generator().manual_seed(0), steps=40)
    per_label = result.images.mean(dim=(1, 2, 3)).reshape(10, 8).mean(dim=1)
    expected = (DATA_MEAN + 0.05 * torch.arange(10).float()) * prior_shrink("ve")
    assert torch.allclose(per_label, expected, atol=0.006)


def test_guidance_extrapolates_away_from_unconditional():
    # With D_guided = D_c + w (D_c - D_u) and exact Gaussian denoisers, the guided mean of label c moves to
    # mean_c + w (mean_c - mean_u) at sigma -> 0.
    labels = torch.full((32,), 4)
    result = get_sampler("heun")(GaussianDenoiser(), make_sde("ve"), labels,
                                 generator=torch.Generator().manual_seed(0), steps=40, guidance=1.0)
    mean_c = DATA_MEAN + 0.2
    assert abs(result.images.mean().item() - (mean_c + 1.0 * 0.2) * prior_shrink("ve")) < 0.006


def test_wrong_sign_sampler_fails_the_gaussian_check():
    # The check above must be able to fail: a denoiser pulling to the wrong mean gives the wrong samples.
    class Shifted(GaussianDenoiser):
        def __call__(self, x, sigma, labels):
            return super().__call__(x, sigma, labels) + 0.2

    result = get_sampler("heun")(Shifted(), make_sde("ve"), torch.zeros(16, dtype=torch.long),
                                 generator=torch.Generator().manual_seed(0), steps=40)
    assert abs(result.images.mean().item() - DATA_MEAN) > 0.1


@pytest.mark.parametrize("sampler_name", ["heun", "dpm2m", "em"])
def test_sampler_batch_size_cannot_change_result(sampler_name):
    torch.manual_seed(0)
    denoiser = build_denoiser("tiny").eval()
    with torch.no_grad():
        for parameter in denoiser.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    labels = torch.randint(0, 10, (21,), generator=torch.Generator().manual_seed(3))
    results = [
        get_sampler(sampler_name)(denoiser, make_sde("ve"), labels, generator=torch.Generator().manual_seed(5),
                                  steps=4, guidance=1.0, batch_size=batch_size)
        for batch_size in (21, 8, 1)
    ]
    for other in results[1:]:
        assert torch.equal(results[0].images, other.images)


def test_shard_generator_depends_on_all_three_keys():
    draws = {key: torch.rand(4, generator=shard_generator(*key)) for key in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]}
    values = list(draws.values())
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert not torch.equal(values[i], values[j])
    assert torch.equal(torch.rand(4, generator=shard_generator(0, 0, 0)), draws[(0, 0, 0)])


def test_karras_sigmas_endpoints_and_order():
    sigmas = karras_sigmas(0.002, 80.0, 18)
    assert len(sigmas) == 19
    assert math.isclose(sigmas[0].item(), 80.0, rel_tol=1e-12)
    assert math.isclose(sigmas[-2].item(), 0.002, rel_tol=1e-9)
    assert sigmas[-1].item() == 0
    assert bool((sigmas[:-1] > sigmas[1:]).all())


def test_to_uint8_maps_range_and_layout():
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    out = to_uint8(images)
    assert out.dtype == np.uint8
    assert out.shape == (1, 2, 2, 3)
    assert out[0, :, :, 0].tolist() == [[0, 128], [255, 255]]


def test_guided_denoiser_rejects_bad_arguments():
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="guidance"):
        GuidedDenoiser(GaussianDenoiser(), labels, guidance=-1.0)
    with pytest.raises(ValueError, match="guidance"):
        GuidedDenoiser(GaussianDenoiser(), labels, guidance=float("nan"))
    with pytest.raises(ValueError, match="batch_size"):
        GuidedDenoiser(GaussianDenoiser(), labels, batch_size=0)


def test_unknown_sampler_names_choices():
    with pytest.raises(ValueError, match="heun"):
        get_sampler("ddim")


def test_default_steps_cover_every_sampler():
    assert set(DEFAULT_STEPS) == set(SAMPLER_NAMES)
