"""Colour clusters of the SVHN training images: colour-intensity histograms grouped by k-means.

Features. Each image becomes the concatenation of three per-channel histograms (R, then G, then B) of
`bins_per_channel` bins over the intensities 0..255; bin b of a channel counts the pixels whose value v satisfies
floor(v * bins_per_channel / 256) = b, so with the default 16 bins each bin is 16 intensity levels wide. Each
channel's histogram is divided by the pixel count (32 * 32), so it sums to 1 and the whole feature vector sums to 3.

Clustering. k-means (Lloyd's algorithm, k-means++ initialisation, `n_init` restarts, scikit-learn's KMeans)
with Euclidean distance on these features. Each run iterates until no image changes cluster (tol=0, at most
300 iterations), so each centroid is the mean of its members' features. Clusters are then renumbered by the mean
brightness of their images, (R + G + B) / 3 averaged over all pixels of all members, in descending order, so
cluster 0 is the brightest. Ties keep scikit-learn's order.

Files in the workdir:
    clusters.npz    assignment (int64 (N,)), centroids (float64 (K, 3 * bins)), mean_colours (float64 (K, 3))
    clusters.json   K, seed, histogram settings, data fingerprint, SVHN folder, sizes, K scan, SHA-256 of the npz
    clusters.png    real training images of each cluster, one row per cluster
    clusters-k-scan.png   inertia and silhouette score against K
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from augsvhn.errors import DataError
from augsvhn.fsutil import atomic_path, atomic_write_json

logger = logging.getLogger("augsvhn.clusters")

CLUSTERS_NPZ = "clusters.npz"
CLUSTERS_JSON = "clusters.json"
CLUSTERS_PNG = "clusters.png"
K_SCAN_PNG = "clusters-k-scan.png"
FORMAT_VERSION = 1

DEFAULT_K = 3
DEFAULT_SCAN_KS = (2, 3, 4, 5, 6)
SILHOUETTE_SAMPLE = 2000  # images in the fixed random subsample used for silhouette scores
_CHUNK = 4096  # images per chunk when computing histograms, to bound memory on the 531k-image extra split


@dataclass(frozen=True)
class HistogramSettings:
    """Settings of the colour-intensity histogram features (see the module docstring)."""

    bins_per_channel: int = 16  # bins per colour channel over 0..255, in 1..256

    def __post_init__(self) -> None:
        if not 1 <= self.bins_per_channel <= 256:
            raise ValueError(f"bins_per_channel must be in 1..256, got {self.bins_per_channel}")

    @property
    def num_features(self) -> int:
        return 3 * self.bins_per_channel


@dataclass
class ClusterAssignment:
    """The colour cluster of every training image, with what is needed to check it against the data."""

    k: int
    assignment: np.ndarray  # int64 (N,), cluster of each training image, in 0..k-1
    centroids: np.ndarray  # float64 (k, 3 * bins), k-means centroids in histogram space
    mean_colours: np.ndarray  # float64 (k, 3), mean R, G, B in 0..255 of each cluster's images
    histogram: HistogramSettings
    data_fingerprint: str  # augsvhn.data.fingerprint of the training images clustered
    svhn_root: str  # folder of the training file clustered
    seed: int
    n_init: int
    inertia: float  # sum of squared distances of the images to their centroid
    k_scan: list[dict] = field(default_factory=list)  # rows {"k", "inertia", "silhouette"}

    @property
    def labels_of_images(self) -> np.ndarray:
        """The same array as `assignment` (scikit-learn calls it `labels_`)."""
        return self.assignment

    @property
    def sizes(self) -> np.ndarray:
        """Number of images in each cluster, int64 (k,)."""
        return np.bincount(self.assignment, minlength=self.k)

    def check_data(self, images: np.ndarray) -> None:
        """Raise DataError unless `images` are the training images these clusters were made from."""
        from augsvhn.data import fingerprint

        if len(images) != len(self.assignment) or fingerprint(images) != self.data_fingerprint:
            raise DataError(
                f"clusters file made from other data: it assigns {len(self.assignment)} images from "
                f"{self.svhn_root}, but the training data given has {len(images)} images with another fingerprint; "
                f"run `augsvhn cluster` again for this data"
            )


def cluster_indices(clusters: ClusterAssignment, k: int) -> np.ndarray:
    """Return the indices (int64, ascending) of the training images in cluster `k`."""
    if not 0 <= k < clusters.k:
        raise ValueError(f"cluster {k} does not exist; expected 0..{clusters.k - 1}")
    return np.flatnonzero(clusters.assignment == k).astype(np.int64)


# ---- features ----


def colour_histograms(images: np.ndarray, settings: HistogramSettings = HistogramSettings()) -> np.ndarray:
    """Return the normalised per-channel colour histograms of uint8 images (N, H, W, 3) as float64 (N, 3 * bins)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    bins = settings.bins_per_channel
    n, height, width, _ = images.shape
    features = np.empty((n, 3 * bins), dtype=np.float64)

    channel_offset = np.arange(3) * bins  # (3,), broadcast over the last axis of each pixel
    for start in range(0, n, _CHUNK):
        chunk = images[start : start + _CHUNK]
        m = len(chunk)
        bin_index = (chunk.astype(np.int64) * bins) >> 8  # floor(v * bins / 256), (m, H, W, 3)
        bin_index += channel_offset
        bin_index += (np.arange(m) * 3 * bins)[:, None, None, None]  # one block of 3 * bins counts per image
        counts = np.bincount(bin_index.ravel(), minlength=m * 3 * bins)
        features[start : start + m] = counts.reshape(m, 3 * bins) / (height * width)
    return features


def mean_colours_of(images: np.ndarray) -> np.ndarray:
    """Return the mean R, G, B of each uint8 image (N, H, W, 3) as float64 (N, 3)."""
    out = np.empty((len(images), 3), dtype=np.float64)
    for start in range(0, len(images), _CHUNK):
        out[start : start + _CHUNK] = images[start : start + _CHUNK].mean(axis=(1, 2), dtype=np.float64)
    return out


# ---- k-means ----


def fit_clusters(
    images: np.ndarray,
    k: int = DEFAULT_K,
    seed: int = 0,
    n_init: int = 10,
    settings: HistogramSettings = HistogramSettings(),
    svhn_root: str | os.PathLike = "",
) -> ClusterAssignment:
    """Cluster uint8 images (N, 32, 32, 3) into `k` colour clusters, numbered brightest first.

    k-means runs `n_init` times from k-means++ starts drawn with `seed` and keeps the lowest inertia, so the
    same images, k, seed and n_init give the same assignment. Raises DataError when there are fewer images than k.
    """
    from sklearn.cluster import KMeans

    from augsvhn.data import fingerprint

    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    if len(images) < k:
        raise DataError(f"cannot make {k} clusters from {len(images)} training images; use a smaller K")

    features = colour_histograms(images, settings)
    with _one_thread():
        kmeans = KMeans(n_clusters=k, n_init=n_init, tol=0.0, random_state=seed).fit(features)

    sizes = np.bincount(kmeans.labels_, minlength=k)
    if (sizes == 0).any():
        distinct = len(np.unique(features, axis=0))
        raise DataError(
            f"cannot make {k} clusters: the training images have only {distinct} distinct colour histograms"
        )

    # Renumber clusters by mean brightness of their members, brightest first.
    image_colours = mean_colours_of(images)
    raw_colours = np.stack([image_colours[kmeans.labels_ == c].mean(axis=0) for c in range(k)])  # (k, 3)
    order = np.argsort(-raw_colours.mean(axis=1), kind="stable")  # order[new] = old
    new_index = np.empty(k, dtype=np.int64)
    new_index[order] = np.arange(k)

    return ClusterAssignment(
        k=k,
        assignment=new_index[kmeans.labels_].astype(np.int64),
        centroids=kmeans.cluster_centers_[order].astype(np.float64),
        mean_colours=raw_colours[order],
        histogram=settings,
        data_fingerprint=fingerprint(images),
        svhn_root=str(svhn_root),
        seed=seed,
        n_init=n_init,
        inertia=float(kmeans.inertia_),
    )


def scan_k(
    features: np.ndarray,
    ks: Sequence[int] = DEFAULT_SCAN_KS,
    seed: int = 0,
    n_init: int = 10,
    silhouette_sample: int = SILHOUETTE_SAMPLE,
) -> list[dict]:
    """Fit k-means for each K in `ks` and return rows {"k", "inertia", "silhouette"}.

    The silhouette score (scikit-learn's silhouette_score) is computed on one random subsample of
    `silhouette_sample` images, drawn once with `seed`, so every K is scored on the same images.
    K values outside 2..N-1 are skipped.
    """
    n = len(features)
    rng = np.random.default_rng(seed)
    subsample = np.sort(rng.choice(n, size=min(silhouette_sample, n), replace=False))

    with _one_thread():
        rows = [_scan_one(features, k, seed, n_init, subsample) for k in ks if 2 <= k < n]
    return rows


def _scan_one(features: np.ndarray, k: int, seed: int, n_init: int, subsample: np.ndarray) -> dict:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    kmeans = KMeans(n_clusters=k, n_init=n_init, tol=0.0, random_state=seed).fit(features)
    labels = kmeans.labels_[subsample]
    silhouette = float("nan")
    if 2 <= len(np.unique(labels)) < len(subsample):
        silhouette = float(silhouette_score(features[subsample], labels))
    return {"k": int(k), "inertia": float(kmeans.inertia_), "silhouette": silhouette}


def _one_thread():
    """Limit BLAS and OpenMP to one thread.

    k-means on 48 histogram features is cheap per iteration, and OpenMP's waiting threads made it slower:
    on a loaded 2-core machine, KMeans(n_init=10) on 4,487 images took 5-10 s with 2 threads and 0.2 s with 1.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


# ---- files ----


def save_clusters(workdir: str | os.PathLike, clusters: ClusterAssignment) -> tuple[Path, Path]:
    """Write WORKDIR/clusters.npz and WORKDIR/clusters.json atomically; return both paths.

    The JSON file stores the SHA-256 of the npz file, so a pair written by different runs is detected on load.
    """
    workdir = Path(workdir)
    npz_path, json_path = workdir / CLUSTERS_NPZ, workdir / CLUSTERS_JSON
    with atomic_path(npz_path) as temporary:
        with open(temporary, "wb") as file:
            np.savez(
                file, assignment=clusters.assignment, centroids=clusters.centroids, mean_colours=clusters.mean_colours
            )
    metadata = {
        "format_version": FORMAT_VERSION,
        "k": clusters.k,
        "seed": clusters.seed,
        "n_init": clusters.n_init,
        "histogram": asdict(clusters.histogram),
        "data_fingerprint": clusters.data_fingerprint,
        "svhn_root": clusters.svhn_root,
        "n_images": int(len(clusters.assignment)),
        "sizes": clusters.sizes.tolist(),
        "mean_colours": np.round(clusters.mean_colours, 3).tolist(),
        "inertia": clusters.inertia,
        "k_scan": [_json_row(row) for row in clusters.k_scan],
        "npz_sha256": _sha256_file(npz_path),
    }
    atomic_write_json(json_path, metadata)
    return npz_path, json_path


def load_clusters(workdir: str | os.PathLike, images: np.ndarray | None = None) -> ClusterAssignment:
    """Read and validate the clusters saved in `workdir`.

    When `images` (the current training images) are given, also check that the clusters were made from them.
    Raises DataError when a file is missing, corrupt or inconsistent, or made from other data.
    """
    workdir = Path(workdir)
    npz_path, json_path = workdir / CLUSTERS_NPZ, workdir / CLUSTERS_JSON
    for path in (json_path, npz_path):
        if not path.is_file():
            raise DataError(f"clusters file {path} not found; run `augsvhn cluster --workdir {workdir}` first")

    metadata = _read_metadata(json_path)
    if _sha256_file(npz_path) != metadata["npz_sha256"]:
        raise DataError(f"clusters file {npz_path} does not match {json_path}; run `augsvhn cluster` again")
    arrays = _read_arrays(npz_path)

    k, n = metadata["k"], metadata["n_images"]
    assignment, centroids, mean_colours = arrays["assignment"], arrays["centroids"], arrays["mean_colours"]
    histogram = HistogramSettings(**metadata["histogram"])
    if assignment.shape != (n,) or assignment.dtype.kind not in "iu":
        raise DataError(
            f"clusters file {npz_path}: assignment has {assignment.dtype} {assignment.shape}; expected ({n},)"
        )
    if n and (assignment.min() < 0 or assignment.max() >= k):
        raise DataError(f"clusters file {npz_path}: assignment contains clusters outside 0..{k - 1}")
    if centroids.shape != (k, histogram.num_features) or mean_colours.shape != (k, 3):
        raise DataError(f"clusters file {npz_path}: centroids or mean colours do not match K={k}")

    clusters = ClusterAssignment(
        k=k,
        assignment=assignment.astype(np.int64),
        centroids=centroids.astype(np.float64),
        mean_colours=mean_colours.astype(np.float64),
        histogram=histogram,
        data_fingerprint=metadata["data_fingerprint"],
        svhn_root=metadata["svhn_root"],
        seed=metadata["seed"],
        n_init=metadata["n_init"],
        inertia=metadata["inertia"],
        k_scan=metadata.get("k_scan", []),
    )
    if images is not None:
        try:
            clusters.check_data(images)
        except DataError as error:
            raise DataError(f"{json_path}: {error}") from None
    return clusters


_REQUIRED_KEYS = {
    "format_version": int,
    "k": int,
    "seed": int,
    "n_init": int,
    "histogram": dict,
    "data_fingerprint": str,
    "svhn_root": str,
    "n_images": int,
    "inertia": (int, float),
    "npz_sha256": str,
}


def _read_metadata(path: Path) -> dict:
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"clusters file {path} is unreadable ({error}); run `augsvhn cluster` again") from None
    if not isinstance(metadata, dict):
        raise DataError(f"clusters file {path} is not a JSON object; run `augsvhn cluster` again")
    for key, kind in _REQUIRED_KEYS.items():
        if not isinstance(metadata.get(key), kind):
            raise DataError(f"clusters file {path}: missing or invalid {key!r}; run `augsvhn cluster` again")
    if metadata["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"clusters file {path} has format version {metadata['format_version']}; this augsvhn reads "
            f"version {FORMAT_VERSION}. Run `augsvhn cluster` again"
        )
    if metadata["k"] < 2 or set(metadata["histogram"]) != {"bins_per_channel"}:
        raise DataError(f"clusters file {path}: invalid K or histogram settings; run `augsvhn cluster` again")
    try:
        HistogramSettings(**metadata["histogram"])
    except (TypeError, ValueError) as error:
        raise DataError(f"clusters file {path}: invalid histogram settings ({error})") from None
    return metadata


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in ("assignment", "centroids", "mean_colours")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"clusters file {path} is unreadable ({error}); run `augsvhn cluster` again") from None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_row(row: dict) -> dict:
    """Return a K-scan row with NaN silhouette scores stored as null, since JSON has no NaN."""
    return {key: (None if isinstance(value, float) and np.isnan(value) else value) for key, value in row.items()}


# ---- plots ----


def save_cluster_grid(
    images: np.ndarray,
    clusters: ClusterAssignment,
    path: str | os.PathLike,
    per_cluster: int = 16,
    seed: int = 0,
) -> Path:
    """Write a PNG with one row of `per_cluster` random training images per cluster, cluster 0 on top.

    Clusters with fewer images than `per_cluster` are padded with white squares.
    """
    from augsvhn.plots import save_image_grid

    rng = np.random.default_rng(seed)
    rows, row_labels = [], []
    for c in range(clusters.k):
        members = cluster_indices(clusters, c)
        chosen = np.sort(rng.choice(members, size=min(per_cluster, len(members)), replace=False))
        row = np.full((per_cluster, *images.shape[1:]), 255, dtype=np.uint8)
        row[: len(chosen)] = images[chosen]
        rows.append(row)
        row_labels.append(f"{c} ({len(members)})")
    grid = np.concatenate(rows)  # (k * per_cluster, 32, 32, 3), row by row
    return save_image_grid(
        grid, path, nrow=clusters.k, row_labels=row_labels, suptitle="colour clusters (cluster, images)"
    )


def save_k_scan_plot(k_scan: list[dict], path: str | os.PathLike) -> Path:
    """Write a PNG of the silhouette score and the inertia relative to the smallest K against K."""
    from augsvhn.plots import save_line_plot

    ks = [row["k"] for row in k_scan]
    inertia = [row["inertia"] / k_scan[0]["inertia"] for row in k_scan]
    silhouette = [row["silhouette"] if row["silhouette"] is not None else float("nan") for row in k_scan]
    return save_line_plot(
        {"silhouette score": (ks, silhouette), f"inertia / inertia at K={ks[0]}": (ks, inertia)},
        path,
        xlabel="K (number of clusters)",
        ylabel="value",
        title="k-means on colour histograms",
    )


# ---- the `augsvhn cluster` command ----


def _check_cluster_models_still_match(workdir: Path, clusters: ClusterAssignment) -> None:
    """Raise DataError when new clusters would replace the ones that the workdir's cluster models learnt from.

    Rerunning `cluster` with the same settings gives the same assignment and passes, so scripts may repeat it.
    """
    trained = sorted(path.parent.name for path in (workdir / "models").glob("cluster-*/checkpoint.pt"))
    if not trained:
        return
    try:
        previous = load_clusters(workdir)
    except DataError:
        previous = None
    if previous is not None and previous.k == clusters.k and np.array_equal(previous.assignment, clusters.assignment):
        return
    models_dir = workdir / "models"
    raise DataError(
        f"{workdir} has cluster models trained on its current clusters ({', '.join(trained)} in {models_dir}), "
        f"and these settings give other clusters, so those models would no longer match; use a new --workdir, "
        f"or delete {models_dir}/cluster-* first"
    )


def run_clustering(
    svhn_root: str | os.PathLike,
    workdir: str | os.PathLike,
    k: int = DEFAULT_K,
    seed: int = 0,
    n_init: int = 10,
    settings: HistogramSettings = HistogramSettings(),
    scan_ks: Sequence[int] = DEFAULT_SCAN_KS,
) -> tuple[ClusterAssignment, dict[str, Path]]:
    """Cluster the training split in `svhn_root`, write the cluster files and plots to `workdir`.

    Also stores `svhn_root` and the cluster settings in WORKDIR/config.json. An empty `scan_ks` skips the K scan.
    Returns the clusters and the paths written, keyed "npz", "json", "grid", "config" and, after a K scan,
    "k_scan".
    """
    from augsvhn.data import load_svhn
    from augsvhn.workdir import config_path, update_config

    workdir = Path(workdir)
    svhn_root = Path(svhn_root).resolve()
    train = load_svhn(svhn_root, "train")

    clusters = fit_clusters(train.images, k=k, seed=seed, n_init=n_init, settings=settings, svhn_root=svhn_root)
    logger.info("k-means with K=%d on %d images: inertia %.3f", k, len(train), clusters.inertia)
    if scan_ks:
        features = colour_histograms(train.images, settings)
        clusters.k_scan = scan_k(features, scan_ks, seed=seed, n_init=n_init)

    _check_cluster_models_still_match(workdir, clusters)
    npz_path, json_path = save_clusters(workdir, clusters)
    paths = {"npz": npz_path, "json": json_path}
    paths["grid"] = save_cluster_grid(train.images, clusters, workdir / CLUSTERS_PNG, seed=seed)
    if clusters.k_scan:
        paths["k_scan"] = save_k_scan_plot(clusters.k_scan, workdir / K_SCAN_PNG)
    else:
        (workdir / K_SCAN_PNG).unlink(missing_ok=True)  # a plot left by an earlier run would not match
    update_config(
        workdir,
        svhn_root=str(svhn_root),
        clusters={"k": k, "seed": seed, "n_init": n_init, "bins_per_channel": settings.bins_per_channel},
    )
    paths["config"] = config_path(workdir)
    return clusters, paths
