"""Batch augmentations for digit classifiers, applied to float tensors (B, 3, 32, 32) in [0, 1].

Every random draw comes from an explicit `torch.Generator` on the CPU, so a training run is reproducible from its
seed. Nothing here flips images: a mirrored 2, 3, 5 or 7 is not the same digit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CROP_PADDING = 2  # random crop: pad by this many pixels (reflect), then cut 32 x 32 at a random offset
JITTER = 0.2  # colour jitter: brightness, contrast and saturation factors drawn from [1 - JITTER, 1 + JITTER]

# Classic photometric augmentation (the `classic_augmentation` arm), on top of the digit-safe one.
BLUR_PROBABILITY = 0.5
BLUR_SIGMA_RANGE = (0.3, 2.0)  # pixels
BLUR_RADIUS = 4  # kernel of 2 * 4 + 1 taps covers +-2 sigma at the largest sigma
CLASSIC_BRIGHTNESS = 0.4  # factor from [0.6, 1.4]
CLASSIC_CONTRAST = 0.5  # factor from [0.5, 1.5]
CLASSIC_GAMMA_LOG_RANGE = math.log(1.8)  # gamma = exp(u), u from [-log 1.8, log 1.8]


def _uniform(size: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator)


def random_crop(x: torch.Tensor, generator: torch.Generator, padding: int = CROP_PADDING) -> torch.Tensor:
    """Pad each image by `padding` pixels (reflect) and cut it back to its size at a random offset."""
    batch, channels, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding), mode="reflect")
    offsets_rows = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(x.device)
    offsets_cols = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(x.device)
    rows = offsets_rows[:, None] + torch.arange(height, device=x.device)  # (B, H)
    cols = offsets_cols[:, None] + torch.arange(width, device=x.device)  # (B, W)
    batch_index = torch.arange(batch, device=x.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return cropped.permute(0, 3, 1, 2)


def _grey(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)
    return (x * weights[:, None, None]).sum(dim=1, keepdim=True)  # (B, 1, H, W)


def adjust_brightness_contrast(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """Scale each image by `brightness` (B,), then its contrast around its mean grey level by `contrast` (B,)."""
    x = x * brightness[:, None, None, None]
    mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return (mean + contrast[:, None, None, None] * (x - mean)).clamp(0, 1)


def colour_jitter(x: torch.Tensor, generator: torch.Generator, amount: float = JITTER) -> torch.Tensor:
    """Scale brightness, contrast and saturation of each image by random factors from [1 - amount, 1 + amount]."""
    batch = x.shape[0]
    brightness = _uniform(batch, 1 - amount, 1 + amount, generator).to(x.device)
    contrast = _uniform(batch, 1 - amount, 1 + amount, generator).to(x.device)
    saturation = _uniform(batch, 1 - amount, 1 + amount, generator).to(x.device)
    x = adjust_brightness_contrast(x, brightness, contrast)
    grey = _grey(x)
    return (grey + saturation[:, None, None, None] * (x - grey)).clamp(0, 1)


def gaussian_blur_batch(x: torch.Tensor, sigma: torch.Tensor, radius: int = BLUR_RADIUS) -> torch.Tensor:
    """Blur image b with a separable Gaussian of standard deviation sigma[b] pixels. Sigma 0 leaves it unchanged."""
    batch, channels, height, width = x.shape
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    safe_sigma = sigma.to(x.device, x.dtype).clamp_min(1e-3)[:, None]
    kernel = torch.exp(-0.5 * (taps[None, :] / safe_sigma) ** 2)  # (B, taps)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (taps == 0).to(x.dtype)[None, :].expand_as(kernel)
    kernel = torch.where((sigma.to(x.device) > 0)[:, None], kernel, identity)
    kernel = kernel.repeat_interleave(channels, dim=0)  # (B * C, taps): one kernel per image and channel

    # One group per (image, channel) so each image gets its own kernel.
    flat = F.pad(x.reshape(1, batch * channels, height, width), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=batch * channels)  # along columns
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=batch * channels)  # along rows
    return flat.reshape(batch, channels, height, width)


def classic_photometric(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Classic augmentation: random Gaussian blur, then brightness, contrast and gamma changes per image."""
    batch = x.shape[0]
    blur = torch.rand(batch, generator=generator) < BLUR_PROBABILITY
    sigma = torch.where(blur, _uniform(batch, *BLUR_SIGMA_RANGE, generator), torch.zeros(batch))
    x = gaussian_blur_batch(x, sigma)
    brightness = _uniform(batch, 1 - CLASSIC_BRIGHTNESS, 1 + CLASSIC_BRIGHTNESS, generator).to(x.device)
    contrast = _uniform(batch, 1 - CLASSIC_CONTRAST, 1 + CLASSIC_CONTRAST, generator).to(x.device)
    x = adjust_brightness_contrast(x, brightness, contrast)
    gamma = torch.exp(_uniform(batch, -CLASSIC_GAMMA_LOG_RANGE, CLASSIC_GAMMA_LOG_RANGE, generator)).to(x.device)
    return x.clamp_min(1e-6) ** gamma[:, None, None, None]


def augment_batch(x: torch.Tensor, generator: torch.Generator, classic: bool = False) -> torch.Tensor:
    """Apply the digit-safe augmentation (random crop, colour jitter), plus `classic_photometric` when asked."""
    x = random_crop(x, generator)
    if classic:
        x = classic_photometric(x, generator)
    return colour_jitter(x, generator)
