"""Forward SDEs of score-based generative modelling: VE, VP and sub-VP.

Song, Sohl-Dickstein, Kingma, Kumar, Ermon and Poole, "Score-Based Generative Modeling through Stochastic
Differential Equations", ICLR 2021 (arXiv:2011.13456). Every SDE has the form dx = f(x, t) dt + g(t) dw on
t in [0, T] with T = 1, and a Gaussian perturbation kernel p_t(x | x0) = N(alpha(t) x0, std(t)^2 I).

Images are scaled to [-1, 1]. The denoiser network works in the "VE-equivalent" scaling x / alpha(t), whose
noise level is `ve_sigma(t) = std(t) / alpha(t)` (Karras et al. 2022, section 4), so one network serves all
three SDEs.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

SDE_NAMES = ("ve", "vp", "subvp")


def _batch_view(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample values (B,) to broadcast against x (B, C, H, W)."""
    return values.reshape(-1, *([1] * (x.ndim - 1)))


class SDE:
    """Interface of a forward SDE. Times `t` are tensors of shape (B,)."""

    name: str = ""
    T: float = 1.0
    eps: float = 1e-3

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x, t)."""
        raise NotImplementedError

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """g(t), shape (B,)."""
        raise NotImplementedError

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Mean coefficient of the perturbation kernel, shape (B,)."""
        raise NotImplementedError

    def std(self, t: torch.Tensor) -> torch.Tensor:
        """Standard deviation of the perturbation kernel, shape (B,)."""
        raise NotImplementedError

    def prior_std(self) -> float:
        """Standard deviation of the prior p_T, a zero-mean isotropic Gaussian."""
        raise NotImplementedError

    def marginal_prob(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the mean (B, C, H, W) and standard deviation (B,) of p_t(x | x0)."""
        return _batch_view(self.alpha(t), x0) * x0, self.std(t)

    def ve_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level of x(t) / alpha(t), the scaling of the denoiser's input, shape (B,)."""
        return self.std(t) / self.alpha(t)

    def prior_sampling(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x(T) from the prior on the CPU."""
        return torch.randn(shape, generator=generator) * self.prior_std()

    def config(self) -> dict:
        """JSON-serialisable settings; `sde_from_config` rebuilds the SDE from them."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self.config().items() if key != "name")
        return f"{type(self).__name__}({params})"


class VESDE(SDE):
    """Variance-exploding SDE (Song et al. 2021, eq. (30)): sigma(t) = sigma_min (sigma_max / sigma_min)^t.

    dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw, with alpha(t) = 1 and std(t) = sigma(t).
    `sigma_max` should be about the largest Euclidean distance between two training images (Song and Ermon 2020,
    "Improved techniques for training score-based generative models", technique 1).
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, eps: float = 1e-5):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VE SDE needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.eps = float(eps)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def drift(self, x, t):
        return torch.zeros_like(x)

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2 * self._log_ratio)

    def alpha(self, t):
        return torch.ones_like(t)

    def std(self, t):
        return self.sigma(t)

    def prior_std(self):
        return self.sigma_max

    def config(self):
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "eps": self.eps}


class VPSDE(SDE):
    """Variance-preserving SDE (Song et al. 2021, eq. (32)), the continuous DDPM.

    dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw with beta(t) = beta_min + t (beta_max - beta_min).
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"VP SDE needs 0 < beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.eps = float(eps)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha(t) = -integral_0^t beta(s) ds / 2 (Song et al. 2021, eq. (33))."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def drift(self, x, t):
        return -0.5 * _batch_view(self.beta(t), x) * x

    def diffusion(self, t):
        return torch.sqrt(self.beta(t))

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def std(self, t):
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def prior_std(self):
        return 1.0

    def config(self):
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max, "eps": self.eps}


class SubVPSDE(VPSDE):
    """Sub-VP SDE (Song et al. 2021, eq. (34)): the VP drift with a smaller diffusion.

    g(t)^2 = beta(t) (1 - exp(-2 integral_0^t beta(s) ds)), std(t) = 1 - alpha(t)^2.
    """

    name = "subvp"

    def diffusion(self, t):
        return torch.sqrt(self.beta(t) * -torch.expm1(4 * self.log_alpha(t)))

    def std(self, t):
        return -torch.expm1(2 * self.log_alpha(t))


_SDE_CLASSES: dict[str, Callable[..., SDE]] = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}


def get_sde(name: str, **params) -> SDE:
    """Build an SDE by name (one of SDE_NAMES) with its parameters."""
    if name not in _SDE_CLASSES:
        raise ValueError(f"unknown SDE {name!r}; choose one of {', '.join(SDE_NAMES)}")
    return _SDE_CLASSES[name](**params)


def sde_from_config(config: dict) -> SDE:
    """Rebuild an SDE from `SDE.config()`."""
    params = dict(config)
    return get_sde(params.pop("name"), **params)


def max_pairwise_distance(images: np.ndarray | torch.Tensor, chunk: int = 1024) -> float:
    """Return the largest Euclidean distance between two images (rows of a float array, any shape per row).

    Exact, in O(N^2) time and O(chunk * N) memory: 4,500 SVHN digits take about a second on 2 CPU cores.
    """
    flat = torch.as_tensor(np.asarray(images), dtype=torch.float64).reshape(len(images), -1)  # (N, D)
    if len(flat) < 2:
        raise ValueError(f"need at least 2 images to measure a pairwise distance, got {len(flat)}")
    largest = 0.0
    for start in range(0, len(flat), chunk):
        distances = torch.cdist(flat[start : start + chunk], flat)  # (chunk, N)
        largest = max(largest, float(distances.max()))
    return largest
