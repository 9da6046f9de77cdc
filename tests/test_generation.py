"""The generate loop, tested with the exact denoiser of Gaussian data so that no training is needed."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from augsvhn import generation, shards
from augsvhn.checkpoints import CHECKPOINT_NAME, REQUIRED_KEYS, checkpoint_sha256, save_checkpoint
from augsvhn.cli import cli
from augsvhn.clusters import load_clusters
from augsvhn.errors import AugsvhnError
from augsvhn.generation import ClusterModel, GenerationSettings, draw_labels, generate_shards
from augsvhn.models import NULL_LABEL, build_denoiser
from augsvhn.sampling import shard_generator
from augsvhn.sde import get_sde

DATA_STD = 0.1  # per-pixel standard deviation s of the Gaussian data


def digit_mean(labels: torch.Tensor) -> torch.Tensor:
    """Mean image mu_c (B, 3, 32, 32) of digit c: a flat grey level -0.72 + 0.16 c, and 0 for NULL_LABEL."""
    level = torch.where(labels == NULL_LABEL, torch.zeros_like(labels, dtype=torch.float32), -0.72 + 0.16 * labels)
    return level.float().reshape(-1, 1, 1, 1).expand(-1, 3, 32, 32)


def gaussian_denoiser(x, sigma, labels):
    """Exact D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) for data N(mu_c, s^2 I) and noise level sigma."""
    mu = digit_mean(labels)
    shrink = (DATA_STD**2 / (DATA_STD**2 + sigma.float() ** 2)).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return mu + shrink * (x - mu)


def gaussian_models(clusters=(0, 1), checkpoint="ab" * 32, label_counts=None, denoiser=gaussian_denoiser):
    sde = get_sde("ve", sigma_min=0.01, sigma_max=5.0)
    meta = {"label_counts": label_counts if label_counts is not None else [1] * 10}
    return [ClusterModel(cluster=k, checkpoint_sha256=checkpoint, load=lambda: (denoiser, sde, meta)) for k in clusters]


def settings(**changes):
    values = dict(per_cluster=25, shard_size=10, seed=7, sampler="heun", steps=4, guidance=0.0, label_mode="uniform")
    values.update(changes)
    return GenerationSettings(**values)


def folder_bytes(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_generate_writes_verified_shards(tmp_path):
    manifest_path = generate_shards(gaussian_models(), tmp_path, settings(), batch_size=8, progress=False)

    manifest = json.loads(manifest_path.read_text())
    assert [(entry["cluster"], entry["index"], entry["count"]) for entry in manifest["shards"]] == [
        (0, 0, 10), (0, 1, 10), (0, 2, 5), (1, 0, 10), (1, 1, 10), (1, 2, 5),
    ]
    assert manifest["total_images"] == 50
    assert manifest["settings"]["steps"] == 4
    assert manifest["settings"]["clusters"]["1"]["checkpoint_sha256"] == "ab" * 32
    assert shards.verify_shards(tmp_path) == []
    assert not (tmp_path / ".augsvhn.lock").exists()

    shard = shards.read_shard(tmp_path / "cluster-1" / "shard-00002.h5")
    assert shard.images.shape == (5, 32, 32, 3)
    assert shard.attributes["nfe"] == 2 * 4 - 1  # Heun: two evaluations per step, one on the last
    assert shard.attributes["sampler"] == "heun"
    assert json.loads(shard.attributes["sde"])["name"] == "ve"


def test_samples_match_gaussian_per_label(tmp_path):
    # With the exact denoiser, the probability-flow ODE maps x(T) to x(0) = mu + s / sqrt(s^2 + sigma_max^2)
    # (x(T) - mu). The sampler starts from the prior N(0, sigma_max^2), not from N(mu, s^2 + sigma_max^2). So every
    # pixel of a digit-c image has mean mu_c (1 - s / sqrt(s^2 + sigma_max^2)) and standard deviation
    # s sigma_max / sqrt(s^2 + sigma_max^2), up to the discretisation error of 18 Heun steps.
    sigma_max = 5.0
    generate_shards(gaussian_models(clusters=(0,)), tmp_path, settings(per_cluster=200, shard_size=200, steps=18),
                    progress=False)
    shard = shards.read_shard(tmp_path / "cluster-0" / "shard-00000.h5")
    pixels = shard.images.astype(np.float64) / 127.5 - 1  # back to [-1, 1]
    prior_shrink = DATA_STD / math.hypot(DATA_STD, sigma_max)
    for digit in range(10):
        chosen = pixels[shard.labels == digit]
        mu = -0.72 + 0.16 * digit
        assert len(chosen) == 20
        assert chosen.mean() == pytest.approx(mu * (1 - prior_shrink), abs=0.003)
        assert chosen.std() == pytest.approx(DATA_STD * sigma_max / math.hypot(DATA_STD, sigma_max), rel=0.05)


def test_shards_independent_of_batch_size(tmp_path):
    generate_shards(gaussian_models(), tmp_path / "a", settings(), batch_size=3, progress=False)
    generate_shards(gaussian_models(), tmp_path / "b", settings(), batch_size=64, progress=False)
    first, second = folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "b")
    assert list(first) == list(second)
    for name in first:
        assert first[name] == second[name], name


def test_other_seed_changes_images(tmp_path):
    generate_shards(gaussian_models(clusters=(0,)), tmp_path / "a", settings(), progress=False)
    generate_shards(gaussian_models(clusters=(0,)), tmp_path / "b", settings(seed=8), progress=False)
    first = shards.read_shard(tmp_path / "a" / "cluster-0" / "shard-00000.h5")
    second = shards.read_shard(tmp_path / "b" / "cluster-0" / "shard-00000.h5")
    assert not np.array_equal(first.images, second.images)


def test_rerun_after_crash_matches(tmp_path, monkeypatch):
    generate_shards(gaussian_models(), tmp_path / "whole", settings(), progress=False)

    calls = []
    original_write = generation.write_shard

    def write_then_crash(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C while the third shard was written
        calls.append(args[0])
        return original_write(*args, **kwargs)

    monkeypatch.setattr(generation, "write_shard", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        generate_shards(gaussian_models(), tmp_path / "resumed", settings(), progress=False)
    assert len(shards.list_complete_shards(tmp_path / "resumed")) == 2
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    assert not (tmp_path / "resumed" / ".augsvhn.lock").exists()

    monkeypatch.setattr(generation, "write_shard", original_write)
    generate_shards(gaussian_models(), tmp_path / "resumed", settings(), progress=False)
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")


def test_two_ranks_match_one_process(tmp_path):
    import threading

    generate_shards(gaussian_models(), tmp_path / "one", settings(), progress=False)

    barrier = threading.Barrier(2, timeout=60)
    errors = []

    def run(rank):
        try:
            generate_shards(gaussian_models(), tmp_path / "two", settings(), progress=False, rank=rank, world_size=2,
                            barrier=barrier.wait)
        except BaseException as error:  # reported below: an exception in a thread would otherwise be lost
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")


def test_rerun_keeps_complete_shards(tmp_path, monkeypatch):
    generate_shards(gaussian_models(), tmp_path, settings(), progress=False)
    before = folder_bytes(tmp_path)
    (tmp_path / "cluster-1" / "shard-00001.h5").unlink()

    written = []
    original_write = generation.write_shard
    monkeypatch.setattr(generation, "write_shard", lambda path, *a: written.append(path) or original_write(path, *a))
    generate_shards(gaussian_models(), tmp_path, settings(), progress=False)
    assert [path.relative_to(tmp_path).as_posix() for path in written] == ["cluster-1/shard-00001.h5"]
    assert folder_bytes(tmp_path) == before


def test_leftover_temporary_file_removed(tmp_path):
    leftover = tmp_path / "cluster-0" / ".shard-00000.h5.tmp-999999"
    leftover.parent.mkdir()
    leftover.write_bytes(b"half a shard")
    generate_shards(gaussian_models(), tmp_path, settings(), progress=False)
    assert not leftover.exists()
    assert shards.verify_shards(tmp_path) == []


@pytest.mark.parametrize(
    ("change", "named"),
    [({"seed": 8}, "seed=8"), ({"steps": 5}, "steps=5"), ({"sampler": "dpm2m"}, "sampler='dpm2m'"),
     ({"guidance": 1.5}, "guidance=1.5"), ({"label_mode": "cluster"}, "label_mode='cluster'")],
)
def test_rerun_other_settings_rejected(tmp_path, change, named):
    generate_shards(gaussian_models(), tmp_path, settings(), progress=False)
    with pytest.raises(AugsvhnError, match="new --out") as error:
        generate_shards(gaussian_models(), tmp_path, settings(**change), progress=False)
    assert named in str(error.value)


def test_rerun_other_checkpoint_rejected(tmp_path):
    generate_shards(gaussian_models(), tmp_path, settings(), progress=False)
    with pytest.raises(AugsvhnError, match="model checkpoint"):
        generate_shards(gaussian_models(checkpoint="cd" * 32), tmp_path, settings(), progress=False)


def test_rerun_other_shard_plan_rejected(tmp_path):
    generate_shards(gaussian_models(), tmp_path, settings(), progress=False)
    with pytest.raises(AugsvhnError, match="--shard-size 20 needs 20"):
        generate_shards(gaussian_models(), tmp_path, settings(shard_size=20), progress=False)
    with pytest.raises(AugsvhnError, match=r"makes 1 shard\(s\) per cluster"):
        generate_shards(gaussian_models(), tmp_path, settings(per_cluster=10), progress=False)
    with pytest.raises(AugsvhnError, match="cluster-1/shard-00000.h5, but this run generates clusters 0"):
        generate_shards(gaussian_models(clusters=(0,)), tmp_path, settings(), progress=False)


def test_non_finite_samples_rejected(tmp_path):
    def broken_denoiser(x, sigma, labels):
        out = gaussian_denoiser(x, sigma, labels)
        out[0, 0, 0, 0] = float("nan")
        return out

    with pytest.raises(AugsvhnError, match="non-finite pixels in 1 of 10 images"):
        generate_shards(gaussian_models(denoiser=broken_denoiser), tmp_path, settings(), progress=False)
    assert shards.list_complete_shards(tmp_path) == []
    assert [path.name for path in tmp_path.rglob("*")] == []


def test_folder_in_use_rejected(tmp_path):
    from augsvhn.fsutil import DirectoryLock

    with DirectoryLock(tmp_path, "test"):
        with pytest.raises(AugsvhnError, match="in use by another augsvhn run"):
            generate_shards(gaussian_models(), tmp_path, settings(), progress=False)
    assert shards.list_complete_shards(tmp_path) == []


# ---- labels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 9, 10, 25, 1000])
def test_uniform_labels_balanced(count):
    labels = draw_labels(shard_generator(0, 0, 0), count, "uniform")
    counts = np.bincount(labels.numpy(), minlength=10)
    assert counts.sum() == count
    assert counts.max() - counts.min() <= 1
    assert counts.min() == count // 10


def test_uniform_labels_shuffled_and_seeded():
    first = draw_labels(shard_generator(0, 0, 0), 100, "uniform")
    again = draw_labels(shard_generator(0, 0, 0), 100, "uniform")
    other = draw_labels(shard_generator(0, 0, 1), 100, "uniform")
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, torch.arange(100) % 10)


def test_cluster_labels_follow_counts():
    counts = [0, 0, 0, 0, 0, 0, 0, 0, 300, 100]
    labels = draw_labels(shard_generator(0, 0, 0), 4000, "cluster", counts)
    drawn = np.bincount(labels.numpy(), minlength=10)
    assert drawn[:8].sum() == 0
    # Binomial(4000, 0.75): standard deviation 27, so 3000 +- 110 is more than 4 standard deviations.
    assert abs(drawn[8] - 3000) < 110


def test_cluster_labels_need_counts():
    with pytest.raises(AugsvhnError, match="--label-mode uniform"):
        draw_labels(shard_generator(0, 0, 0), 10, "cluster", [0] * 10)


def test_cluster_label_mode_in_shards(tmp_path):
    counts = [0, 5, 0, 0, 0, 0, 0, 0, 0, 5]
    generate_shards(gaussian_models(label_counts=counts), tmp_path, settings(label_mode="cluster"), progress=False)
    manifest = shards.read_manifest(tmp_path)
    total = np.sum([entry["label_counts"] for entry in manifest["shards"]], axis=0)
    assert set(np.flatnonzero(total)) <= {1, 9}
    assert total.sum() == 50


def test_shard_counts():
    assert settings(per_cluster=25, shard_size=10).shard_counts() == [10, 10, 5]
    assert settings(per_cluster=20, shard_size=10).shard_counts() == [10, 10]
    assert settings(per_cluster=3, shard_size=1000).shard_counts() == [3]


# ---- from a workdir, through the CLI -----------------------------------------------------------


def write_tiny_checkpoint(workdir, cluster, seed, label_counts=(3, 1, 1, 1, 1, 1, 1, 1, 1, 1)):
    """Save an untrained tiny denoiser as the checkpoint of `cluster`, with every entry a checkpoint has."""
    torch.manual_seed(seed)
    denoiser = build_denoiser("tiny")
    sde = get_sde("ve", sigma_min=0.01, sigma_max=20.0)
    from augsvhn import __version__
    from augsvhn.checkpoints import FORMAT_VERSION

    checkpoint = {
        "format_version": FORMAT_VERSION, "augsvhn_version": __version__, "model_size": "tiny",
        "denoiser": denoiser.config(), "sde": sde.config(), "loss": {"name": "dsm"}, "train_config": {},
        "cluster": cluster, "data_fingerprint": "0" * 64, "label_counts": list(label_counts),
        "sigma_max": 20.0, "step": 0, "epoch": 0, "images_seen": 0, "elapsed_s": 0.0,
        "model": denoiser.state_dict(), "ema": denoiser.state_dict(), "optimizer": {}, "rng": {},
    }
    assert set(REQUIRED_KEYS) <= set(checkpoint)
    path = workdir / "models" / f"cluster-{cluster}" / CHECKPOINT_NAME
    save_checkpoint(path, checkpoint)
    return path


def test_cli_generate_tiny_models(tmp_path):
    workdir, out = tmp_path / "work", tmp_path / "out"
    paths = [write_tiny_checkpoint(workdir, k, seed=k) for k in (0, 2)]
    arguments = ["generate", "--workdir", str(workdir), "--out", str(out), "--per-cluster", "6", "--shard-size", "4",
                 "--sampler", "heun", "--steps", "3", "--device", "cpu"]
    result = CliRunner().invoke(cli, arguments + ["--batch-size", "5"])
    assert result.exit_code == 0, result.output

    manifest = shards.read_manifest(out)
    assert [entry["path"] for entry in manifest["shards"]] == [
        "cluster-0/shard-00000.h5", "cluster-0/shard-00001.h5", "cluster-2/shard-00000.h5", "cluster-2/shard-00001.h5",
    ]
    assert manifest["settings"]["clusters"]["2"]["checkpoint_sha256"] == checkpoint_sha256(paths[1])
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code == 0

    # Same command with another batch size in a new folder: the untrained U-Net gives the same bytes.
    result = CliRunner().invoke(cli, arguments[:4] + [str(tmp_path / "again")] + arguments[5:] + ["--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert folder_bytes(out) == folder_bytes(tmp_path / "again")

    # The default batch size is auto (256 images per call on the CPU): the same bytes again.
    result = CliRunner().invoke(cli, arguments[:4] + [str(tmp_path / "auto")] + arguments[5:])
    assert result.exit_code == 0, result.output
    assert folder_bytes(out) == folder_bytes(tmp_path / "auto")


def test_cli_generate_missing_cluster(tmp_path):
    write_tiny_checkpoint(tmp_path, 0, seed=0)
    result = CliRunner().invoke(cli, ["generate", "--workdir", str(tmp_path), "--out", str(tmp_path / "out"),
                                      "--per-cluster", "2", "--clusters", "0,3"])
    assert result.exit_code == 1
    assert "no checkpoint for cluster(s) 3" in result.output
    assert "Traceback" not in result.output


def test_cli_generate_unknown_cluster(tmp_path, svhn_root):
    workdir = tmp_path / "work"
    assert CliRunner().invoke(cli, ["cluster", "--svhn-root", str(svhn_root), "--workdir", str(workdir),
                                    "--no-k-scan", "--n-init", "1"]).exit_code == 0
    write_tiny_checkpoint(workdir, 0, seed=0)
    result = CliRunner().invoke(cli, ["generate", "--workdir", str(workdir), "--out", str(tmp_path / "out"),
                                      "--per-cluster", "2", "--clusters", "0,5"])
    assert result.exit_code == 1
    assert "cluster(s) 5 do not exist: the clusters of" in result.output
    assert "are 0 to 2" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_generate_checks_cluster_size(tmp_path, svhn_root):
    workdir = tmp_path / "work"
    assert CliRunner().invoke(cli, ["cluster", "--svhn-root", str(svhn_root), "--workdir", str(workdir),
                                    "--no-k-scan", "--n-init", "1"]).exit_code == 0
    size = int(load_clusters(workdir).sizes[1])
    arguments = ["generate", "--workdir", str(workdir), "--per-cluster", "2", "--sampler", "heun", "--steps", "2",
                 "--clusters", "1"]

    # A model trained on another number of images than cluster 1 has: the clusters changed after training.
    write_tiny_checkpoint(workdir, 1, seed=0, label_counts=[size - 8] + [1] * 9)
    result = CliRunner().invoke(cli, arguments + ["--out", str(tmp_path / "rejected")])
    assert result.exit_code == 1
    assert f"was trained on {size + 1} images, but cluster 1 of the current clusters file has {size}" in result.output
    assert "augsvhn train --cluster 1" in result.output
    assert not (tmp_path / "rejected").exists()

    write_tiny_checkpoint(workdir, 1, seed=0, label_counts=[size - 9] + [1] * 9)
    result = CliRunner().invoke(cli, arguments + ["--out", str(tmp_path / "accepted")])
    assert result.exit_code == 0, result.output
    assert shards.read_manifest(tmp_path / "accepted")["total_images"] == 2


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [("--per-cluster", "0", "--per-cluster"), ("--sampler", "magic", "--sampler"), ("--clusters", "a,b", "--clusters"),
     ("--label-mode", "skewed", "--label-mode"), ("--batch-size", "-1", "--batch-size"),
     ("--guidance", "-1", "--guidance")],
)
def test_cli_generate_bad_option(tmp_path, option, value, named):
    arguments = ["generate", "--workdir", str(tmp_path), "--out", str(tmp_path / "out"), "--per-cluster", "2"]
    result = CliRunner().invoke(cli, arguments + [option, value])
    assert result.exit_code == 2
    assert named in result.output


def test_cli_help_names_default_sampler():
    # The help text names the default without importing augsvhn.generation (and torch) at CLI start-up.
    result = CliRunner().invoke(cli, ["generate", "--help"])
    assert result.exit_code == 0
    assert f"[default: {generation.DEFAULT_SAMPLER}," in " ".join(result.output.split())
    from augsvhn.sampling import DEFAULT_STEPS

    for name in ("dpm2m", "heun"):
        assert f"{name} {DEFAULT_STEPS[name]}" in " ".join(result.output.split()), name
    assert f"pc and em {DEFAULT_STEPS['pc']}" in " ".join(result.output.split())
    assert DEFAULT_STEPS["em"] == DEFAULT_STEPS["pc"]
