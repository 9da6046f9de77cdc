"""Reading and validating SVHN format-2 files, the SVHN folder setting and the workdir settings file."""

import json
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from augsvhn import data
from augsvhn.data import (
    SVHN_ROOT_ENV,
    RealSVHN,
    download_svhn,
    fingerprint,
    load_svhn,
    resolve_svhn_root,
)
from augsvhn.errors import AugsvhnError, DataError
from augsvhn.workdir import cluster_model_dir, config_path, load_config, update_config

# Per-digit label counts (digits 0..9) listed in the README of the real SVHN subset.
README_COUNTS = {
    "train": [318, 879, 609, 511, 469, 433, 333, 324, 332, 279],
    "test": [302, 820, 695, 451, 452, 377, 321, 325, 268, 256],
}


def write_mat(path: Path, x: np.ndarray | None = None, y: np.ndarray | None = None) -> Path:
    """Write a format-2 style .mat file with the given variables (None leaves a variable out)."""
    variables = {}
    if x is not None:
        variables["X"] = x
    if y is not None:
        variables["y"] = y
    scipy.io.savemat(path, variables)
    return path


def small_split(n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random X (32, 32, 3, n) uint8 and labels y (n, 1) uint8 in 1..10."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, size=(n, 1), dtype=np.uint8)
    return x, y


# ---- the real subset ----


@pytest.mark.parametrize("split", ["train", "test"])
def test_real_split_shapes_and_counts(svhn_root, split):
    loaded = load_svhn(svhn_root, split)
    n = sum(README_COUNTS[split])
    assert loaded.images.shape == (n, 32, 32, 3)
    assert loaded.images.dtype == np.uint8
    assert loaded.labels.shape == (n,)
    assert loaded.labels.dtype == np.int64
    assert np.bincount(loaded.labels, minlength=10).tolist() == README_COUNTS[split]
    assert loaded.path == svhn_root / f"{split}_32x32.mat"
    assert len(loaded) == n


def test_real_split_matches_raw_layout(svhn_root):
    raw = scipy.io.loadmat(svhn_root / "train_32x32.mat")
    loaded = load_svhn(svhn_root, "train")
    for index in (0, 1234, len(loaded) - 1):
        np.testing.assert_array_equal(loaded.images[index], raw["X"][:, :, :, index])
        stored = int(raw["y"][index, 0])
        assert loaded.labels[index] == (0 if stored == 10 else stored)


def test_loaded_arrays_are_read_only(svhn_root):
    loaded = load_svhn(svhn_root, "train")
    with pytest.raises(ValueError):
        loaded.images[0, 0, 0, 0] = 1
    with pytest.raises(ValueError):
        loaded.labels[0] = 1


# ---- small files with known contents ----


def test_label_ten_maps_to_zero(tmp_path):
    x, _ = small_split(4)
    write_mat(tmp_path / "train_32x32.mat", x, np.array([[10], [1], [9], [5]], dtype=np.uint8))
    loaded = load_svhn(tmp_path, "train")
    assert loaded.labels.tolist() == [0, 1, 9, 5]
    np.testing.assert_array_equal(loaded.images, x.transpose(3, 0, 1, 2))


def test_whole_number_float_labels_accepted(tmp_path):
    x, _ = small_split(3)
    write_mat(tmp_path / "test_32x32.mat", x, np.array([[10.0], [2.0], [3.0]]))
    assert load_svhn(tmp_path, "test").labels.tolist() == [0, 2, 3]


def test_changed_file_is_read_again(tmp_path):
    x, _ = small_split(3)
    path = write_mat(tmp_path / "train_32x32.mat", x, np.array([[1], [2], [3]], dtype=np.uint8))
    assert load_svhn(tmp_path).labels.tolist() == [1, 2, 3]
    write_mat(path, x, np.array([[4], [5], [6]], dtype=np.uint8))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert load_svhn(tmp_path).labels.tolist() == [4, 5, 6]


def test_unknown_split_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown SVHN split 'validation'"):
        load_svhn(tmp_path, "validation")


# ---- malformed files: each raises DataError naming the file ----


def malformed_cases(svhn_root: Path):
    x, y = small_split(4)
    raw = (svhn_root / "train_32x32.mat").read_bytes()
    return {
        "truncated": ("bytes", raw[: len(raw) // 2], "truncated or not a MATLAB file"),
        "header only": ("bytes", raw[:100], "truncated or not a MATLAB file"),
        "empty": ("bytes", b"", "truncated or not a MATLAB file"),
        "random bytes": ("bytes", np.random.default_rng(0).bytes(4096), "truncated or not a MATLAB file"),
        "no X": ("mat", (None, y), "no variable 'X'"),
        "no y": ("mat", (x, None), "no variable 'y'"),
        "X 28x28": ("mat", (np.zeros((28, 28, 3, 4), np.uint8), y), "X has shape (28, 28, 3, 4)"),
        "X channels first": ("mat", (np.zeros((4, 32, 32, 3), np.uint8), y), "expected (32, 32, 3, N)"),
        "X 3-D": ("mat", (np.zeros((32, 32, 3), np.uint8), y), "expected (32, 32, 3, N)"),
        "X float": ("mat", (x.astype(np.float64), y), "X has dtype float64"),
        "X empty": ("mat", (np.zeros((32, 32, 3, 0), np.uint8), np.zeros((0, 1), np.uint8)), "contains no images"),
        "y too short": ("mat", (x, y[:3]), "y has shape (3, 1)"),
        "label 0": ("mat", (x, np.array([[1], [0], [2], [3]], np.uint8)), "labels outside 1..10"),
        "label 11": ("mat", (x, np.array([[11], [1], [2], [3]], np.uint8)), "labels outside 1..10"),
        "negative label": ("mat", (x, np.array([[-1], [1], [2], [3]], np.int16)), "labels outside 1..10"),
        "fractional label": ("mat", (x, np.array([[1.5], [1], [2], [3]])), "not whole numbers"),
        "text labels": ("mat", (x, np.array(["abcd"])), "y has"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "truncated",
        "header only",
        "empty",
        "random bytes",
        "no X",
        "no y",
        "X 28x28",
        "X channels first",
        "X 3-D",
        "X float",
        "X empty",
        "y too short",
        "label 0",
        "label 11",
        "negative label",
        "fractional label",
        "text labels",
    ],
)
def test_malformed_file_raises_data_error(tmp_path, svhn_root, case):
    kind, content, expected = malformed_cases(svhn_root)[case]
    path = tmp_path / "train_32x32.mat"
    if kind == "bytes":
        path.write_bytes(content)
    else:
        write_mat(path, *content)
    with pytest.raises(DataError) as error:
        load_svhn(tmp_path, "train")
    message = str(error.value)
    assert str(path) in message
    assert expected in message
    assert "\n" not in message


def test_missing_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="not found") as error:
        load_svhn(tmp_path, "test")
    assert str(tmp_path / "test_32x32.mat") in str(error.value)


def test_folder_in_place_of_file_raises(tmp_path):
    (tmp_path / "train_32x32.mat").mkdir()
    with pytest.raises(DataError, match="not a regular file"):
        load_svhn(tmp_path, "train")


# ---- fingerprint ----


def test_fingerprint_tracks_every_pixel(svhn_root):
    images = load_svhn(svhn_root, "train").images
    reference = fingerprint(images)
    assert reference == fingerprint(images.copy())
    assert len(reference) == 64

    changed = images.copy()
    changed[-1, 31, 31, 2] ^= 1
    assert fingerprint(changed) != reference
    assert fingerprint(images[:-1]) != reference


def test_fingerprint_includes_shape():
    flat = np.zeros((2, 32, 32, 3), np.uint8)
    assert fingerprint(flat) != fingerprint(flat.reshape(1, 64, 32, 3))


def test_fingerprint_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        fingerprint(np.zeros((2, 32, 32, 3), np.float32))


# ---- RealSVHN ----


def test_real_dataset_items_match_arrays(svhn_root):
    loaded = load_svhn(svhn_root, "test")
    dataset = RealSVHN(svhn_root, "test")
    assert isinstance(dataset, torch.utils.data.Dataset)
    assert len(dataset) == len(loaded)
    for index in (0, 17, len(dataset) - 1):
        image, label = dataset[index]
        assert isinstance(image, Image.Image)
        assert image.mode == "RGB"
        assert image.size == (32, 32)
        np.testing.assert_array_equal(np.asarray(image), loaded.images[index])
        assert label == loaded.labels[index]
        assert isinstance(label, int)


def test_real_dataset_transforms_and_indices(svhn_root):
    loaded = load_svhn(svhn_root, "train")
    indices = [5, 2, 4000]
    dataset = RealSVHN(
        svhn_root,
        "train",
        indices=indices,
        transform=lambda image: np.asarray(image).mean(),
        target_transform=lambda label: label + 100,
    )
    assert len(dataset) == 3
    for position, index in enumerate(indices):
        value, label = dataset[position]
        assert value == pytest.approx(loaded.images[index].mean())
        assert label == loaded.labels[index] + 100


def test_real_dataset_rejects_bad_indices(svhn_root):
    with pytest.raises(ValueError, match="indices"):
        RealSVHN(svhn_root, "test", indices=[0, 10**6])


def test_real_dataset_through_data_loader(svhn_root):
    def to_tensor(image):
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (32, 32, 3) -> (3, 32, 32)

    loader = torch.utils.data.DataLoader(RealSVHN(svhn_root, "test", transform=to_tensor), batch_size=64)
    images, labels = next(iter(loader))
    assert images.shape == (64, 3, 32, 32)
    assert images.dtype == torch.uint8
    assert labels.tolist() == load_svhn(svhn_root, "test").labels[:64].tolist()


# ---- download (network replaced by fakes) ----


def test_download_skips_existing_files(svhn_root, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("torchvision was asked to download a file that exists")

    monkeypatch.setattr("torchvision.datasets.SVHN", fail)
    assert download_svhn(svhn_root, ["train", "test"]) == [svhn_root / "train_32x32.mat", svhn_root / "test_32x32.mat"]


def test_download_failure_raises_data_error(tmp_path, monkeypatch):
    calls = []

    def offline(root, split, download):
        calls.append((root, split, download))
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("torchvision.datasets.SVHN", offline)
    with pytest.raises(DataError) as error:
        download_svhn(tmp_path / "svhn", ["test"])
    assert calls == [(str(tmp_path / "svhn"), "test", True)]
    assert "download of SVHN test split" in str(error.value)
    assert data.SVHN_URL in str(error.value)


def test_download_validates_downloaded_file(tmp_path, monkeypatch):
    def fake_download(root, split, download):
        write_mat(Path(root) / f"{split}_32x32.mat", *small_split(6))

    monkeypatch.setattr("torchvision.datasets.SVHN", fake_download)
    assert download_svhn(tmp_path, ["extra"]) == [tmp_path / "extra_32x32.mat"]
    assert len(load_svhn(tmp_path, "extra")) == 6


def test_download_rejects_unknown_split_first(tmp_path, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.SVHN", lambda *a, **k: pytest.fail("download started"))
    with pytest.raises(ValueError, match="unknown SVHN split 'valid'"):
        download_svhn(tmp_path, ["train", "valid"])


# ---- SVHN folder setting ----


def test_svhn_root_precedence(tmp_path, monkeypatch):
    option_dir, env_dir, config_dir = (tmp_path / name for name in ("option", "env", "config"))
    for folder in (option_dir, env_dir, config_dir):
        folder.mkdir()
    workdir = tmp_path / "work"
    update_config(workdir, svhn_root=config_dir)

    monkeypatch.setenv(SVHN_ROOT_ENV, str(env_dir))
    assert resolve_svhn_root(option_dir, workdir) == option_dir
    assert resolve_svhn_root(None, workdir) == env_dir
    monkeypatch.delenv(SVHN_ROOT_ENV)
    assert resolve_svhn_root(None, workdir) == config_dir


def test_svhn_root_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.delenv(SVHN_ROOT_ENV, raising=False)
    with pytest.raises(AugsvhnError, match="pass --svhn-root"):
        resolve_svhn_root(None, tmp_path)
    with pytest.raises(AugsvhnError, match="pass --svhn-root"):
        resolve_svhn_root(None, None)


def test_svhn_root_folder_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv(SVHN_ROOT_ENV, str(tmp_path / "absent"))
    with pytest.raises(DataError, match=r"absent \(from \$AUGSVHN_SVHN_ROOT\) not found"):
        resolve_svhn_root(None)
    assert resolve_svhn_root(None, must_exist=False) == tmp_path / "absent"


# ---- workdir settings ----


def test_config_update_keeps_other_keys(tmp_path):
    workdir = tmp_path / "new" / "work"
    assert load_config(workdir) == {}
    update_config(workdir, svhn_root=Path("/data/svhn"), clusters={"k": 3})
    update_config(workdir, note="second")
    assert load_config(workdir) == {"svhn_root": "/data/svhn", "clusters": {"k": 3}, "note": "second"}
    assert json.loads(config_path(workdir).read_text()) == load_config(workdir)
    assert [path.name for path in workdir.iterdir()] == ["config.json"]  # no temporary file left


@pytest.mark.parametrize("text, expected", [("{not json", "not valid JSON"), ("[1, 2]", "expected an object")])
def test_config_malformed_raises(tmp_path, text, expected):
    config_path(tmp_path).write_text(text)
    with pytest.raises(DataError, match=expected) as error:
        load_config(tmp_path)
    assert str(config_path(tmp_path)) in str(error.value)


def test_cluster_model_dir(tmp_path):
    assert cluster_model_dir(tmp_path, 2) == tmp_path / "models" / "cluster-2"
