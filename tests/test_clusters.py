"""Colour histograms, k-means colour clusters, the cluster files and the `augsvhn cluster` command."""

import json
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from augsvhn import clusters as clusters_module
from augsvhn.cli import cli
from augsvhn.clusters import (
    CLUSTERS_JSON,
    CLUSTERS_NPZ,
    HistogramSettings,
    cluster_indices,
    colour_histograms,
    fit_clusters,
    load_clusters,
    save_cluster_grid,
    save_clusters,
    scan_k,
)
from augsvhn.data import SVHN_ROOT_ENV, fingerprint, load_svhn
from augsvhn.errors import DataError
from augsvhn.workdir import load_config

# Solid colours for the analytic k-means case, listed brightest first: (R + G + B) / 3 = 240, 120, 40.
WHITE, GREY, DARK_BLUE = (240, 240, 240), (120, 120, 120), (10, 20, 90)


def solid_colour_images(colours, per_colour: int, noise: int = 3, seed: int = 0) -> np.ndarray:
    """Images filled with one colour each (plus uniform noise of +-noise), `per_colour` per colour, interleaved."""
    rng = np.random.default_rng(seed)
    base = np.array(colours, dtype=np.int64)[np.arange(per_colour * len(colours)) % len(colours)]  # (N, 3)
    images = base[:, None, None, :] + rng.integers(-noise, noise + 1, size=(len(base), 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def train(svhn_root):
    return load_svhn(svhn_root, "train")


@pytest.fixture(scope="module")
def real_clusters(train, svhn_root):
    return fit_clusters(train.images, k=3, seed=0, svhn_root=svhn_root)


# ---- histograms ----


def test_histograms_sum_to_one_per_channel(train):
    features = colour_histograms(train.images[:500])
    assert features.shape == (500, 48)
    per_channel = features.reshape(500, 3, 16).sum(axis=2)  # (N, channel)
    np.testing.assert_allclose(per_channel, 1.0, rtol=0, atol=1e-12)
    assert (features >= 0).all()


def test_histogram_bin_edges():
    # Default 16 bins of 16 levels: 15 -> bin 0, 16 -> bin 1, 200 -> bin 12, 255 -> bin 15.
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[..., 0] = 15
    image[0, :16, :, 0] = 16  # half of the red channel
    image[..., 1] = 200
    image[..., 2] = 255
    features = colour_histograms(image).reshape(3, 16)  # (channel, bin)
    expected = np.zeros((3, 16))
    expected[0, 0] = expected[0, 1] = 0.5
    expected[1, 12] = 1.0
    expected[2, 15] = 1.0
    np.testing.assert_array_equal(features, expected)


@pytest.mark.parametrize("bins", [1, 7, 16, 256])
def test_histograms_match_numpy(train, bins, monkeypatch):
    monkeypatch.setattr(clusters_module, "_CHUNK", 3)  # several chunks, one of them partial
    images = train.images[:10]
    features = colour_histograms(images, HistogramSettings(bins_per_channel=bins))
    # Bin b starts at the smallest integer v with v * bins / 256 >= b, that is ceil(256 b / bins).
    edges = np.ceil(np.arange(bins + 1) * 256 / bins) - 0.5
    for index, image in enumerate(images):
        for channel in range(3):
            counts, _ = np.histogram(image[..., channel], bins=edges)
            block = features[index, channel * bins : (channel + 1) * bins]
            np.testing.assert_allclose(block, counts / 1024, rtol=0, atol=1e-12)


def test_histogram_settings_range():
    with pytest.raises(ValueError, match="bins_per_channel"):
        HistogramSettings(bins_per_channel=0)
    with pytest.raises(ValueError, match="bins_per_channel"):
        HistogramSettings(bins_per_channel=257)


# ---- k-means ----


def test_three_solid_colours_recovered():
    images = solid_colour_images([DARK_BLUE, WHITE, GREY], per_colour=20)
    true_colour = np.arange(60) % 3  # 0 = dark blue, 1 = white, 2 = grey, as passed above
    clusters = fit_clusters(images, k=3, seed=0)

    # Brightest first: white -> 0, grey -> 1, dark blue -> 2.
    expected = np.array([2, 0, 1])[true_colour]
    np.testing.assert_array_equal(clusters.assignment, expected)
    assert clusters.sizes.tolist() == [20, 20, 20]
    np.testing.assert_allclose(clusters.mean_colours, [WHITE, GREY, DARK_BLUE], atol=0.5)
    assert clusters.assignment.dtype == np.int64
    assert clusters.labels_of_images is clusters.assignment


def test_real_clusters_ordered_brightest_first(train, real_clusters):
    assert real_clusters.k == 3
    assert real_clusters.assignment.shape == (len(train),)
    assert real_clusters.sizes.sum() == len(train)
    assert (real_clusters.sizes > 0).all()

    recomputed = np.stack(
        [train.images[real_clusters.assignment == c].reshape(-1, 3).mean(axis=0) for c in range(3)]
    )  # (k, 3) mean R, G, B over all pixels of each cluster
    np.testing.assert_allclose(real_clusters.mean_colours, recomputed, rtol=1e-9)
    brightness = recomputed.mean(axis=1)
    assert brightness[0] > brightness[1] > brightness[2]
    assert real_clusters.data_fingerprint == fingerprint(train.images)


def test_same_seed_same_assignment(train, real_clusters):
    again = fit_clusters(train.images, k=3, seed=0)
    np.testing.assert_array_equal(again.assignment, real_clusters.assignment)
    np.testing.assert_allclose(again.centroids, real_clusters.centroids, rtol=1e-12)


def test_centroids_are_member_means(train, real_clusters):
    # A converged k-means centroid is the mean of its members' features.
    features = colour_histograms(train.images)
    for c in range(3):
        members = features[real_clusters.assignment == c]
        np.testing.assert_allclose(real_clusters.centroids[c], members.mean(axis=0), atol=1e-6)


def test_too_few_images_for_k():
    with pytest.raises(DataError, match="cannot make 3 clusters from 2 training images"):
        fit_clusters(solid_colour_images([WHITE, GREY], per_colour=1), k=3)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_identical_images_rejected():
    images = solid_colour_images([WHITE, GREY], per_colour=3, noise=0)
    with pytest.raises(DataError, match="only 2 distinct colour histograms"):
        fit_clusters(images, k=3)


def test_cluster_indices_partition(real_clusters):
    parts = [cluster_indices(real_clusters, c) for c in range(3)]
    assert [len(part) for part in parts] == real_clusters.sizes.tolist()
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(real_clusters.assignment)))
    with pytest.raises(ValueError, match="cluster 3 does not exist"):
        cluster_indices(real_clusters, 3)


def test_k_scan_peaks_at_true_k():
    images = solid_colour_images([DARK_BLUE, WHITE, GREY], per_colour=15)
    rows = scan_k(colour_histograms(images), ks=(2, 3, 4), seed=0, silhouette_sample=30)
    assert [row["k"] for row in rows] == [2, 3, 4]
    silhouettes = [row["silhouette"] for row in rows]
    assert int(np.argmax(silhouettes)) == 1
    assert silhouettes[1] > 0.9
    assert rows[0]["inertia"] > rows[1]["inertia"] >= rows[2]["inertia"]


def test_k_scan_skips_k_not_below_n():
    rows = scan_k(colour_histograms(solid_colour_images([WHITE, GREY], per_colour=2)), ks=(2, 3, 4, 5))
    assert [row["k"] for row in rows] == [2, 3]


# ---- files ----


def test_save_load_round_trip(tmp_path, train, real_clusters):
    save_clusters(tmp_path, real_clusters)
    loaded = load_clusters(tmp_path, images=train.images)
    np.testing.assert_array_equal(loaded.assignment, real_clusters.assignment)
    np.testing.assert_array_equal(loaded.centroids, real_clusters.centroids)
    np.testing.assert_array_equal(loaded.mean_colours, real_clusters.mean_colours)
    assert loaded.k == 3
    assert loaded.histogram == HistogramSettings(bins_per_channel=16)
    assert loaded.data_fingerprint == real_clusters.data_fingerprint
    assert loaded.svhn_root == real_clusters.svhn_root
    assert loaded.assignment.dtype == np.int64


def test_load_rejects_other_data(tmp_path, train, real_clusters):
    save_clusters(tmp_path, real_clusters)
    changed = train.images.copy()
    changed[100, 5, 5, 0] ^= 0x80
    with pytest.raises(DataError, match="clusters file made from other data"):
        load_clusters(tmp_path, images=changed)
    with pytest.raises(DataError, match="clusters file made from other data"):
        load_clusters(tmp_path, images=train.images[:-1])


def test_load_missing_files(tmp_path, real_clusters):
    with pytest.raises(DataError, match="not found; run `augsvhn cluster"):
        load_clusters(tmp_path)
    save_clusters(tmp_path, real_clusters)
    (tmp_path / CLUSTERS_NPZ).unlink()
    with pytest.raises(DataError, match=f"{CLUSTERS_NPZ} not found"):
        load_clusters(tmp_path)


def rewrite_json(workdir, **changes):
    path = workdir / CLUSTERS_JSON
    metadata = json.loads(path.read_text())
    metadata.update(changes)
    path.write_text(json.dumps(metadata))


def replace_npz(workdir, **arrays):
    """Write a new clusters.npz and record its checksum, so only the array checks can catch it."""
    np.savez(workdir / CLUSTERS_NPZ, **arrays)
    rewrite_json(workdir, npz_sha256=clusters_module._sha256_file(workdir / CLUSTERS_NPZ))


@pytest.mark.parametrize(
    "corruption, expected",
    [
        ("json garbage", "clusters.json is unreadable"),
        ("json list", "not a JSON object"),
        ("json missing k", "missing or invalid 'k'"),
        ("json k string", "missing or invalid 'k'"),
        ("json future version", "format version 99"),
        ("json bad bins", "invalid K or histogram settings"),
        ("npz garbage", "does not match"),
        ("npz truncated", "does not match"),
        ("npz garbage, checksum updated", "clusters.npz is unreadable"),
        ("npz without centroids", "clusters.npz is unreadable"),
        ("assignment out of range", "clusters outside 0..2"),
        ("assignment too short", "expected (4487,)"),
        ("centroids wrong shape", "do not match K=3"),
    ],
)
def test_load_rejects_corrupt_files(tmp_path, real_clusters, corruption, expected):
    save_clusters(tmp_path, real_clusters)
    npz = tmp_path / CLUSTERS_NPZ
    good = {"assignment": real_clusters.assignment, "centroids": real_clusters.centroids}
    good["mean_colours"] = real_clusters.mean_colours

    if corruption == "json garbage":
        (tmp_path / CLUSTERS_JSON).write_text("{\"k\": 3,")
    elif corruption == "json list":
        (tmp_path / CLUSTERS_JSON).write_text("[]")
    elif corruption == "json missing k":
        metadata = json.loads((tmp_path / CLUSTERS_JSON).read_text())
        del metadata["k"]
        (tmp_path / CLUSTERS_JSON).write_text(json.dumps(metadata))
    elif corruption == "json k string":
        rewrite_json(tmp_path, k="3")
    elif corruption == "json future version":
        rewrite_json(tmp_path, format_version=99)
    elif corruption == "json bad bins":
        rewrite_json(tmp_path, histogram={"bins_per_channel": 16, "range": [0, 255]})
    elif corruption == "npz garbage":
        npz.write_bytes(np.random.default_rng(0).bytes(1000))
    elif corruption == "npz truncated":
        npz.write_bytes(npz.read_bytes()[:500])
    elif corruption == "npz garbage, checksum updated":
        npz.write_bytes(np.random.default_rng(0).bytes(1000))
        rewrite_json(tmp_path, npz_sha256=clusters_module._sha256_file(npz))
    elif corruption == "npz without centroids":
        replace_npz(tmp_path, assignment=good["assignment"], mean_colours=good["mean_colours"])
    elif corruption == "assignment out of range":
        replace_npz(tmp_path, **{**good, "assignment": np.full_like(good["assignment"], 3)})
    elif corruption == "assignment too short":
        replace_npz(tmp_path, **{**good, "assignment": good["assignment"][:-1]})
    elif corruption == "centroids wrong shape":
        replace_npz(tmp_path, **{**good, "centroids": good["centroids"][:2]})

    with pytest.raises(DataError) as error:
        load_clusters(tmp_path)
    assert expected in str(error.value)


def test_npz_is_a_plain_zip_without_pickles(tmp_path, real_clusters):
    npz_path, _ = save_clusters(tmp_path, real_clusters)
    with zipfile.ZipFile(npz_path) as archive:
        assert sorted(archive.namelist()) == ["assignment.npy", "centroids.npy", "mean_colours.npy"]
    with np.load(npz_path, allow_pickle=False) as npz:
        assert npz["assignment"].dtype == np.int64


def test_cluster_grid_png(tmp_path, train, real_clusters):
    path = save_cluster_grid(train.images, real_clusters, tmp_path / "grid.png", per_cluster=8)
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > height  # one row of 8 images per cluster, 3 rows


# ---- the `augsvhn cluster` command ----


@pytest.fixture(scope="module")
def cluster_run(svhn_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("work")
    result = CliRunner().invoke(cli, ["cluster", "--svhn-root", str(svhn_root), "--workdir", str(workdir)])
    return workdir, result


def test_cli_cluster_real_subset(cluster_run, svhn_root, train):
    workdir, result = cluster_run
    assert result.exit_code == 0, result.output
    assert "3 clusters of 4487 training images" in result.output
    for name in ("clusters.npz", "clusters.json", "clusters.png", "clusters-k-scan.png", "config.json"):
        assert (workdir / name).is_file(), name
        assert str(workdir / name) in result.output
    assert load_config(workdir)["svhn_root"] == str(svhn_root.resolve())

    clusters = load_clusters(workdir, images=train.images)
    for c in range(3):
        size = clusters.sizes[c]
        assert f"{c:>7}  {size:>6}  {size / len(train):>6.1%}" in result.output
    assert [row["k"] for row in clusters.k_scan] == [2, 3, 4, 5, 6]
    assert "K scan" in result.output


def test_cli_cluster_reuses_workdir_root(cluster_run, monkeypatch):
    workdir, _ = cluster_run
    monkeypatch.delenv(SVHN_ROOT_ENV, raising=False)
    result = CliRunner().invoke(cli, ["cluster", "--workdir", str(workdir), "--k", "2", "--no-k-scan"])
    assert result.exit_code == 0, result.output
    assert "2 clusters of 4487 training images" in result.output
    assert load_clusters(workdir).k == 2
    assert not (workdir / "clusters-k-scan.png").exists()


def test_cli_recluster_with_models_rejected(svhn_root, tmp_path):
    workdir = tmp_path / "work"
    base = ["cluster", "--svhn-root", str(svhn_root), "--workdir", str(workdir), "--no-k-scan"]
    assert CliRunner().invoke(cli, base).exit_code == 0
    model_dir = workdir / "models" / "cluster-1"
    model_dir.mkdir(parents=True)
    (model_dir / "checkpoint.pt").write_bytes(b"weights")  # only its presence matters here
    before = (workdir / CLUSTERS_NPZ).read_bytes()

    result = CliRunner().invoke(cli, base + ["--k", "4"])
    assert result.exit_code == 1, result.output
    assert "has cluster models trained on its current clusters (cluster-1" in result.output
    assert "use a new --workdir" in result.output
    assert (workdir / CLUSTERS_NPZ).read_bytes() == before
    assert load_clusters(workdir).k == 3

    # The same settings give the same clusters, so a script may rerun the command.
    repeat = CliRunner().invoke(cli, base)
    assert repeat.exit_code == 0, repeat.output


def test_cli_cluster_root_from_env(svhn_root, tmp_path, monkeypatch):
    monkeypatch.setenv(SVHN_ROOT_ENV, str(svhn_root))
    result = CliRunner().invoke(cli, ["cluster", "--workdir", str(tmp_path), "--no-k-scan", "--n-init", "1"])
    assert result.exit_code == 0, result.output
    assert load_clusters(tmp_path).n_init == 1


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--k", "0"], "Invalid value for '--k'"),
        (["--k", "1"], "Invalid value for '--k'"),
        (["--k", "three"], "Invalid value for '--k'"),
        (["--bins", "0"], "Invalid value for '--bins'"),
        (["--seed", "-1"], "Invalid value for '--seed'"),
        (["--n-init", "0"], "Invalid value for '--n-init'"),
    ],
)
def test_cli_cluster_bad_options(svhn_root, tmp_path, arguments, expected):
    command = ["cluster", "--svhn-root", str(svhn_root), "--workdir", str(tmp_path), *arguments]
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 2
    assert expected in result.output
    assert not (tmp_path / CLUSTERS_JSON).exists()


def test_cli_cluster_needs_workdir(svhn_root):
    result = CliRunner().invoke(cli, ["cluster", "--svhn-root", str(svhn_root)])
    assert result.exit_code == 2
    assert "Missing option '--workdir'" in result.output


def test_cli_cluster_without_root(tmp_path, monkeypatch):
    monkeypatch.delenv(SVHN_ROOT_ENV, raising=False)
    result = CliRunner().invoke(cli, ["cluster", "--workdir", str(tmp_path)])
    assert result.exit_code == 1
    assert "Error: no SVHN folder given; pass --svhn-root" in result.output


def test_cli_cluster_truncated_file(svhn_root, tmp_path):
    bad_root = tmp_path / "svhn"
    bad_root.mkdir()
    raw = (svhn_root / "train_32x32.mat").read_bytes()
    (bad_root / "train_32x32.mat").write_bytes(raw[: len(raw) // 3])
    result = CliRunner().invoke(cli, ["cluster", "--svhn-root", str(bad_root), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 1
    assert f"Error: SVHN file {bad_root / 'train_32x32.mat'} is truncated" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_cluster_download_failure(tmp_path, monkeypatch):
    def offline(root, split, download):
        raise OSError("Network is unreachable")

    monkeypatch.setattr("torchvision.datasets.SVHN", offline)
    root = tmp_path / "svhn"
    result = CliRunner().invoke(cli, ["cluster", "--svhn-root", str(root), "--workdir", str(tmp_path), "--download"])
    assert result.exit_code == 1
    assert "download of SVHN train split" in result.output
    assert "Traceback" not in result.output
