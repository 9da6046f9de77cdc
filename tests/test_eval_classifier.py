"""Classifier arms, augmentation and the eval-classifier command on the real SVHN subset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from augsvhn.cli import cli
from augsvhn.data import load_svhn
from augsvhn.eval import augment, classifier
from augsvhn.eval.experiment import load_synthetic
from augsvhn.shards import manifest_entry, shard_relative_path, write_manifest, write_shard

ATTRIBUTES = {
    "seed": 0,
    "sampler": "stand-in",
    "steps": 0,
    "nfe": 0,
    "sde": "{}",
    "guidance": 0.0,
    "label_mode": "stand-in",
    "checkpoint_sha256": "0" * 64,
    "augsvhn_version": "test",
}


def write_stand_in_shards(folder, images, labels, clusters=(0, 1)):
    """Write real digits as a shards folder, split over `clusters`, as `augsvhn generate` would lay it out."""
    entries = []
    for cluster, part in zip(clusters, np.array_split(np.arange(len(labels)), len(clusters))):
        path = folder / shard_relative_path(cluster, 0)
        attributes = dict(ATTRIBUTES, cluster=cluster, shard_index=0)
        sha256 = write_shard(path, images[part], labels[part], attributes)
        entries.append(manifest_entry(cluster, 0, sha256, labels[part]))
    write_manifest(folder, entries, {"stand_in": "real train digits"})
    return folder


@pytest.fixture(scope="module")
def train_split(svhn_root):
    return load_svhn(svhn_root, "train")


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory, train_split):
    # Real train digits 0-299 stand in for generated ones; the real arm uses all train digits.
    folder = tmp_path_factory.mktemp("shards")
    return write_stand_in_shards(folder, train_split.images[:300], train_split.labels[:300])


def test_resnet_stem_adapted():
    model, description = classifier.build_classifier("resnet18")
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (2, 2)
    assert "3x3 stride-2" in description
    features = model.forward_features(torch.zeros(1, 3, 32, 32))
    assert features.shape[-1] == 2  # 32 / 2 (stem) / 8 (three stride-2 stages)


def test_deep_stem_loses_maxpool():
    model, description = classifier.build_classifier("resnet10t")
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert "max-pool" in description
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_model_rejected():
    with pytest.raises(ValueError, match="unknown timm model"):
        classifier.build_classifier("resnet_does_not_exist")


def test_random_crop_reproducible():
    x = torch.rand(8, 3, 32, 32)
    first = augment.random_crop(x, torch.Generator().manual_seed(3))
    second = augment.random_crop(x, torch.Generator().manual_seed(3))
    assert first.shape == x.shape
    assert torch.equal(first, second)
    # Each crop is a shifted window of the reflect-padded image, so its centre pixels come from the original.
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for image, crop in zip(padded, first):
        windows = image.unfold(1, 32, 1).unfold(2, 32, 1)  # (C, 5, 5, 32, 32)
        matches = (windows == crop[:, None, None]).all(dim=(0, 3, 4))
        assert matches.any()


def test_blur_batch_sigma_zero_is_identity():
    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(augment.gaussian_blur_batch(x, torch.zeros(4)), x, atol=1e-6)
    blurred = augment.gaussian_blur_batch(x, torch.full((4,), 1.5))
    assert blurred.std() < x.std()
    assert torch.allclose(blurred.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.02)


def test_batch_sampler_share(train_split):
    real = (train_split.images[:100], train_split.labels[:100])
    synthetic = (train_split.images[100:150], train_split.labels[100:150])
    sampler = classifier.BatchSampler(real, synthetic, 20, 0.25, torch.Generator().manual_seed(0))
    images, labels = sampler.next()
    assert images.shape == (20, 3, 32, 32)
    # The first 15 rows come from the real source, the last 5 from the synthetic one.
    real_rows = torch.tensor(real[0]).permute(0, 3, 1, 2).float() / 255
    synthetic_rows = torch.tensor(synthetic[0]).permute(0, 3, 1, 2).float() / 255
    assert all((real_rows == image).flatten(1).all(1).any() for image in images[:15])
    assert all((synthetic_rows == image).flatten(1).all(1).any() for image in images[15:])


def test_load_synthetic_clusters(shards_dir):
    images, labels, manifest_sha256 = load_synthetic(shards_dir)
    assert images.shape == (300, 32, 32, 3)
    assert len(manifest_sha256) == 64
    images, labels, _ = load_synthetic(shards_dir, [1])
    assert len(labels) == 150


def _run(args):
    return CliRunner().invoke(cli, ["eval-classifier", *args], catch_exceptions=False)


def test_cli_report_and_resume(tmp_path, svhn_root, shards_dir):
    out = tmp_path / "report"
    common = ["--svhn-root", str(svhn_root), "--synthetic", str(shards_dir), "--out", str(out)]
    quick = ["--model", "test_resnet", "--max-steps", "3", "--batch-size", "16", "--test-limit", "120"]
    quick += ["--device", "cpu"]

    result = _run([*common, *quick, "--seeds", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    expected_slices = {"all", "blurred", "backlit", "blur_sigma1", "blur_sigma2", "backlight"}
    assert set(report["slices"]) == expected_slices
    for name, entry in report["slices"].items():
        assert entry["n"] > 0
        for arm in classifier.ARMS:
            assert 0.0 <= entry[arm]["accuracy"] <= 1.0
        assert len(entry["delta"]["ci95"]) == 2
        assert entry["delta"]["ci95"][0] <= entry["delta"]["mean"] <= entry["delta"]["ci95"][1]
        assert 0.0 <= entry["delta"]["mcnemar_p"] <= 1.0
        assert "delta_vs_classic" in entry
    assert report["slices"]["all"]["n"] == 120
    assert report["settings"]["steps"] == 3
    assert len(report["settings"]["shards_manifest_sha256"]) == 64
    assert "max-pool" in report["settings"]["stem_adaptation"]
    for name in ("report.md", "accuracy.png", "per_class.json", "confusion_augmented.png", "slices/backlit.png"):
        assert (out / name).is_file(), name

    # Checkpoints load without running code from the file.
    checkpoint = torch.load(out / "runs" / "baseline-seed0" / "checkpoint.pt", weights_only=True)
    model, _ = classifier.build_classifier("test_resnet")
    model.load_state_dict(checkpoint["model_state"])

    # A second seed reruns only the new (arm, seed) pairs.
    finished = {arm: (out / "runs" / f"{arm}-seed0" / "predictions.npz").stat().st_mtime_ns for arm in classifier.ARMS}
    result = _run([*common, *quick, "--seeds", "2"])
    assert result.exit_code == 0, result.output
    for arm in classifier.ARMS:
        assert (out / "runs" / f"{arm}-seed0" / "predictions.npz").stat().st_mtime_ns == finished[arm]
        assert (out / "runs" / f"{arm}-seed1" / "predictions.npz").is_file()
    report = json.loads((out / "report.json").read_text())
    assert len(report["slices"]["all"]["baseline"]["per_seed"]) == 2

    # Other settings in the same folder are an error, not a silent mix.
    changed = [*common, "--model", "test_resnet", "--max-steps", "4", "--batch-size", "16", "--test-limit", "120"]
    result = CliRunner().invoke(cli, ["eval-classifier", *changed])
    assert result.exit_code == 1
    assert "steps: 3 in the folder, 4 now" in result.output


def test_cli_rejects_bad_model(tmp_path, svhn_root, shards_dir):
    args = ["--svhn-root", str(svhn_root), "--synthetic", str(shards_dir), "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(cli, ["eval-classifier", *args, "--model", "resnet_nope"])
    assert result.exit_code == 2
    assert "not a timm model name" in result.output


def test_cli_rejects_unknown_cluster(tmp_path, svhn_root, shards_dir):
    args = ["--svhn-root", str(svhn_root), "--synthetic", str(shards_dir), "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(cli, ["eval-classifier", *args, "--clusters", "0,7", "--max-steps", "1"])
    assert result.exit_code == 1
    assert "clusters [7]" in result.output


def test_cli_kill_and_rerun_keeps_finished_runs(tmp_path, svhn_root, shards_dir):
    """SIGKILL during eval-classifier, then the same command: finished runs are kept, not retrained."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "report"
    arguments = ["eval-classifier", "--svhn-root", str(svhn_root), "--synthetic", str(shards_dir), "--out", str(out),
                 "--model", "test_resnet", "--max-steps", "3", "--batch-size", "16", "--test-limit", "120",
                 "--device", "cpu", "--seeds", "1"]
    first_run = out / "runs" / "baseline-seed0" / "predictions.npz"
    process = subprocess.Popen([sys.executable, "-m", "augsvhn", *arguments],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not first_run.exists():
            assert process.poll() is None, f"eval-classifier exited with {process.returncode} before its first run"
            assert time.monotonic() < deadline, "timed out waiting for the first finished run"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    finished = first_run.stat().st_mtime_ns

    result = CliRunner().invoke(cli, arguments, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert first_run.stat().st_mtime_ns == finished
    assert (out / "report.json").is_file()
    leftovers = [path.name for path in out.rglob(".*") if ".tmp" in path.name]
    assert leftovers == []
