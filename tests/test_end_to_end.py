"""The main job through the CLI on the real SVHN subset: cluster, train, generate, verify, show, load."""

import json
import subprocess
import sys

import h5py
import numpy as np
from click.testing import CliRunner

from augsvhn import SyntheticSVHN, __version__
from augsvhn.cli import cli


def invoke(*args):
    result = CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_main_job_end_to_end(svhn_root, tmp_path):
    workdir, shards = tmp_path / "work", tmp_path / "shards"

    output = invoke("cluster", "--svhn-root", svhn_root, "--workdir", workdir, "--no-k-scan")
    assert "3 clusters" in output
    invoke("train", "--workdir", workdir, "--cluster", "all", "--model-size", "tiny", "--max-steps", "3",
           "--batch-size", "16", "--samples-per-digit", "0")
    for k in range(3):
        assert (workdir / "models" / f"cluster-{k}" / "checkpoint.pt").is_file()
        assert (workdir / "models" / f"cluster-{k}" / "loss.png").is_file()

    invoke("generate", "--workdir", workdir, "--per-cluster", "12", "--shard-size", "8", "--out", shards,
           "--sampler", "dpm2m", "--steps", "3", "--seed", "7")
    invoke("verify", shards)
    invoke("show", shards, "--out", tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 1000

    manifest = json.loads((shards / "manifest.json").read_text())
    assert sum(entry["count"] for entry in manifest["shards"]) == 36
    with h5py.File(shards / "cluster-1" / "shard-00001.h5", "r") as shard:
        assert shard["images"].shape == (4, 32, 32, 3)
        assert shard["images"].dtype == np.uint8
        assert shard.attrs["sampler"] == "dpm2m"
        assert shard.attrs["cluster"] == 1
        assert shard.attrs["augsvhn_version"] == __version__

    dataset = SyntheticSVHN(shards)
    assert len(dataset) == 36
    image, label = dataset[0]
    assert image.size == (32, 32)
    assert 0 <= label <= 9
    # Uniform label mode balances the digits within each shard: counts differ by at most one.
    with h5py.File(shards / "cluster-0" / "shard-00000.h5", "r") as shard:
        counts = np.bincount(shard["labels"][:], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert counts.sum() == 8


def test_cli_runs_as_module():
    completed = subprocess.run([sys.executable, "-m", "augsvhn", "--version"], capture_output=True, text=True)
    assert completed.returncode == 0
    assert __version__ in completed.stdout


def test_cli_lists_every_command():
    output = invoke("--help")
    for command in ("cluster", "train", "generate", "show", "verify", "eval-samples", "eval-classifier"):
        assert command in output


def test_single_process_command_rejected_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(cli, ["verify", str(tmp_path)])
    assert result.exit_code == 2
    assert "WORLD_SIZE=2" in result.output
    assert "train and generate" in result.output
