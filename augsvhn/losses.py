"""Denoising score matching losses for a `Denoiser` under an SDE.

Two weightings of the same objective, both training D(x0 + sigma n, sigma) to recover x0:
- "dsm": Song et al. 2021, eq. (7), with t ~ U(eps, T) and lambda(t) = std(t)^2, so the loss of one image is
  || std(t) s(x(t), t) + z ||^2 summed over pixels, z the noise added. For the VE SDE this is
  || (D - x0) / sigma ||^2 with sigma log-uniform on [sigma_min, sigma_max].
- "edm": Karras et al. 2022, section 5 and Table 1: log sigma ~ N(P_mean, P_std^2) and
  lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on || D - x0 ||^2, averaged over pixels.
  It puts the training effort on the middle noise levels that decide what the image shows, and converges in a
  fraction of the steps of "dsm" on small budgets.
"""

from __future__ import annotations

from typing import Callable

import torch

from augsvhn.models import NULL_LABEL, Denoiser
from augsvhn.sde import SDE, _batch_view

LOSS_NAMES = ("edm", "dsm")

LossFn = Callable[..., torch.Tensor]


def drop_labels(labels: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by NULL_LABEL with probability `rate`, for classifier-free guidance (Ho and Salimans 2022)."""
    if rate <= 0:
        return labels
    keep = torch.rand(labels.shape, generator=generator, device="cpu").to(labels.device) >= rate
    return torch.where(keep, labels, torch.full_like(labels, NULL_LABEL))


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device="cpu").to(x.device)


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device="cpu").to(device)


class DSMLoss:
    """Song et al. 2021, eq. (7) with lambda(t) = std(t)^2: per-image || std(t) score + z ||^2 summed over pixels."""

    name = "dsm"

    def __init__(self, sde: SDE):
        self.sde = sde

    def __call__(self, denoiser: Denoiser, x0: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        sde = self.sde
        t = _rand(len(x0), generator, x0.device) * (sde.T - sde.eps) + sde.eps  # (B,)
        z = _randn_like(x0, generator)
        mean, std = sde.marginal_prob(x0, t)
        alpha = sde.alpha(t)
        xt = mean + _batch_view(std, x0) * z

        # score = (alpha D(x / alpha, sigma_ve) - x) / std^2, so std * score + z = (alpha D - mean) / std.
        denoised = denoiser(xt / _batch_view(alpha, x0), sde.ve_sigma(t), labels)
        residual = (_batch_view(alpha, x0) * denoised - mean) / _batch_view(std, x0)
        return residual.square().flatten(1).sum(dim=1)

    def config(self) -> dict:
        return {"name": self.name}


class EDMLoss:
    """Karras et al. 2022, Table 1 ("Ours" column): lognormal noise levels and the EDM weighting, pixel mean.

    The noise level is in the VE-equivalent scaling, so the same loss trains a denoiser for any SDE.
    """

    name = "edm"

    def __init__(self, sde: SDE, p_mean: float = -1.2, p_std: float = 1.2):
        self.sde = sde
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)

    def __call__(self, denoiser: Denoiser, x0: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        sigma_data = denoiser.sigma_data
        log_sigma = torch.randn(len(x0), generator=generator, device="cpu").to(x0.device)
        sigma = (log_sigma * self.p_std + self.p_mean).exp()  # (B,)
        noise = _randn_like(x0, generator)
        denoised = denoiser(x0 + _batch_view(sigma, x0) * noise, sigma, labels)
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        return weight * (denoised - x0).square().flatten(1).mean(dim=1)

    def config(self) -> dict:
        return {"name": self.name, "p_mean": self.p_mean, "p_std": self.p_std}


def get_loss(name: str, sde: SDE, **params) -> LossFn:
    """Build a loss by name (one of LOSS_NAMES): `loss(denoiser, x0, labels, generator) -> (B,)` per-image losses."""
    if name == "dsm":
        return DSMLoss(sde, **params)
    if name == "edm":
        return EDMLoss(sde, **params)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
