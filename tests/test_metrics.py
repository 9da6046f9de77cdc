"""Sample-quality metrics against closed-form values and hand-computed cases."""

import numpy as np
import pytest

from augsvhn.eval.metrics import (
    colour_histogram_distance,
    feature_statistics,
    frechet_distance,
    frechet_distance_of,
    kernel_distance,
    knn_radii,
    label_agreement,
    mmd2_unbiased,
    precision_recall,
)


def test_frechet_identical_sets_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 16))
    assert frechet_distance_of(features, features) == pytest.approx(0.0, abs=1e-8)


def test_frechet_diagonal_closed_form():
    # For diagonal covariances, (sigma1 sigma2)^(1/2) = diag(sqrt(a b)), so the trace term is sum (sqrt a - sqrt b)^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_full_covariance_closed_form():
    # Commuting covariances Q diag(a) Q^T and Q diag(b) Q^T share eigenvectors, so the diagonal formula holds.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.5, 3.0, 5), rng.uniform(0.5, 3.0, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    value = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert value == pytest.approx(expected, rel=1e-7)


def test_frechet_sampled_gaussians_near_closed_form():
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, size=(20000, 4))
    y = rng.normal(2.0, 2.0, size=(20000, 4))
    expected = 4 * 2.0**2 + 4 * (1.0 - 2.0) ** 2  # ||mu||^2 + sum (sqrt(1) - sqrt(4))^2 = 16 + 4
    assert frechet_distance_of(x, y) == pytest.approx(expected, rel=0.03)


def test_frechet_singular_covariance_finite():
    # Dead ReLU units give all-zero feature columns and singular covariances.
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(200, 6)), rng.normal(0.5, 1.0, size=(200, 6))
    x[:, :2] = 0.0
    y[:, :2] = 0.0
    value = frechet_distance_of(x, y)
    assert np.isfinite(value)
    assert value == pytest.approx(frechet_distance_of(x[:, 2:], y[:, 2:]), abs=1e-4)


def test_frechet_disjoint_sets_large():
    rng = np.random.default_rng(4)
    near = frechet_distance_of(rng.normal(size=(1000, 8)), rng.normal(size=(1000, 8)))
    far = frechet_distance_of(rng.normal(size=(1000, 8)), rng.normal(10.0, 1.0, size=(1000, 8)))
    assert near < 0.2
    assert far > 700  # 8 * 10^2 = 800 from the means alone


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mismatched shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_unbiased_covariance():
    features = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(mu, [1.0, 1.0])
    np.testing.assert_allclose(sigma, np.eye(2) * 4.0 / 3.0)  # sum of squares 4 over n - 1 = 3


def test_mmd_unbiased_by_hand():
    # One-dimensional x = [0, 1], y = [2, 3], kernel (a b + 1)^3 with D = 1.
    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])
    k = lambda a, b: (a * b + 1.0) ** 3  # noqa: E731
    within_x = 2 * k(0, 1) / 2
    within_y = 2 * k(2, 3) / 2
    between = (k(0, 2) + k(0, 3) + k(1, 2) + k(1, 3)) / 4
    assert mmd2_unbiased(x, y) == pytest.approx(within_x + within_y - 2 * between)


def test_kid_identical_near_zero_and_shifted_positive():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    same, same_std = kernel_distance(x, y, subsets=20, subset_size=300)
    shifted, _ = kernel_distance(x, y + 1.0, subsets=20, subset_size=300)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 0.1
    assert shifted > 50 * abs(same)


def test_kid_rejects_feature_size_mismatch():
    with pytest.raises(ValueError, match="feature sizes differ"):
        kernel_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_knn_radii_on_a_line():
    points = np.array([[0.0], [1.0], [3.0], [6.0]])
    np.testing.assert_allclose(knn_radii(points, k=1), [1.0, 1.0, 2.0, 3.0])
    np.testing.assert_allclose(knn_radii(points, k=2), [3.0, 2.0, 3.0, 5.0])


def test_precision_recall_identical_is_one():
    features = np.random.default_rng(6).normal(size=(300, 8))
    assert precision_recall(features, features.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_far_apart_is_zero():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(300, 8)), rng.normal(100.0, 1.0, size=(300, 8))
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_mode_collapse():
    # Fake digits all from one corner of the real cloud: realistic (high precision) but no coverage (low recall).
    rng = np.random.default_rng(8)
    real = rng.normal(size=(1000, 2))
    fake = rng.normal(0.0, 0.05, size=(1000, 2)) + real[0]
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.9
    assert recall < 0.1


def test_label_agreement_hand_made():
    assert label_agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 0])) == 0.5
    with pytest.raises(ValueError, match="equal, non-empty"):
        label_agreement(np.array([1, 2]), np.array([1]))


def test_colour_histogram_distance_bounds():
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    dark = np.zeros((5, 32, 32, 3), dtype=np.uint8)
    bright = np.full((5, 32, 32, 3), 255, dtype=np.uint8)
    assert colour_histogram_distance(images, images) == 0.0
    assert colour_histogram_distance(dark, bright) == 1.0
    assert 0.0 < colour_histogram_distance(images, dark) < 1.0
