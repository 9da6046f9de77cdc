"""Score synthetic digits against real SVHN: the `eval-samples` report and an in-memory API for benchmarks.

Every metric is computed in the feature space of `augsvhn.eval.features` (a small CNN trained on the real train
split), with the real test split as the reference. Rows of the report:

- `cluster-<k>`: the synthetic digits of colour cluster k (shard attribute `cluster`);
- `all`: the synthetic digits of every cluster together;
- `real_train`: real train digits in place of synthetic ones. The feature net was trained on them, so their FD
  and KID come out higher than those of unseen real digits, and their label agreement is optimistic;
- `real_test_held_out`: the real test digits outside the reference subsample, unseen by the feature net: the
  floor without the train/test gap of `real_train` (absent when at most k test digits are left outside);
- `noise`: uniform random pixels with random labels, the worst score to expect (the ceiling of FD and KID).
  NOTE: its precision can still be high while its recall is 0. The feature net maps all noise images to one small
  region of feature space, and the wide k-NN balls of a few low-contrast real digits can cover that region.

Each row contains `frechet_distance`, `kid` (and `kid_std`), `precision`, `recall`, `label_agreement`,
`cas_accuracy` (Classification Accuracy Score: a `DigitCNN` trained on that row's digits alone, scored on the
real test split; Ravuri and Vinyals, NeurIPS 2019) and `colour_histogram_distance` (to the real train digits of
the same colour cluster, or to the whole real train split when no clusters are given).
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from augsvhn import __version__
from augsvhn.clusters import HistogramSettings
from augsvhn.eval.features import FeatureExtractor, FeatureNetSettings, accuracy_of, train_digit_cnn
from augsvhn.eval.metrics import (
    colour_histogram_distance,
    feature_statistics,
    frechet_distance,
    kernel_distance,
    label_agreement,
    precision_recall,
)
from augsvhn.errors import DataError
from augsvhn.fsutil import atomic_write_bytes, atomic_write_json

logger = logging.getLogger("augsvhn.eval.quality")

DEFAULT_SAMPLES = 2000  # digits per row and in the real reference; FD is biased upwards for small counts
METRIC_NAMES = ("frechet_distance", "kid", "precision", "recall", "label_agreement")


@dataclass(frozen=True)
class QualitySettings:
    """Sample counts and metric parameters of one report; written into metrics.json."""

    samples: int = DEFAULT_SAMPLES  # digits drawn per row (all when fewer) and from the real test split
    k: int = 3  # nearest neighbours of the precision/recall manifolds
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # capped at the smaller set
    cas_steps: int = 280  # optimiser steps of each CAS classifier; 0 skips CAS
    seed: int = 0  # subsampling, noise images and CAS training

    def __post_init__(self) -> None:
        if self.samples < max(self.k + 1, 2):
            raise ValueError(f"samples must be at least k + 1 = {self.k + 1}, got {self.samples}")
        if self.k < 1 or self.kid_subsets < 1 or self.kid_subset_size < 2 or self.cas_steps < 0:
            raise ValueError(
                f"need k >= 1, kid_subsets >= 1, kid_subset_size >= 2 and cas_steps >= 0, got {self.k}, "
                f"{self.kid_subsets}, {self.kid_subset_size} and {self.cas_steps}"
            )


@dataclass
class RealReference:
    """Features and Gaussian statistics of the real reference digits, computed once per report."""

    features: np.ndarray  # float64 (N, D)
    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)


def make_reference(images: np.ndarray, extractor: FeatureExtractor) -> RealReference:
    """Extract the features of real uint8 images (N, 32, 32, 3) and fit their Gaussian."""
    features = extractor.features(images)
    mu, sigma = feature_statistics(features)
    return RealReference(features, mu, sigma)


def evaluate_images(
    images: np.ndarray,
    labels: np.ndarray,
    real_reference: RealReference,
    extractor: FeatureExtractor,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict:
    """Return FD, KID, precision, recall and label agreement of uint8 digits (N, 32, 32, 3) with labels 0-9.

    All digits given are used; subsample beforehand for a fixed count. The result also contains `kid_std` (over the
    KID subsets) and `samples` (N).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    features = extractor.features(images)
    mu, sigma = feature_statistics(features)
    kid, kid_std = kernel_distance(features, real_reference.features, kid_subsets, kid_subset_size, seed)
    precision, recall = precision_recall(real_reference.features, features, k)
    return {
        "samples": int(len(labels)),
        "frechet_distance": frechet_distance(mu, sigma, real_reference.mu, real_reference.sigma),
        "kid": kid,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "label_agreement": label_agreement(extractor.predict(images), labels),
    }


def classification_accuracy_score(
    images: np.ndarray,
    labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    settings: FeatureNetSettings,
    device: str = "cpu",
    description: str = "CAS",
) -> float:
    """Train a `DigitCNN` on (images, labels) alone and return its accuracy on the real test digits.

    Classification Accuracy Score, Ravuri and Vinyals, "Classification Accuracy Score for Conditional Generative
    Models", NeurIPS 2019, with the small network and fixed step budget of `settings`.
    """
    network = train_digit_cnn(images, labels, settings, device, progress=True, description=description)
    return accuracy_of(network, test_images, test_labels, device)


def subsample(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Return `size` sorted indices drawn without replacement from range(count), or all of them when fewer."""
    if count <= size:
        return np.arange(count)
    return np.sort(rng.choice(count, size, replace=False))


def row_rng(seed: int, name: str) -> np.random.Generator:
    """Return the random generator of one row, seeded by (seed, name), so rows do not depend on each other."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def noise_images(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return uniform random uint8 images (count, 32, 32, 3) and uniform random labels 0-9."""
    return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, count, dtype=np.int64)


@dataclass
class RealData:
    """The real digits a report compares with."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    cluster_of_train: np.ndarray | None  # int64 (N_train,) colour cluster of each train digit, or None
    histogram: HistogramSettings  # bins of colour_histogram_distance


def score_row(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    colour_reference: np.ndarray,
    real: RealData,
    reference: RealReference,
    extractor: FeatureExtractor,
    settings: QualitySettings,
    cas_settings: FeatureNetSettings | None,
) -> dict:
    """Score one row: metrics on a subsample of `settings.samples` digits, CAS and colour distance on all digits."""
    index = subsample(len(labels), settings.samples, row_rng(settings.seed, name))
    if len(index) < settings.samples:
        logger.warning(
            "%s has only %d digits, fewer than %d: its FD is biased upwards", name, len(index), settings.samples
        )
    row = evaluate_images(
        images[index], labels[index], reference, extractor,
        settings.k, settings.kid_subsets, settings.kid_subset_size, settings.seed,
    )  # fmt: skip
    row["digits"] = int(len(labels))
    row["colour_histogram_distance"] = colour_histogram_distance(images, colour_reference, real.histogram)
    if cas_settings is not None:
        row["cas_accuracy"] = classification_accuracy_score(
            images, labels, real.test_images, real.test_labels, cas_settings, extractor.device, f"CAS {name}"
        )
    logger.info("%s: %s", name, ", ".join(f"{key} {row[key]:.4g}" for key in METRIC_NAMES))
    return row


def evaluate_synthetic(
    synthetic: dict[int, tuple[np.ndarray, np.ndarray]],
    real: RealData,
    extractor: FeatureExtractor,
    settings: QualitySettings = QualitySettings(),
) -> dict:
    """Score the synthetic digits of each cluster, all of them together, and the real-train and noise rows.

    `synthetic` maps cluster -> (uint8 images (N, 32, 32, 3), labels int64 (N,)). Returns the metrics.json dict.
    """
    start = time.perf_counter()
    reference_index = subsample(len(real.test_labels), settings.samples, row_rng(settings.seed, "reference"))
    reference = make_reference(real.test_images[reference_index], extractor)
    cas_settings = (
        replace(extractor.settings, steps=settings.cas_steps, seed=settings.seed) if settings.cas_steps else None
    )

    def colour_reference_of(cluster: int | None) -> np.ndarray:
        if cluster is None or real.cluster_of_train is None:
            return real.train_images
        return real.train_images[real.cluster_of_train == cluster]

    rows = {}
    for cluster, (images, labels) in sorted(synthetic.items()):
        rows[f"cluster-{cluster}"] = score_row(
            f"cluster {cluster}", images, labels, colour_reference_of(cluster),
            real, reference, extractor, settings, cas_settings,
        )  # fmt: skip
    pooled_images = np.concatenate([images for images, _ in synthetic.values()])
    pooled_labels = np.concatenate([labels for _, labels in synthetic.values()])
    rows["all"] = score_row(
        "all clusters", pooled_images, pooled_labels, colour_reference_of(None),
        real, reference, extractor, settings, cas_settings,
    )  # fmt: skip

    # Sanity rows: real train digits, held-out real test digits (the floor) and uniform noise (the ceiling).
    # CAS on the real train split with the feature net's budget is the feature net itself, so it is trained only
    # when the budgets differ. CAS on noise is skipped because it is chance (0.1) by construction.
    rows["real_train"] = score_row(
        "real train", real.train_images, real.train_labels, real.train_images,
        real, reference, extractor, settings, None,
    )  # fmt: skip
    if cas_settings is not None:
        if cas_settings == extractor.settings:
            rows["real_train"]["cas_accuracy"] = extractor.test_accuracy
        else:
            rows["real_train"]["cas_accuracy"] = classification_accuracy_score(
                real.train_images, real.train_labels, real.test_images, real.test_labels,
                cas_settings, extractor.device, "CAS real train",
            )  # fmt: skip
    held_out = np.setdiff1d(np.arange(len(real.test_labels)), reference_index)
    if len(held_out) > settings.k:
        rows["real_test_held_out"] = score_row(
            "real test held out", real.test_images[held_out], real.test_labels[held_out], real.train_images,
            real, reference, extractor, settings, None,
        )  # fmt: skip
    noise, noise_labels = noise_images(settings.samples, row_rng(settings.seed, "noise images"))
    rows["noise"] = score_row(
        "noise", noise, noise_labels, real.train_images, real, reference, extractor, settings, None
    )

    return {
        "augsvhn_version": __version__,
        "settings": asdict(settings),
        "reference": {"split": "test", "samples": int(len(reference_index))},
        "colour_reference": (
            "real train digits of the same colour cluster (clusters from --workdir)"
            if real.cluster_of_train is not None
            else "whole real train split (no --workdir with clusters given)"
        ),
        "feature_extractor": extractor.describe(),
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }


def render_markdown(metrics: dict) -> str:
    """Return a Markdown table of the rows of a metrics.json dict."""
    columns = ("samples", *METRIC_NAMES, "cas_accuracy", "colour_histogram_distance")
    lines = [
        "# Sample quality",
        "",
        f"Feature net: {metrics['feature_extractor']['features']}; its accuracy on the real test split is "
        f"{metrics['feature_extractor']['test_accuracy']:.3f}. Reference: {metrics['reference']['samples']} real "
        f"test digits. Colour reference: {metrics['colour_reference']}.",
        "",
        "| row | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, row in metrics["rows"].items():
        cells = [f"{row[column]:.4g}" if column in row else "-" for column in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_metrics(out_dir: str | os.PathLike, metrics: dict) -> Path:
    """Write metrics.json and metrics.md into `out_dir` atomically; return the JSON path."""
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / "metrics.md", render_markdown(metrics).encode("utf-8"))
    return atomic_write_json(out_dir / "metrics.json", metrics)


def run_eval_samples(
    svhn_root: str | os.PathLike,
    synthetic_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: QualitySettings = QualitySettings(),
    device: str = "cpu",
    feature_cache: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    feature_settings: FeatureNetSettings = FeatureNetSettings(),
) -> dict:
    """Load real SVHN and the shards, get the feature net (cached), score every row and write the report.

    `workdir` contains the colour clusters (`augsvhn cluster`); without it, colour histograms are compared with the
    whole real train split. `feature_cache` is the folder of cached feature nets (see `feature_cache_dir`).
    """
    from augsvhn.clusters import load_clusters
    from augsvhn.data import load_svhn
    from augsvhn.eval.experiment import load_synthetic
    from augsvhn.eval.features import load_or_train_extractor
    from augsvhn.shards import read_manifest

    train, test = load_svhn(svhn_root, "train"), load_svhn(svhn_root, "test")
    cluster_of_train, histogram = None, HistogramSettings()
    if workdir is not None:
        clusters = load_clusters(workdir, train.images)
        cluster_of_train, histogram = clusters.assignment, clusters.histogram
    real = RealData(train.images, train.labels, test.images, test.labels, cluster_of_train, histogram)

    cluster_ids = sorted({entry["cluster"] for entry in read_manifest(synthetic_dir)["shards"]})
    if not cluster_ids:
        raise DataError(f"{synthetic_dir} lists no shards; generate some with `augsvhn generate`")
    if cluster_of_train is not None and cluster_ids[-1] >= clusters.k:
        raise DataError(
            f"{synthetic_dir} has shards of cluster {cluster_ids[-1]}, but the clusters in {workdir} are "
            f"0..{clusters.k - 1}; pass the --workdir the shards were generated from"
        )
    synthetic = {}
    for cluster in cluster_ids:
        images, labels, _ = load_synthetic(synthetic_dir, [cluster])
        synthetic[cluster] = (images, labels)

    extractor = load_or_train_extractor(
        train.images, train.labels, test.images, test.labels, feature_cache, feature_settings, device
    )
    metrics = evaluate_synthetic(synthetic, real, extractor, settings)
    metrics["synthetic_dir"] = str(Path(synthetic_dir).resolve())
    path = write_metrics(out_dir, metrics)
    logger.info("wrote %s", path)
    return metrics
