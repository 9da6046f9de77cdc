"""Reading, validating and downloading SVHN cropped digits (format 2, Netzer et al. 2011).

Format 2 stores each split as a MATLAB v5 file `<split>_32x32.mat` with two variables:
`X`, uint8 of shape (32, 32, 3, N), and `y`, of shape (N, 1), where digit 0 is stored as 10.
The loader does not check the official MD5 sums, so subsets and re-encodings of the official
files load as long as their layout is right.

Reference: Y. Netzer, T. Wang, A. Coates, A. Bissacco, B. Wu and A. Y. Ng, "Reading Digits in
Natural Images with Unsupervised Feature Learning", NIPS Workshop on Deep Learning 2011.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError
from torch.utils.data import Dataset

from augsvhn.errors import AugsvhnError, DataError

logger = logging.getLogger("augsvhn.data")

SVHN_SPLITS = ("train", "test", "extra")
SVHN_ROOT_ENV = "AUGSVHN_SVHN_ROOT"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
IMAGE_SHAPE = (32, 32, 3)

# Exceptions that scipy.io.loadmat raises on truncated or garbled files (scipy 1.17 raises at least
# MatReadError, OSError, ValueError and IndexError, depending on where the bytes go wrong).
_LOADMAT_ERRORS = (
    MatReadError, OSError, ValueError, IndexError, TypeError, KeyError, EOFError, struct.error, zlib.error
)

# Loaded splits keyed by (resolved path, mtime in ns, size in bytes), so that a changed file is read again.
_CACHE_SIZE = 4
_cache: OrderedDict[tuple[str, int, int], "SVHNSplit"] = OrderedDict()


@dataclass(frozen=True)
class SVHNSplit:
    """One SVHN split in memory.

    The arrays are read-only because loaded splits are cached and shared between callers: copy them
    (`images.copy()`, or `images[mask]`, which copies) before changing them in place.
    """

    images: np.ndarray  # uint8 (N, 32, 32, 3), channels last
    labels: np.ndarray  # int64 (N,), digits 0-9
    path: Path  # the .mat file read

    def __len__(self) -> int:
        return len(self.labels)


def split_path(root: str | os.PathLike, split: str) -> Path:
    """Return the path of the format-2 file of `split` in folder `root`."""
    if split not in SVHN_SPLITS:
        raise ValueError(f"unknown SVHN split {split!r}; expected one of {', '.join(SVHN_SPLITS)}")
    return Path(root) / f"{split}_32x32.mat"


def load_svhn(root: str | os.PathLike, split: str = "train") -> SVHNSplit:
    """Read and validate `<root>/<split>_32x32.mat`.

    Returns images as uint8 (N, 32, 32, 3) and labels as int64 (N,) in 0..9, with the stored label 10
    mapped to digit 0. Raises DataError naming the file when it is missing, unreadable or malformed,
    or when a label lies outside 1..10.
    """
    path = split_path(root, split)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DataError(f"SVHN file {path} not found; pass the folder that contains {path.name}") from None
    except OSError as error:
        raise DataError(f"cannot read SVHN file {path}: {error.strerror or error}") from None
    if not path.is_file():
        raise DataError(f"SVHN file {path} is not a regular file")

    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]

    split_data = _read_split(path)
    _cache[key] = split_data
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    logger.info("read %d %s digits from %s", len(split_data), split, path)
    return split_data


# MAT-file v5 numeric storage types and their sizes in bytes (MATLAB "MAT-File Format", R2024a, Table 1-1).
_MAT5_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8}
_MAT5_MATRIX, _MAT5_COMPRESSED = 14, 15
_MAT5_NUMERIC_CLASSES = range(6, 16)  # mxDOUBLE_CLASS .. mxUINT64_CLASS


def _mat5_sub_element(data: bytes, offset: int, endian: str) -> tuple[int, bytes, int]:
    """Return (type, payload, next offset) of the data element at `offset`, small or regular format."""
    if offset + 8 > len(data):
        raise ValueError("element tag past the end of the data")
    first, second = struct.unpack_from(endian + "II", data, offset)
    if first >> 16:  # small data element: type and size packed in the first word, payload in the second
        return first & 0xFFFF, data[offset + 4 : offset + 4 + (first >> 16)], offset + 8
    end = offset + 8 + second
    if end > len(data):
        raise ValueError(f"element of {second} bytes runs past the end of the data")
    return first, data[offset + 8 : end], offset + 8 + second + (-second % 8)


def _check_mat5_matrix(matrix: bytes, endian: str) -> None:
    """Check that a numeric matrix stores exactly as many bytes as its dimensions need."""
    _, flags, offset = _mat5_sub_element(matrix, 0, endian)
    _, dims_bytes, offset = _mat5_sub_element(matrix, offset, endian)
    _, name, offset = _mat5_sub_element(matrix, offset, endian)
    if len(flags) < 4 or flags[0 if endian == "<" else 3] not in _MAT5_NUMERIC_CLASSES:
        return
    dims = struct.unpack(endian + f"{len(dims_bytes) // 4}i", dims_bytes[: len(dims_bytes) // 4 * 4])
    if any(d < 0 for d in dims):
        raise ValueError(f"variable {name.decode(errors='replace')} has negative dimensions {dims}")
    storage_type, real, _ = _mat5_sub_element(matrix, offset, endian)
    if storage_type not in _MAT5_TYPE_SIZES:
        raise ValueError(f"variable {name.decode(errors='replace')} has unknown storage type {storage_type}")
    expected = int(np.prod(dims, dtype=np.int64)) * _MAT5_TYPE_SIZES[storage_type]
    if len(real) != expected:
        raise ValueError(
            f"variable {name.decode(errors='replace')} has dimensions {dims} but stores {len(real)} bytes "
            f"of data instead of {expected}"
        )


def _check_mat5_layout(path: Path) -> None:
    """Check the element sizes of a MAT-file v5 before scipy reads it.

    scipy.io.loadmat (scipy 1.17) can read past the data of a variable whose dimensions claim more elements
    than it stores, and crash the process, so such files are rejected here with a ValueError.
    MATLAB v7.3 (HDF5) files and files of another layout are left to loadmat's own errors.
    """
    data = path.read_bytes()
    if len(data) < 128 or data[126:128] not in (b"IM", b"MI"):
        return
    endian = "<" if data[126:128] == b"IM" else ">"
    offset = 128
    while offset < len(data):
        element_type, payload, padded_end = _mat5_sub_element(data, offset, endian)
        # Compressed elements are not padded to 8 bytes, unlike all others.
        offset = offset + 8 + len(payload) if element_type == _MAT5_COMPRESSED else padded_end
        if element_type == _MAT5_COMPRESSED:
            payload = zlib.decompress(payload)
            element_type, payload, _ = _mat5_sub_element(payload, 0, endian)
        if element_type == _MAT5_MATRIX:
            _check_mat5_matrix(payload, endian)


def _read_split(path: Path) -> SVHNSplit:
    """Read one format-2 file and check the layout of `X` and `y`."""
    try:
        _check_mat5_layout(path)
        # NOTE: the layout check catches dimensions that exceed the stored data, but other corrupted header
        # fields (found by fuzzing with bit flips) can still crash scipy 1.17.1's reader.
        contents = scipy.io.loadmat(path, variable_names=["X", "y"])
    except NotImplementedError:
        # scipy raises this for MATLAB v7.3 files, which are HDF5 containers.
        raise DataError(
            f"SVHN file {path} is a MATLAB v7.3 (HDF5) file; expected a MATLAB v5 file as published"
        ) from None
    except _LOADMAT_ERRORS as error:
        raise DataError(
            f"SVHN file {path} is truncated or not a MATLAB file ({type(error).__name__}: {error})"
        ) from None

    for name in ("X", "y"):
        if name not in contents:
            raise DataError(f"SVHN file {path} has no variable {name!r}; expected 'X' (images) and 'y' (labels)")
    x, y = contents["X"], contents["y"]

    if x.ndim != 4 or x.shape[:3] != IMAGE_SHAPE:
        raise DataError(f"SVHN file {path}: X has shape {x.shape}; expected (32, 32, 3, N)")
    if x.dtype != np.uint8:
        raise DataError(f"SVHN file {path}: X has dtype {x.dtype}; expected uint8")
    n = x.shape[3]
    if n == 0:
        raise DataError(f"SVHN file {path} contains no images")
    if y.size != n or y.ndim not in (1, 2) or (y.ndim == 2 and 1 not in y.shape):
        raise DataError(f"SVHN file {path}: y has shape {y.shape}; expected ({n}, 1) to match the {n} images in X")

    labels = _digit_labels(y.reshape(-1), path)
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2))  # (32, 32, 3, N) -> (N, 32, 32, 3)
    images.flags.writeable = False
    labels.flags.writeable = False
    return SVHNSplit(images=images, labels=labels, path=path)


def _digit_labels(y: np.ndarray, path: Path) -> np.ndarray:
    """Map stored labels 1..10 to digits, with 10 meaning digit 0."""
    if y.dtype.kind == "f":
        # Some MATLAB exports store labels as double; accept them when every value is a whole number.
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"SVHN file {path}: y contains values that are not whole numbers")
    elif y.dtype.kind not in "iu":
        raise DataError(f"SVHN file {path}: y has dtype {y.dtype}; expected integer labels 1..10")
    labels = y.astype(np.int64)
    bad = (labels < 1) | (labels > 10)
    if bad.any():
        values = np.unique(labels[bad])[:5].tolist()
        raise DataError(f"SVHN file {path}: {int(bad.sum())} labels outside 1..10 (for example {values})")
    labels[labels == 10] = 0
    return labels


def download_svhn(root: str | os.PathLike, splits: Iterable[str] = ("train", "test")) -> list[Path]:
    """Download the official format-2 files of `splits` into `root` with torchvision, then validate them.

    Splits whose file already exists are not downloaded again, so a folder with a subset of SVHN keeps it.
    Needs internet access to ufldl.stanford.edu; "extra" is about 1.3 GB. Returns the paths of the files.
    Raises DataError when a download fails.
    """
    root = Path(root)
    splits = list(splits)
    for split in splits:
        split_path(root, split)  # rejects unknown split names before any download starts
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AugsvhnError(f"cannot create the SVHN folder {root}: {error.strerror or error}") from None

    paths = []
    for split in splits:
        path = split_path(root, split)
        if not path.exists():
            from torchvision.datasets import SVHN

            logger.info("downloading SVHN %s split into %s", split, root)
            try:
                SVHN(str(root), split=split, download=True)
            except (OSError, RuntimeError, ValueError) as error:
                raise DataError(
                    f"download of SVHN {split} split into {root} failed ({type(error).__name__}: {error}); "
                    f"download {path.name} from {SVHN_URL} by hand and pass its folder with --svhn-root"
                ) from None
        load_svhn(root, split)
        paths.append(path)
    return paths


def resolve_svhn_root(
    option_value: str | os.PathLike | None, workdir: str | os.PathLike | None = None, must_exist: bool = True
) -> Path:
    """Return the SVHN folder: `option_value`, else $AUGSVHN_SVHN_ROOT, else `svhn_root` in the workdir config.

    Raises AugsvhnError when none is set, and DataError when `must_exist` is true and the folder chosen
    does not exist. Pass `must_exist=False` for a folder that a download will create.
    """
    from augsvhn.workdir import load_config

    if option_value:
        root, source = Path(option_value), "--svhn-root"
    elif os.environ.get(SVHN_ROOT_ENV):
        root, source = Path(os.environ[SVHN_ROOT_ENV]), f"${SVHN_ROOT_ENV}"
    elif workdir is not None and load_config(workdir).get("svhn_root"):
        root, source = Path(load_config(workdir)["svhn_root"]), f"svhn_root in {Path(workdir) / 'config.json'}"
    else:
        raise AugsvhnError(
            f"no SVHN folder given; pass --svhn-root DIR (the folder with train_32x32.mat) or set ${SVHN_ROOT_ENV}"
        )
    if must_exist and not root.is_dir():
        raise DataError(f"SVHN folder {root} (from {source}) not found or not a folder")
    return root


def fingerprint(images: np.ndarray) -> str:
    """Return the SHA-256 hex digest of uint8 images (N, 32, 32, 3), covering their shape and bytes."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {images.dtype} {images.shape}")
    digest = hashlib.sha256(repr(images.shape).encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()


class RealSVHN(Dataset):
    """Real SVHN digits as a map-style torch Dataset of (PIL image, label), like torchvision's SVHN.

    root: folder with `<split>_32x32.mat`.
    split: "train", "test" or "extra".
    indices: optional subset of image indices (for example the members of one colour cluster);
        None keeps every image.
    transform, target_transform: applied to the PIL image and to the int label.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        indices: Sequence[int] | np.ndarray | None = None,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ) -> None:
        data = load_svhn(root, split)
        self.path = data.path
        self.split = split
        if indices is None:
            self.images, self.labels = data.images, data.labels
        else:
            indices = np.asarray(indices, dtype=np.int64)
            if indices.ndim != 1 or (indices.size and (indices.min() < 0 or indices.max() >= len(data))):
                raise ValueError(f"indices must be a 1-D array of values in 0..{len(data) - 1}")
            self.images, self.labels = data.images[indices], data.labels[indices]  # copies
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.fromarray(self.images[index])
        label = int(self.labels[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label
