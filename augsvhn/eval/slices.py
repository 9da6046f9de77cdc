"""Test slices computed from pixels alone, and controlled corruptions of the whole test set.

A slice is a named set of test images with their labels. Two kinds exist:

- subsets of the real test digits picked by a pixel statistic, with the threshold set as a quantile of that
  statistic over the test set (`blurred`, `backlit`), plus `all`;
- corrupted copies of the whole test set at a fixed severity (`blur_sigma1`, `blur_sigma2`, `backlight`).

No slice looks at labels or model outputs, so every classifier is scored on the same digits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

# ITU-R BT.601 luma weights for R, G, B.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])

# Regions of a 32 x 32 SVHN crop. The crop is a square around the digit's bounding box, so the digit fills the
# full height and about the middle half of the width. The outer 3-pixel ring shows what lies around the digit.
CENTRE_ROWS = slice(4, 28)
CENTRE_COLS = slice(8, 24)
RING_WIDTH = 3

# Default slice thresholds, as quantiles of the statistic over the test set.
BLURRED_QUANTILE = 0.2  # the 20% least sharp digits
BACKLIT_QUANTILE = 0.8  # the 20% digits with the highest backlight score

# Severities of the controlled corruptions.
BLUR_SIGMAS = (1.0, 2.0)  # Gaussian blur standard deviations in pixels
BACKLIGHT_DIGIT_GAIN = 0.6  # the digit keeps this share of its brightness
BACKLIGHT_CONTRAST = 0.6  # and this share of its contrast around its mean
BACKLIGHT_STRENGTH = 0.8  # peak opacity of the added light at the image edge


@dataclass
class TestSlice:
    """A named set of test images with labels, the indices of the real test digits they come from and how."""

    name: str
    images: np.ndarray  # uint8 (n, 32, 32, 3)
    labels: np.ndarray  # int64 (n,)
    indices: np.ndarray  # int64 (n,): rows of the real test set
    description: str
    settings: dict = field(default_factory=dict)  # statistic, quantile, threshold or corruption severity

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])


def luminance(images: np.ndarray) -> np.ndarray:
    """Return the luma of uint8 RGB images (N, 32, 32, 3) in [0, 1] as float64 (N, 32, 32)."""
    images = _check_images(images)
    return images.astype(np.float64) @ LUMA_WEIGHTS / 255.0


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images of shape (N, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return images


def _ring_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[:RING_WIDTH] = True
    mask[-RING_WIDTH:] = True
    mask[:, :RING_WIDTH] = True
    mask[:, -RING_WIDTH:] = True
    return mask


# ---- statistics ---------------------------------------------------------------------------------


def sharpness(images: np.ndarray) -> np.ndarray:
    """Return a scale-free sharpness per image: RMS of the Laplacian over RMS of the gradient of the luma.

    Both energies are taken away from a 2-pixel border. Scaling the contrast or adding a constant leaves the ratio
    unchanged, so dim or low-contrast digits are not mistaken for blurred ones, unlike the plain variance of the
    Laplacian (Pech-Pacheco et al. 2000). A Gaussian blur of width sigma damps the Laplacian (frequency^2) more than
    the gradient (frequency), so the ratio falls as sigma grows. Returns float64 (N,).
    """
    luma = luminance(images)
    laplacian = np.stack([ndimage.laplace(image, mode="reflect") for image in luma])
    gradient_rows = np.stack([ndimage.sobel(image, axis=0, mode="reflect") for image in luma]) / 8.0
    gradient_cols = np.stack([ndimage.sobel(image, axis=1, mode="reflect") for image in luma]) / 8.0
    inner = (slice(None), slice(2, -2), slice(2, -2))
    laplacian_rms = np.sqrt(np.mean(laplacian[inner] ** 2, axis=(1, 2)))
    gradient_rms = np.sqrt(np.mean(gradient_rows[inner] ** 2 + gradient_cols[inner] ** 2, axis=(1, 2)))
    return laplacian_rms / np.maximum(gradient_rms, 1e-6)


def backlight_score(images: np.ndarray) -> np.ndarray:
    """Return a backlight score per image: brightness around the digit over the contrast within it.

    The numerator is the 75th percentile of the luma on the outer ring (RING_WIDTH pixels). The denominator is
    the 5-95 percentile range of the luma in the digit region (CENTRE_ROWS x CENTRE_COLS) plus 0.05. A bright
    surround with a flat, washed-out or underexposed digit, as a light source behind the plate gives, scores high;
    a plain dark-on-light plate scores low because its strokes and background span a wide range. Returns float64 (N,).
    """
    luma = luminance(images)
    n = luma.shape[0]
    centre = luma[:, CENTRE_ROWS, CENTRE_COLS].reshape(n, -1)
    ring = luma[:, _ring_mask(*luma.shape[1:])]  # (N, ring pixels)
    surround = np.percentile(ring, 75, axis=1)
    centre_range = np.percentile(centre, 95, axis=1) - np.percentile(centre, 5, axis=1)
    return surround / (centre_range + 0.05)


# ---- corruptions --------------------------------------------------------------------------------


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Blur each image with an isotropic Gaussian of standard deviation `sigma` pixels (reflect padding)."""
    images = _check_images(images)
    if sigma < 0:
        raise ValueError(f"blur sigma must be >= 0, got {sigma}")
    blurred = ndimage.gaussian_filter(images.astype(np.float64), sigma=(0, sigma, sigma, 0), mode="reflect")
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


def backlight_light_map(height: int = 32, width: int = 32) -> np.ndarray:
    """Return the opacity (H, W) in [0, 1] of the simulated light: strong at the edge, none on the digit.

    A vertical gradient (brighter at the top, like sky) times a radial ramp that is 0 inside the digit's
    ellipse and rises to 1 at the image corners.
    """
    rows = (np.arange(height) - (height - 1) / 2) / (height / 2)
    cols = (np.arange(width) - (width - 1) / 2) / (width / 2)
    radius = np.sqrt(rows[:, None] ** 2 + (cols[None, :] / 0.75) ** 2)  # (H, W); the digit is taller than wide
    radial = np.clip((radius - 0.75) / 0.5, 0.0, 1.0)
    vertical = 1.0 - 0.35 * (rows[:, None] + 1) / 2  # 1 at the top, 0.65 at the bottom
    return radial * vertical


def simulate_backlight(
    images: np.ndarray,
    digit_gain: float = BACKLIGHT_DIGIT_GAIN,
    contrast: float = BACKLIGHT_CONTRAST,
    strength: float = BACKLIGHT_STRENGTH,
) -> np.ndarray:
    """Simulate a light source behind the plate: a darker, flatter digit under a bright gradient.

    Each image x in [0, 1] is first flattened around its mean m and darkened, d = digit_gain * (m + contrast *
    (x - m)); then white light of opacity a = strength * backlight_light_map() is screen-blended on top,
    1 - (1 - d)(1 - a), which brightens the surround and leaves the digit region dark. Deterministic.
    """
    images = _check_images(images)
    for name, value in (("digit_gain", digit_gain), ("contrast", contrast), ("strength", strength)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    x = images.astype(np.float64) / 255.0
    mean = x.mean(axis=(1, 2, 3), keepdims=True)  # (N, 1, 1, 1)
    dark = digit_gain * (mean + contrast * (x - mean))
    light = strength * backlight_light_map(*images.shape[1:3])[None, :, :, None]  # (1, H, W, 1)
    out = 1.0 - (1.0 - dark) * (1.0 - light)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


# ---- slices -------------------------------------------------------------------------------------


def build_slices(
    images: np.ndarray,
    labels: np.ndarray,
    blurred_quantile: float = BLURRED_QUANTILE,
    backlit_quantile: float = BACKLIT_QUANTILE,
    blur_sigmas: tuple[float, ...] = BLUR_SIGMAS,
) -> list[TestSlice]:
    """Build every test slice from the real test images and labels.

    `blurred` contains the digits whose `sharpness` is at or below its `blurred_quantile` quantile over the test set;
    `backlit` those whose `backlight_score` is at or above its `backlit_quantile` quantile. `blur_sigma<s>` and
    `backlight` are the whole test set passed through `gaussian_blur` and `simulate_backlight`.
    """
    images = _check_images(images)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"expected {images.shape[0]} labels, got shape {labels.shape}")
    for name, q in (("blurred_quantile", blurred_quantile), ("backlit_quantile", backlit_quantile)):
        if not 0.0 < q < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {q}")
    everything = np.arange(images.shape[0])
    slices = [TestSlice("all", images, labels, everything, "every real test digit")]

    sharp = sharpness(images)
    threshold = float(np.quantile(sharp, blurred_quantile))
    chosen = np.flatnonzero(sharp <= threshold)
    slices.append(
        TestSlice(
            "blurred",
            images[chosen],
            labels[chosen],
            chosen,
            f"sharpness (RMS Laplacian / RMS gradient of the luma) <= {threshold:.4f}, "
            f"its {blurred_quantile:.0%} quantile on the test set",
            {"statistic": "sharpness", "quantile": blurred_quantile, "threshold": threshold, "side": "<="},
        )
    )

    score = backlight_score(images)
    threshold = float(np.quantile(score, backlit_quantile))
    chosen = np.flatnonzero(score >= threshold)
    slices.append(
        TestSlice(
            "backlit",
            images[chosen],
            labels[chosen],
            chosen,
            f"bright surround with a flat digit region: backlight score (surround luma p75 / (digit luma p95-p5 "
            f"range + 0.05)) >= {threshold:.3f}, its {backlit_quantile:.0%} quantile on the test set",
            {"statistic": "backlight_score", "quantile": backlit_quantile, "threshold": threshold, "side": ">="},
        )
    )

    for sigma in blur_sigmas:
        slices.append(
            TestSlice(
                f"blur_sigma{sigma:g}",
                gaussian_blur(images, sigma),
                labels,
                everything,
                f"every test digit blurred by a Gaussian of sigma {sigma:g} px",
                {"corruption": "gaussian_blur", "sigma": float(sigma)},
            )
        )
    slices.append(
        TestSlice(
            "backlight",
            simulate_backlight(images),
            labels,
            everything,
            f"every test digit darkened to {BACKLIGHT_DIGIT_GAIN:g} of its brightness and {BACKLIGHT_CONTRAST:g} of "
            f"its contrast under a white edge light of peak opacity {BACKLIGHT_STRENGTH:g}",
            {
                "corruption": "simulate_backlight",
                "digit_gain": BACKLIGHT_DIGIT_GAIN,
                "contrast": BACKLIGHT_CONTRAST,
                "strength": BACKLIGHT_STRENGTH,
            },
        )
    )
    return slices
