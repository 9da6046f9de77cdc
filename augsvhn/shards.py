"""HDF5 shards of generated digits, the manifest that lists them, and their verification.

Layout of an output folder OUT:

    OUT/manifest.json                      list of shards (path, cluster, index, count, sha256, label counts),
                                           the generation settings and the package version
    OUT/cluster-<k>/shard-<nnnnn>.h5       datasets `images` (uint8, n x 32 x 32 x 3, channels last) and
                                           `labels` (uint8, n, digits 0-9), with the generation settings as
                                           attributes (see SHARD_ATTRIBUTES)

Shards are written atomically (see augsvhn.fsutil.atomic_path) and byte for byte reproducibly: the same images,
labels and attributes give the same file, because HDF5 object timestamps are switched off (`track_times=False`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from augsvhn import __version__
from augsvhn.errors import DataError
from augsvhn.fsutil import atomic_path, atomic_write_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "augsvhn-shards"
MANIFEST_FORMAT_VERSION = 1

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
CHUNK_ROWS = 64  # images per HDF5 chunk: 64 x 3 KiB = 192 KiB, read and decompressed as one unit
GZIP_LEVEL = 4

# Attributes every shard carries. `sde` is the JSON of the SDE config, `steps` the number of sampler steps used.
SHARD_ATTRIBUTES = {
    "cluster": int,
    "shard_index": int,
    "seed": int,
    "sampler": str,
    "steps": int,
    "nfe": int,
    "sde": str,
    "guidance": float,
    "label_mode": str,
    "checkpoint_sha256": str,
    "augsvhn_version": str,
}

_SHARD_NAME = re.compile(r"^shard-(\d{5,})\.h5$")
_CLUSTER_NAME = re.compile(r"^cluster-(\d+)$")


@dataclass
class Shard:
    """The contents of one shard file."""

    images: np.ndarray  # uint8 (n, 32, 32, 3)
    labels: np.ndarray  # uint8 (n,), digits 0-9
    attributes: dict[str, Any]


def shard_relative_path(cluster: int, shard_index: int) -> str:
    """Return the path of shard `shard_index` of cluster `cluster`, relative to the output folder."""
    return f"cluster-{cluster}/shard-{shard_index:05d}.h5"


def file_sha256(path: str | Path) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def label_counts(labels: np.ndarray) -> list[int]:
    """Return how many of `labels` are each digit 0-9."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=NUM_CLASSES)[:NUM_CLASSES].tolist()


def _validate_contents(images: np.ndarray, labels: np.ndarray, attributes: Mapping[str, Any]) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"shard images must be uint8 of shape (n, 32, 32, 3), got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"shard labels must have shape ({images.shape[0]},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"shard labels must be digits 0-9, got values in [{labels.min()}, {labels.max()}]")
    missing = sorted(set(SHARD_ATTRIBUTES) - set(attributes))
    if missing:
        raise ValueError(f"shard attributes are missing {', '.join(missing)}")


def write_shard(path: str | Path, images: np.ndarray, labels: np.ndarray, attributes: Mapping[str, Any]) -> str:
    """Write one shard atomically and return the SHA-256 of the file written.

    `images` is uint8 (n, 32, 32, 3), `labels` integers 0-9 of shape (n,), stored as uint8. `attributes` must
    contain every key of SHARD_ATTRIBUTES and may contain more; values must be int, float, str or bool.
    """
    images = np.ascontiguousarray(images)
    labels = np.asarray(labels)
    _validate_contents(images, labels, attributes)
    n = images.shape[0]

    # The HDF5 file is built in memory and written with plain file writes. HDF5 reports a failed disk write (a
    # full disk, for example) as a RuntimeError without errno and may crash while closing the file, whereas a
    # plain write raises an OSError that atomic_path turns into an error naming the path. The in-memory image
    # is byte for byte the file that HDF5 would write to disk. The name only identifies the in-memory file.
    with h5py.File(str(path), "w", driver="core", backing_store=False) as file:
        file.create_dataset(
            "images",
            data=images,
            chunks=(max(1, min(CHUNK_ROWS, n)),) + IMAGE_SHAPE,
            compression="gzip",
            compression_opts=GZIP_LEVEL,
            shuffle=True,
            track_times=False,
        )
        file.create_dataset("labels", data=labels.astype(np.uint8), track_times=False)
        for key in sorted(attributes):
            file.attrs[key] = attributes[key]
        file.flush()
        image = file.id.get_file_image()

    with atomic_path(path) as temporary:
        with open(temporary, "wb") as output:
            output.write(image)
    return hashlib.sha256(image).hexdigest()


def _plain(value: Any) -> Any:
    """Convert an HDF5 attribute value (numpy scalar, bytes) to a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_shard_info(path: str | Path) -> tuple[int, dict[str, Any]]:
    """Return the number of labels and the attributes (as plain Python values) of a shard, without its images.

    Raises DataError if the file cannot be read or has no `labels` dataset.
    """
    try:
        with h5py.File(path, "r") as file:
            if "labels" not in file:
                raise DataError(f"shard {path} lacks the dataset 'labels'")
            return len(file["labels"]), {key: _plain(value) for key, value in file.attrs.items()}
    except OSError as error:
        raise DataError(f"cannot read shard {path}: {error}") from error


def read_shard(path: str | Path) -> Shard:
    """Read a whole shard. Raises DataError if the file is unreadable or lacks `images` or `labels`."""
    try:
        with h5py.File(path, "r") as file:
            if "images" not in file or "labels" not in file:
                raise DataError(f"shard {path} lacks the dataset 'images' or 'labels'")
            images = file["images"][...]
            labels = file["labels"][...]
            attributes = {key: _plain(value) for key, value in file.attrs.items()}
    except OSError as error:
        raise DataError(f"cannot read shard {path}: {error}") from error
    return Shard(images=images, labels=labels, attributes=attributes)


def list_complete_shards(out_dir: str | Path) -> list[tuple[int, int, Path]]:
    """Return (cluster, shard index, path) of every shard file under its final name in `out_dir`, sorted.

    A file under its final name is complete, because shards are written to a hidden temporary name and renamed.
    Whether its contents match the manifest is `verify_shards`'s job.
    """
    out_dir = Path(out_dir)
    found = []
    if not out_dir.is_dir():
        return found
    for cluster_dir in out_dir.iterdir():
        cluster_match = _CLUSTER_NAME.match(cluster_dir.name)
        if not cluster_match or not cluster_dir.is_dir():
            continue
        for path in cluster_dir.iterdir():
            shard_match = _SHARD_NAME.match(path.name)
            if shard_match and path.is_file():
                found.append((int(cluster_match.group(1)), int(shard_match.group(1)), path))
    return sorted(found)


# ---- manifest ----------------------------------------------------------------------------------


def manifest_entry(cluster: int, shard_index: int, sha256: str, labels: np.ndarray) -> dict:
    """Return the manifest entry of one shard; its path is relative to the output folder."""
    return {
        "path": shard_relative_path(cluster, shard_index),
        "cluster": int(cluster),
        "index": int(shard_index),
        "count": int(len(labels)),
        "sha256": sha256,
        "label_counts": label_counts(labels),
    }


def write_manifest(out_dir: str | Path, shards: list[dict], settings: Mapping[str, Any]) -> Path:
    """Write OUT/manifest.json atomically. `shards` are entries from `manifest_entry`; returns the path written."""
    shards = sorted(shards, key=lambda entry: (entry["cluster"], entry["index"]))
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "augsvhn_version": __version__,
        "settings": dict(settings),
        "total_images": sum(entry["count"] for entry in shards),
        "shards": shards,
    }
    return atomic_write_json(Path(out_dir) / MANIFEST_NAME, manifest)


def read_manifest(out_dir: str | Path) -> dict:
    """Read and check the structure of OUT/manifest.json. Raises DataError naming the problem."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{path} not found: {out_dir} is not a finished shards folder. Pass the --out folder of a finished "
            f"`augsvhn generate` run, or rerun that same generate command to finish an interrupted one"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path} is not an augsvhn shards manifest (its 'format' is not {MANIFEST_FORMAT!r})")
    if manifest.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise DataError(
            f"{path} has format version {manifest.get('format_version')!r}; "
            f"this augsvhn {__version__} reads version {MANIFEST_FORMAT_VERSION}"
        )
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise DataError(f"{path} has no list 'shards'")
    settings = manifest.get("settings", {})
    cluster_settings = settings.get("clusters", {}) if isinstance(settings, dict) else None
    if not isinstance(cluster_settings, dict) or not all(isinstance(v, dict) for v in cluster_settings.values()):
        raise DataError(f"{path}: 'settings' is not an object of generation settings with per-cluster objects")
    if not _is_count(manifest.get("total_images")):
        raise DataError(f"{path}: 'total_images' is missing or not a whole number >= 0")
    for number, entry in enumerate(shards):
        keys = ("path", "cluster", "index", "count", "sha256", "label_counts")
        if not isinstance(entry, dict) or any(key not in entry for key in keys):
            raise DataError(f"{path}: shard entry {number} lacks one of the keys {', '.join(keys)}")
        counts = entry["label_counts"]
        well_typed = (
            all(_is_count(entry[key]) for key in ("cluster", "index", "count"))
            and isinstance(entry["sha256"], str)
            and isinstance(counts, list)
            and len(counts) == NUM_CLASSES
            and all(_is_count(count) for count in counts)
        )
        if not well_typed:
            raise DataError(
                f"{path}: shard entry {number} needs whole numbers >= 0 for cluster, index and count, a string "
                f"sha256 and 10 label counts"
            )
        if entry["path"] != shard_relative_path(entry["cluster"], entry["index"]):
            raise DataError(f"{path}: shard entry {number} has the unexpected path {entry['path']!r}")
    return manifest


def _is_count(value: Any) -> bool:
    """Return whether a JSON value is a whole number >= 0 (and not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---- verification ------------------------------------------------------------------------------


def verify_shards(out_dir: str | Path) -> list[str]:
    """Check every shard of `out_dir` against the manifest and return a list of problems (empty when all is well).

    Checks: manifest readable; every listed shard present with the listed SHA-256; datasets `images` (uint8,
    n x 32 x 32 x 3) and `labels` (uint8, digits 0-9) with the listed count and label counts; every attribute of
    SHARD_ATTRIBUTES present, with cluster and index matching the entry and the generation settings matching the
    manifest; no shard file on disk that the manifest does not list.
    """
    out_dir = Path(out_dir)
    try:
        manifest = read_manifest(out_dir)
    except DataError as error:
        return [str(error)]

    problems = []
    listed = set()
    for entry in manifest["shards"]:
        listed.add(entry["path"])
        problems.extend(f"{entry['path']}: {problem}" for problem in _verify_entry(out_dir, entry, manifest))

    for _, _, path in list_complete_shards(out_dir):
        relative = path.relative_to(out_dir).as_posix()
        if relative not in listed:
            problems.append(f"{relative}: shard file is not listed in {MANIFEST_NAME}")
    return problems


def _verify_entry(out_dir: Path, entry: dict, manifest: dict) -> list[str]:
    path = out_dir / entry["path"]
    if not path.is_file():
        return ["shard file is missing"]
    sha256 = file_sha256(path)
    if sha256 != entry["sha256"]:
        # Keep checking the contents: the checksum says that bytes changed, the checks below say what changed.
        problems = [f"SHA-256 {sha256[:16]}... does not match the manifest's {str(entry['sha256'])[:16]}..."]
    else:
        problems = []

    try:
        shard = read_shard(path)
    except DataError as error:
        return problems + [str(error)]

    images, labels = shard.images, shard.labels
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        problems.append(f"images are {images.dtype} {images.shape}, expected uint8 (n, 32, 32, 3)")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        problems.append(f"labels are {labels.dtype} {labels.shape}, expected uint8 (n,)")
    if len(images) != entry["count"] or len(labels) != entry["count"]:
        problems.append(f"contains {len(images)} images and {len(labels)} labels, the manifest lists {entry['count']}")
    if labels.size and labels.max() >= NUM_CLASSES:
        problems.append(f"labels contain {int(labels.max())}, expected digits 0-9")
    elif labels.ndim == 1 and label_counts(labels) != entry["label_counts"]:
        problems.append(f"label counts {label_counts(labels)} differ from the manifest's {entry['label_counts']}")

    problems.extend(_verify_attributes(shard.attributes, entry, manifest.get("settings", {})))
    return problems


def _verify_attributes(attributes: dict, entry: dict, settings: dict) -> list[str]:
    problems = []
    for key, kind in SHARD_ATTRIBUTES.items():
        if key not in attributes:
            problems.append(f"attribute {key!r} is missing")
        elif kind is float and not isinstance(attributes[key], (int, float)) or (
            kind is not float and not isinstance(attributes[key], kind)
        ):
            problems.append(f"attribute {key!r} is {attributes[key]!r}, expected a {kind.__name__}")

    expected = {"cluster": entry["cluster"], "shard_index": entry["index"]}
    for key in ("seed", "sampler", "steps", "guidance", "label_mode"):
        if key in settings:
            expected[key] = settings[key]
    cluster_settings = settings.get("clusters", {}).get(str(entry["cluster"]), {})
    for key in ("checkpoint_sha256", "sde"):
        if key in cluster_settings:
            expected[key] = cluster_settings[key]
    for key, value in expected.items():
        if key in attributes and attributes[key] != value:
            problems.append(f"attribute {key!r} is {attributes[key]!r}, the manifest says {value!r}")
    return problems


# ---- preview -----------------------------------------------------------------------------------


def write_preview_grid(out_dir: str | Path, path: str | Path, rows_per_cluster: int = 2, columns: int = 10) -> Path:
    """Write a PNG grid of `rows_per_cluster` rows of images per cluster, each titled with its digit label.

    Column c shows an image of digit c mod 10 where the cluster has one left, else any remaining image; images
    come from the cluster's shards in manifest order. Returns the path written.
    """
    from augsvhn.plots import save_image_grid

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    clusters = sorted({entry["cluster"] for entry in manifest["shards"]})
    if not clusters:
        raise DataError(f"{out_dir / MANIFEST_NAME} lists no shards")
    slots = rows_per_cluster * columns

    images, titles, row_labels = [], [], []
    for cluster in clusters:
        cluster_images, cluster_labels = _first_images(out_dir, manifest, cluster, slots)
        chosen = _arrange_by_digit(cluster_labels, rows_per_cluster, columns)
        for index in chosen:
            if index is None:
                images.append(np.zeros(IMAGE_SHAPE, dtype=np.uint8))
                titles.append("")
            else:
                images.append(cluster_images[index])
                titles.append(str(int(cluster_labels[index])))
        row_labels += [f"cluster {cluster}"] + [""] * (rows_per_cluster - 1)

    return save_image_grid(
        np.stack(images), path, nrow=len(row_labels), row_labels=row_labels, titles=titles,
        suptitle=f"{out_dir.name}: {manifest['total_images']} images",
    )


def _first_images(out_dir: Path, manifest: dict, cluster: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Read shards of `cluster` in manifest order until at least `count` images are read (or none are left)."""
    images, labels = [], []
    for entry in manifest["shards"]:
        if entry["cluster"] != cluster:
            continue
        shard = read_shard(out_dir / entry["path"])
        images.append(shard.images)
        labels.append(shard.labels)
        if sum(len(part) for part in labels) >= count:
            break
    return np.concatenate(images), np.concatenate(labels)


def _arrange_by_digit(labels: np.ndarray, rows: int, columns: int) -> list[int | None]:
    """Return image indices for a rows x columns block (row-major): digit c mod 10 in column c where possible.

    Slots that no image can fill are None.
    """
    queues = {digit: list(np.flatnonzero(labels == digit)) for digit in range(NUM_CLASSES)}
    chosen: list[int | None] = []
    for _ in range(rows):
        for column in range(columns):
            queue = queues[column % NUM_CLASSES]
            if not queue:
                queue = max(queues.values(), key=len)
            chosen.append(int(queue.pop(0)) if queue else None)
    return chosen
