"""Pixel statistics, corruptions and slices on constructed images and on real SVHN test digits."""

from __future__ import annotations

import numpy as np
import pytest

from augsvhn.data import load_svhn
from augsvhn.eval import slices


@pytest.fixture(scope="module")
def test_split(svhn_root):
    return load_svhn(svhn_root, "test")


def _digit_image(background: float, stroke: float, gradient: float = 0.0) -> np.ndarray:
    """A 32 x 32 RGB image of a '1'-like bar and a crossbar of luma `stroke` on `background` (0-255)."""
    image = np.full((32, 32), background, dtype=np.float64)
    image += gradient * np.linspace(1.0, 0.0, 32)[:, None]  # brighter at the top
    image[6:26, 14:18] = stroke
    image[6:9, 11:18] = stroke
    return np.repeat(np.clip(image, 0, 255)[:, :, None], 3, axis=2).astype(np.uint8)


def test_sharpness_falls_with_blur(test_split):
    images = test_split.images[:200]
    values = [slices.sharpness(slices.gaussian_blur(images, sigma)) for sigma in (0.0, 0.7, 1.0, 2.0)]
    for sharper, blurrier in zip(values, values[1:]):
        assert np.mean(blurrier < sharper) > 0.95
    assert np.median(values[-1]) < 0.7 * np.median(values[0])


def test_sharpness_ignores_contrast(test_split):
    images = test_split.images[:200]
    dimmed = (images.astype(np.float64) * 0.4 + 20).round().astype(np.uint8)
    original = slices.sharpness(images)
    changed = slices.sharpness(dimmed)
    # Rounding to uint8 adds a little noise; the ratio otherwise stays the same.
    assert np.median(np.abs(changed / original - 1)) < 0.05


def test_constructed_backlit_image_flagged(test_split):
    scores = slices.backlight_score(test_split.images)
    threshold = np.quantile(scores, slices.BACKLIT_QUANTILE)
    backlit = _digit_image(background=60, stroke=45)
    backlit[:4] = 245  # bright sky above and beside the plate
    backlit[:, :3] = 235
    backlit[:, -3:] = 235
    plate = _digit_image(background=230, stroke=20)  # an ordinary dark-on-light plate
    score_backlit, score_plate = slices.backlight_score(np.stack([backlit, plate]))
    assert score_backlit > threshold
    assert score_plate < threshold


def test_gaussian_blur_keeps_mean(test_split):
    images = test_split.images[:50]
    blurred = slices.gaussian_blur(images, 2.0)
    assert blurred.dtype == np.uint8
    assert blurred.shape == images.shape
    assert np.abs(blurred.mean() - images.mean()) < 1.0
    assert np.array_equal(slices.gaussian_blur(images, 0.0), images)


def test_simulated_backlight_properties(test_split):
    images = test_split.images[:300]
    lit = slices.simulate_backlight(images)
    assert lit.dtype == np.uint8
    assert lit.shape == images.shape

    before, after = slices.luminance(images), slices.luminance(lit)
    unlit = slices.backlight_light_map() == 0  # (32, 32): the digit's ellipse, where no light is added
    corners = (slice(None), slice(0, 3), slice(0, 3))
    # The digit gets darker and flatter, the corners brighter.
    assert np.all(after[:, unlit].mean(axis=1) < before[:, unlit].mean(axis=1))
    assert np.all(after[:, unlit].std(axis=1) < before[:, unlit].std(axis=1))
    corner_before, corner_after = before[corners].mean(axis=(1, 2)), after[corners].mean(axis=(1, 2))
    # Top corners that were near white end near white (a 0.8-opacity light over a darkened image).
    assert np.all((corner_after > corner_before) | (corner_after > 0.85))
    assert np.mean(corner_after > corner_before) > 0.95
    assert np.mean(slices.backlight_score(lit) > slices.backlight_score(images)) > 0.95


def test_backlight_light_map_spares_digit():
    light = slices.backlight_light_map()
    assert light[16, 16] == 0.0
    assert light[0, 0] > 0.9
    assert light[31, 0] > 0.6
    assert light[0, 0] > light[31, 0]  # brighter at the top


def test_build_slices_real_test_set(test_split):
    built = {s.name: s for s in slices.build_slices(test_split.images, test_split.labels)}
    assert list(built) == ["all", "blurred", "backlit", "blur_sigma1", "blur_sigma2", "backlight"]
    n = len(test_split.labels)
    assert built["all"].n == n
    for name in ("blurred", "backlit"):
        chosen = built[name]
        assert abs(chosen.n - 0.2 * n) < 0.01 * n
        assert np.array_equal(chosen.labels, test_split.labels[chosen.indices])
        assert np.array_equal(chosen.images, test_split.images[chosen.indices])
    threshold = built["blurred"].settings["threshold"]
    assert slices.sharpness(built["blurred"].images).max() <= threshold
    for name in ("blur_sigma1", "blur_sigma2", "backlight"):
        assert built[name].n == n
        assert not np.array_equal(built[name].images, test_split.images)


def test_build_slices_rejects_bad_quantile(test_split):
    with pytest.raises(ValueError, match="blurred_quantile"):
        slices.build_slices(test_split.images[:50], test_split.labels[:50], blurred_quantile=1.5)
