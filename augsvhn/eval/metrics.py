"""Sample-quality metrics on feature vectors: Fréchet distance, kernel distance, precision and recall.

All functions take float feature arrays (N, D) of two sets, the real reference and the candidate (synthetic)
digits, and are independent of the network that made the features (see `augsvhn.eval.features`).

References:
- M. Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
  NeurIPS 2017 (Fréchet distance between Gaussians fitted to the features).
- M. Binkowski et al., "Demystifying MMD GANs", ICLR 2018 (KID: unbiased MMD^2 with a cubic polynomial kernel).
- T. Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing Generative Models",
  NeurIPS 2019 (k-nearest-neighbour manifolds).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.linalg

from augsvhn.clusters import HistogramSettings, colour_histograms

logger = logging.getLogger("augsvhn.eval.metrics")

FRECHET_EPS = 1e-6  # added to both covariance diagonals when their product has no accurate, finite square root
SQRTM_TOLERANCE = 1e-6  # largest relative Frobenius residual ||R R - A|| / ||A|| of an accepted square root
IMAGINARY_TOLERANCE = 1e-3  # largest |imaginary part| of sqrtm's diagonal that is treated as round-off
DISTANCE_CHUNK = 1024  # rows per block of the pairwise distance computations


def _check_features(name: str, features: np.ndarray, min_rows: int = 1) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < min_rows:
        raise ValueError(f"{name} must be a (N, D) array with N >= {min_rows}, got shape {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return features


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the mean (D,) and unbiased covariance (D, D) of features (N, D), N >= 2."""
    features = _check_features("features", features, min_rows=2)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm(matrix: np.ndarray) -> np.ndarray | None:
    """Return scipy's matrix square root, or None when it is not finite or its square misses `matrix`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # judged by the residual below instead
        root = scipy.linalg.sqrtm(matrix)
    if not np.all(np.isfinite(root)):
        return None
    residual = np.linalg.norm(root @ root - matrix) / max(np.linalg.norm(matrix), np.finfo(np.float64).tiny)
    return root if residual <= SQRTM_TOLERANCE else None


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Return the squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), Heusel et al. 2017.
    When the matrix square root is not finite or inaccurate (singular covariances), FRECHET_EPS is added to both
    diagonals.
    Raises ValueError when the square root keeps an imaginary part larger than round-off.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"mismatched shapes: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} and {sigma2.shape}"
        )

    covariance_sqrt = _sqrtm(sigma1 @ sigma2)
    if covariance_sqrt is None:
        logger.info("product of covariances is singular; adding %g to the diagonals", FRECHET_EPS)
        offset = np.eye(len(mu1)) * FRECHET_EPS
        covariance_sqrt = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if covariance_sqrt is None:
            raise ValueError("no accurate matrix square root of the covariance product, even with an offset")

    # sqrtm returns a complex matrix when round-off makes an eigenvalue slightly negative.
    if np.iscomplexobj(covariance_sqrt):
        largest = np.max(np.abs(np.diagonal(covariance_sqrt).imag))
        if largest > IMAGINARY_TOLERANCE:
            raise ValueError(f"matrix square root has an imaginary part of {largest:.3g}; covariances are not valid")
        covariance_sqrt = covariance_sqrt.real

    difference = mu1 - mu2
    value = difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covariance_sqrt)
    return float(max(value, 0.0))  # round-off can leave -1e-12 for identical inputs


def frechet_distance_of(features_x: np.ndarray, features_y: np.ndarray) -> float:
    """Return `frechet_distance` between Gaussians fitted to two feature sets (N, D) and (M, D)."""
    return frechet_distance(*feature_statistics(features_x), *feature_statistics(features_y))


def _polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int, coef0: float) -> np.ndarray:
    return (x @ y.T / x.shape[1] + coef0) ** degree  # (n, m); gamma = 1 / D as in Binkowski et al. 2018


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """Return the unbiased estimate of MMD^2 between samples x (n, D) and y (m, D), n, m >= 2.

    Kernel k(a, b) = (a.b / D + coef0)^degree. Estimator: MMD^2_u of Gretton et al. 2012, "A Kernel Two-Sample
    Test", whose within-set means leave out the diagonal.
    """
    n, m = len(x), len(y)
    k_xx = _polynomial_kernel(x, x, degree, coef0)
    k_yy = _polynomial_kernel(y, y, degree, coef0)
    k_xy = _polynomial_kernel(x, y, degree, coef0)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kernel_distance(
    features_x: np.ndarray,
    features_y: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    degree: int = 3,
    coef0: float = 1.0,
) -> tuple[float, float]:
    """Return the kernel (Inception) distance: mean and standard deviation of `mmd2_unbiased` over random subsets.

    Each of `subsets` draws takes `subset_size` rows (capped at the size of the smaller set) from each set without
    replacement, as in Binkowski et al. 2018. The estimate is unbiased, so it can be slightly negative for sets
    from the same distribution.
    """
    features_x = _check_features("features_x", features_x, min_rows=2)
    features_y = _check_features("features_y", features_y, min_rows=2)
    if features_x.shape[1] != features_y.shape[1]:
        raise ValueError(f"feature sizes differ: {features_x.shape[1]} and {features_y.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    size = min(subset_size, len(features_x), len(features_y))
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = features_x[rng.choice(len(features_x), size, replace=False)]
        y = features_y[rng.choice(len(features_y), size, replace=False)]
        values[i] = mmd2_unbiased(x, y, degree, coef0)
    return float(values.mean()), float(values.std())


def _pairwise_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Return Euclidean distances (n, m), computed blockwise through ||a||^2 + ||b||^2 - 2 a.b."""
    x_norms, y_norms = (x * x).sum(axis=1), (y * y).sum(axis=1)
    distances = np.empty((len(x), len(y)))
    for start in range(0, len(x), DISTANCE_CHUNK):
        block = x[start : start + DISTANCE_CHUNK]
        squared = x_norms[start : start + DISTANCE_CHUNK, None] + y_norms[None, :] - 2.0 * block @ y.T
        distances[start : start + DISTANCE_CHUNK] = np.sqrt(np.maximum(squared, 0.0))
    return distances


def knn_radii(features: np.ndarray, k: int = 3) -> np.ndarray:
    """Return each row's distance to its k-th nearest other row of the same set (N,)."""
    if not 1 <= k < len(features):
        raise ValueError(f"k must be in 1..{len(features) - 1} for a set of {len(features)}, got {k}")
    distances = _pairwise_distances(features, features)
    # Column 0 of the sorted row is the point itself (distance 0), so the k-th neighbour is column k.
    return np.partition(distances, k, axis=1)[:, k]


def manifold_coverage(reference: np.ndarray, queries: np.ndarray, k: int = 3) -> float:
    """Share of `queries` inside the k-NN manifold of `reference`: the union of the balls around each reference
    row with radius its distance to its k-th nearest reference neighbour (Kynkäänniemi et al. 2019)."""
    radii = knn_radii(reference, k)
    inside = np.zeros(len(queries), dtype=bool)
    for start in range(0, len(queries), DISTANCE_CHUNK):
        distances = _pairwise_distances(queries[start : start + DISTANCE_CHUNK], reference)
        inside[start : start + DISTANCE_CHUNK] = (distances <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Return (precision, recall) of Kynkäänniemi et al. 2019.

    Precision: share of fake rows inside the real manifold (are the samples realistic?).
    Recall: share of real rows inside the fake manifold (do the samples cover the real variety?).
    """
    real = _check_features("real", real, min_rows=k + 1)
    fake = _check_features("fake", fake, min_rows=k + 1)
    return manifold_coverage(real, fake, k), manifold_coverage(fake, real, k)


def label_agreement(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Share of digits whose predicted class equals the label they were generated with."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape or predicted.ndim != 1 or len(labels) == 0:
        raise ValueError(f"need two equal, non-empty 1-D arrays, got shapes {predicted.shape} and {labels.shape}")
    return float(np.mean(predicted == labels))


def colour_histogram_distance(
    images_x: np.ndarray, images_y: np.ndarray, settings: HistogramSettings = HistogramSettings()
) -> float:
    """Return the total variation distance between the per-channel colour histograms of two image sets.

    Each set's histogram is the mean of `augsvhn.clusters.colour_histograms` over its images, so each channel sums
    to 1. The distance is 0.5 * sum |p - q| averaged over the three channels: 0 for equal pixel distributions,
    1 for disjoint ones.
    """
    bins = settings.bins_per_channel
    p = colour_histograms(images_x, settings).mean(axis=0).reshape(3, bins)  # (channel, bin)
    q = colour_histograms(images_y, settings).mean(axis=0).reshape(3, bins)
    return float(0.5 * np.abs(p - q).sum(axis=1).mean())
