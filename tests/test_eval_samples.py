"""Feature net, in-memory scoring and the `eval-samples` command on the real SVHN subset."""

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from augsvhn.cli import cli
from augsvhn.clusters import fit_clusters, save_clusters
from augsvhn.data import load_svhn
from augsvhn.errors import DataError
from augsvhn.eval.features import FeatureNetSettings, load_or_train_extractor
from augsvhn.eval.quality import evaluate_images, make_reference, noise_images
from augsvhn.shards import manifest_entry, shard_relative_path, write_manifest, write_shard

# A shorter budget than the default 280 steps keeps the suite fast. The accuracy floor applies to this budget.
TEST_FEATURE_STEPS = 210
ACCURACY_FLOOR = 0.7


@pytest.fixture(scope="module")
def real(svhn_root):
    return load_svhn(svhn_root, "train"), load_svhn(svhn_root, "test")


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="module")
def extractor(real, feature_cache):
    train, test = real
    settings = FeatureNetSettings(steps=TEST_FEATURE_STEPS)
    return load_or_train_extractor(
        train.images, train.labels, test.images, test.labels, feature_cache, settings, progress=False
    )


def test_feature_net_accuracy_floor(extractor):
    assert extractor.test_accuracy > ACCURACY_FLOOR


def test_feature_net_cache_reload(extractor, real, feature_cache):
    train, test = real
    start = time.perf_counter()
    reloaded = load_or_train_extractor(
        train.images, train.labels, test.images, test.labels, feature_cache, extractor.settings, progress=False
    )
    assert time.perf_counter() - start < 0.5 * extractor.train_seconds  # loaded, not retrained
    assert reloaded.cache_path == extractor.cache_path
    assert reloaded.test_accuracy == extractor.test_accuracy
    np.testing.assert_array_equal(reloaded.features(test.images[:64]), extractor.features(test.images[:64]))


def test_feature_net_corrupt_cache(extractor, real, tmp_path):
    train, test = real
    corrupt = tmp_path / extractor.cache_path.name
    corrupt.write_bytes(extractor.cache_path.read_bytes()[:1000])
    with pytest.raises(DataError, match="delete it to retrain"):
        load_or_train_extractor(
            train.images, train.labels, test.images, test.labels, tmp_path, extractor.settings, progress=False
        )


def test_evaluate_images_real_versus_noise(extractor, real):
    train, test = real
    reference = make_reference(test.images[:1000], extractor)
    held_out = evaluate_images(test.images[1000:2000], test.labels[1000:2000], reference, extractor, kid_subsets=20)
    noise, noise_labels = noise_images(1000, np.random.default_rng(0))
    ceiling = evaluate_images(noise, noise_labels, reference, extractor, kid_subsets=20)

    assert held_out["samples"] == 1000
    assert held_out["frechet_distance"] < 0.1 * ceiling["frechet_distance"]
    assert held_out["kid"] < 0.1 * ceiling["kid"]
    assert held_out["precision"] > 0.5
    assert held_out["recall"] > 0.5
    # Noise precision is not bounded here: the net maps all noise images to one small region of feature space,
    # which the wide k-NN balls of a few low-contrast real digits cover (0.95 with the test net).
    assert ceiling["recall"] < 0.05
    # Label agreement on real held-out digits is the feature net's accuracy on them.
    expected = np.mean(extractor.predict(test.images[1000:2000]) == test.labels[1000:2000])
    assert held_out["label_agreement"] == pytest.approx(expected)
    assert ceiling["label_agreement"] < 0.3


def test_evaluate_images_wrong_labels(extractor, real):
    _, test = real
    reference = make_reference(test.images[:500], extractor)
    images, labels = test.images[500:1000], test.labels[500:1000]
    right = evaluate_images(images, labels, reference, extractor, kid_subsets=5)
    shifted = evaluate_images(images, (labels + 1) % 10, reference, extractor, kid_subsets=5)
    assert shifted["label_agreement"] < 0.2 < right["label_agreement"]
    assert shifted["frechet_distance"] == right["frechet_distance"]  # labels do not enter the image metrics


def _write_shards(folder, parts):
    """Write one shard per (cluster, images, labels) and the manifest, following the shards layout."""
    entries = []
    for cluster, images, labels in parts:
        attributes = {
            "cluster": cluster, "shard_index": 0, "seed": 0, "sampler": "test", "steps": 1, "nfe": 1,
            "sde": "{}", "guidance": 0.0, "label_mode": "uniform", "checkpoint_sha256": "0" * 64,
            "augsvhn_version": "test",
        }  # fmt: skip
        sha256 = write_shard(folder / shard_relative_path(cluster, 0), images, labels, attributes)
        entries.append(manifest_entry(cluster, 0, sha256, labels))
    write_manifest(folder, entries, {"stand_in": "real test digits and noise"})


def test_cli_eval_samples_end_to_end(extractor, real, svhn_root, feature_cache, tmp_path):
    train, test = real
    noise, noise_labels = noise_images(300, np.random.default_rng(1))
    shards = tmp_path / "shards"
    _write_shards(shards, [(0, test.images[2000:2300], test.labels[2000:2300]), (1, noise, noise_labels)])
    workdir = tmp_path / "work"
    save_clusters(workdir, fit_clusters(train.images, k=2, n_init=1, svhn_root=svhn_root))
    out = tmp_path / "report"

    arguments = [
        "eval-samples", "--svhn-root", str(svhn_root), "--synthetic", str(shards), "--out", str(out),
        "--n", "300", "--device", "cpu", "--feature-cache", str(feature_cache), "--workdir", str(workdir),
        "--cas-steps", "5", "--feature-steps", str(TEST_FEATURE_STEPS),
    ]  # fmt: skip
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["rows"]

    assert set(rows) == {"cluster-0", "cluster-1", "all", "real_train", "real_test_held_out", "noise"}
    assert rows["real_test_held_out"]["digits"] == len(test.labels) - 300
    assert metrics["feature_extractor"]["test_accuracy"] == pytest.approx(extractor.test_accuracy)
    assert metrics["reference"] == {"split": "test", "samples": 300}
    assert "same colour cluster" in metrics["colour_reference"]
    assert rows["cluster-0"]["frechet_distance"] < 0.2 * rows["cluster-1"]["frechet_distance"]
    assert rows["real_train"]["frechet_distance"] < 0.2 * rows["noise"]["frechet_distance"]
    assert rows["cluster-0"]["precision"] > 0.5
    assert rows["cluster-1"]["recall"] < 0.05
    assert rows["cluster-0"]["label_agreement"] > 0.5
    assert rows["all"]["digits"] == 600
    for name in ("cluster-0", "cluster-1", "all", "real_train"):
        assert 0.0 <= rows[name]["cas_accuracy"] <= 1.0
    assert 0.0 <= rows["cluster-0"]["colour_histogram_distance"] < rows["cluster-1"]["colour_histogram_distance"]
    assert "| cluster-0 |" in (out / "metrics.md").read_text()


def test_cli_eval_samples_missing_manifest(svhn_root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    arguments = ["eval-samples", "--svhn-root", str(svhn_root), "--synthetic", str(empty), "--out", str(tmp_path)]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 1
    assert "manifest.json not found" in result.output
    assert "Traceback" not in result.output
