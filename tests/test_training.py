import json
import math

import numpy as np
import pytest
import scipy.io
import torch
from click.testing import CliRunner

from augsvhn import clusters as clusters_module
from augsvhn import losses
from augsvhn.checkpoints import checkpoint_path, checkpoint_sha256, load_checkpoint
from augsvhn.cli import TRAIN_LOSS_CHOICES, TRAIN_MODEL_SIZES, TRAIN_SDE_CHOICES, cli, train
from augsvhn.data import fingerprint, load_svhn
from augsvhn.errors import AugsvhnError
from augsvhn.fsutil import DirectoryLock
from augsvhn.training import (
    LOG_NAME,
    TrainConfig,
    ema_decay,
    epoch_permutation,
    learning_rate,
    make_train_config,
    read_train_log,
    smooth,
    train_cluster,
    update_ema,
)
from augsvhn.workdir import cluster_model_dir, update_config

SMALL_CLUSTER_SIZE = 40  # cluster 0 of the test workdir: 5 batches of 8 per epoch


def tiny_config(**changes) -> TrainConfig:
    """Settings of a run that takes a second or two on a CPU."""
    values = dict(
        model_size="tiny",
        batch_size=8,
        max_steps=3,
        lr=1e-3,
        lr_warmup_images=16,
        ema_halflife_images=40,
        checkpoint_every=2,
        log_every=2,
        device="cpu",
        samples_per_digit=0,
    )
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def train_split(svhn_root):
    return load_svhn(svhn_root, "train")


@pytest.fixture
def make_workdir(tmp_path, svhn_root, train_split):
    """Return a function that writes a workdir whose cluster 0 contains the first 40 real training digits."""

    def make(name: str = "work"):
        workdir = tmp_path / name
        assignment = np.ones(len(train_split.labels), dtype=np.int64)
        assignment[:SMALL_CLUSTER_SIZE] = 0
        settings = clusters_module.HistogramSettings()
        assignment_record = clusters_module.ClusterAssignment(
            k=2,
            assignment=assignment,
            centroids=np.zeros((2, settings.num_features)),
            mean_colours=np.zeros((2, 3)),
            histogram=settings,
            data_fingerprint=fingerprint(train_split.images),
            svhn_root=str(svhn_root),
            seed=0,
            n_init=1,
            inertia=0.0,
        )
        clusters_module.save_clusters(workdir, assignment_record)
        update_config(workdir, svhn_root=str(svhn_root))
        return workdir

    return make


def run_states(workdir, cluster=0):
    return load_checkpoint(checkpoint_path(cluster_model_dir(workdir, cluster)))


def assert_tensors_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


# ---- pieces with analytic results -----------------------------------------------------------------------------


def test_ema_decay_halves_after_halflife():
    decay = ema_decay(batch_size=100, halflife_images=1000, images_seen=10**9, rampup_ratio=0.05)
    assert decay == pytest.approx(0.5**0.1)
    assert decay**10 == pytest.approx(0.5)


def test_ema_decay_rampup_shortens_halflife():
    # After 1,000 images the half-life is 0.05 * 1000 = 50 images, so a step of 100 images keeps 0.5**2.
    assert ema_decay(100, 1000, 1000, 0.05) == pytest.approx(0.25)
    assert ema_decay(100, 1000, 1000, None) == pytest.approx(0.5**0.1)


def test_update_ema_analytic():
    model = torch.nn.Linear(3, 2)
    ema = torch.nn.Linear(3, 2)
    torch.nn.init.ones_(model.weight)
    torch.nn.init.constant_(model.bias, 2.0)
    torch.nn.init.zeros_(ema.weight)
    torch.nn.init.zeros_(ema.bias)

    update_ema(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, torch.full((2, 3), 0.1))
    update_ema(ema, model, decay=0.9)
    # After n steps towards a constant target, ema = target * (1 - decay**n).
    assert torch.allclose(ema.weight, torch.full((2, 3), 1 - 0.9**2))
    assert torch.allclose(ema.bias, torch.full((2,), 2 * (1 - 0.9**2)))


def test_learning_rate_warmup_is_linear():
    config = tiny_config(lr=1e-3, batch_size=8, lr_warmup_images=32)
    assert learning_rate(config, 0) == pytest.approx(0.25e-3)
    assert learning_rate(config, 8) == pytest.approx(0.5e-3)
    assert learning_rate(config, 24) == pytest.approx(1e-3)
    assert learning_rate(config, 1000) == pytest.approx(1e-3)
    assert learning_rate(tiny_config(lr_warmup_images=0), 0) == pytest.approx(1e-3)


def test_epoch_permutation_reproducible():
    first = epoch_permutation(50, seed=3, epoch=0)
    assert torch.equal(torch.sort(first).values, torch.arange(50))
    assert torch.equal(first, epoch_permutation(50, seed=3, epoch=0))
    assert not torch.equal(first, epoch_permutation(50, seed=3, epoch=1))
    assert not torch.equal(first, epoch_permutation(50, seed=4, epoch=0))


def test_smooth_of_constant_is_constant():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([0.0, 1.0], weight=0.5) == pytest.approx([0.0, 0.5 * 1.0 / (1 - 0.25)])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"max_steps": None, "epochs": None, "max_minutes": None}, "never stops"),
        ({"label_dropout": 1.0}, "label_dropout"),
        ({"sde": "vp", "sigma_max": 10.0}, "VE SDE only"),
    ],
)
def test_invalid_config_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**changes)


# ---- training runs on real digits ----------------------------------------------------------------------------


def test_resume_equals_uninterrupted(make_workdir):
    straight = make_workdir("straight")
    resumed = make_workdir("resumed")

    # 6 steps of 8 images cross the boundary of the 5-batch epoch. Dropout draws from torch's global generator,
    # label dropout and the loss from the run's own generator, so both states must be restored.
    settings = dict(checkpoint_every=100, dropout=0.1, label_dropout=0.25)
    train_cluster(straight, 0, tiny_config(max_steps=6, **settings), progress=False)
    first = train_cluster(resumed, 0, tiny_config(max_steps=3, **settings), progress=False)
    assert first.step == 3
    torch.manual_seed(12345)  # a resumed run must not depend on the generator state of the process
    second = train_cluster(resumed, 0, tiny_config(max_steps=6, **settings), progress=False)
    assert second.step == 6
    assert second.epoch == 1

    expected, actual = run_states(straight), run_states(resumed)
    assert_tensors_equal(expected["model"], actual["model"])
    assert_tensors_equal(expected["ema"], actual["ema"])
    assert torch.equal(expected["rng"]["noise"], actual["rng"]["noise"])
    assert expected["images_seen"] == actual["images_seen"] == 48
    expected_adam = expected["optimizer"]["state"]
    actual_adam = actual["optimizer"]["state"]
    for index in expected_adam:
        assert_tensors_equal(expected_adam[index], actual_adam[index])

    # The resumed log has an extra entry at step 3, where the first run stopped, and equal losses where the
    # logged intervals cover the same steps.
    straight_log = read_train_log(cluster_model_dir(straight, 0))
    resumed_log = read_train_log(cluster_model_dir(resumed, 0))
    assert [entry["step"] for entry in straight_log] == [2, 4, 6]
    assert [entry["step"] for entry in resumed_log] == [2, 3, 4, 6]
    assert resumed_log[0]["loss"] == straight_log[0]["loss"]
    assert resumed_log[-1]["loss"] == straight_log[-1]["loss"]  # steps 5 and 6 in both runs


def test_run_writes_outputs(make_workdir):
    workdir = make_workdir()
    result = train_cluster(workdir, 0, tiny_config(samples_per_digit=1, sample_steps=2), progress=False)
    model_dir = cluster_model_dir(workdir, 0)

    assert result.stop_reason == "max_steps"
    for name in ("checkpoint.pt", "config.json", LOG_NAME, "loss.png", "samples.png"):
        assert (model_dir / name).is_file(), name
    saved_config = json.loads((model_dir / "config.json").read_text())
    assert saved_config["model_size"] == "tiny"
    assert saved_config["max_steps"] == 3

    checkpoint = run_states(workdir)
    assert checkpoint["step"] == 3
    assert checkpoint["cluster"] == 0
    assert sum(checkpoint["label_counts"]) == SMALL_CLUSTER_SIZE
    assert checkpoint["sigma_max"] == pytest.approx(checkpoint["sde"]["sigma_max"])

    entries = read_train_log(model_dir)
    assert [entry["step"] for entry in entries] == [2, 3]
    for entry in entries:
        assert math.isfinite(entry["loss"])
        assert entry["images_per_s"] > 0

    # A second run with the same budget has nothing to do and leaves the checkpoint and samples alone.
    digest = checkpoint_sha256(model_dir / "checkpoint.pt")
    samples_mtime = (model_dir / "samples.png").stat().st_mtime_ns
    again = train_cluster(workdir, 0, tiny_config(samples_per_digit=1, sample_steps=2), progress=False)
    assert again.steps_done == 0
    assert again.step == 3
    assert checkpoint_sha256(model_dir / "checkpoint.pt") == digest
    assert (model_dir / "samples.png").stat().st_mtime_ns == samples_mtime
    assert [entry["step"] for entry in read_train_log(model_dir)] == [2, 3]


def test_default_sigma_max_is_max_pairwise_distance(make_workdir, train_split):
    workdir = make_workdir()
    train_cluster(workdir, 0, tiny_config(max_steps=1), progress=False)
    images = train_split.images[:SMALL_CLUSTER_SIZE].astype(np.float64) / 127.5 - 1.0
    flat = images.reshape(SMALL_CLUSTER_SIZE, -1)  # (N, 3072)
    distances = np.sqrt(((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=-1))  # (N, N)
    assert run_states(workdir)["sigma_max"] == pytest.approx(distances.max(), rel=1e-5)


def test_non_finite_loss_keeps_last_checkpoint(make_workdir, monkeypatch):
    workdir = make_workdir()
    real_get_loss = losses.get_loss
    calls = []

    def get_loss_with_nan_at_step_4(name, sde, **params):
        loss_fn = real_get_loss(name, sde, **params)

        def loss_with_nan(denoiser, x0, labels, generator=None):
            values = loss_fn(denoiser, x0, labels, generator=generator)
            calls.append(1)
            return values * float("nan") if len(calls) == 4 else values

        loss_with_nan.config = loss_fn.config
        return loss_with_nan

    monkeypatch.setattr("augsvhn.training.get_loss", get_loss_with_nan_at_step_4)
    with pytest.raises(AugsvhnError, match="loss is nan .* at step 4; the last good checkpoint \\(step 2\\)") as error:
        train_cluster(workdir, 0, tiny_config(max_steps=10, checkpoint_every=2), progress=False)
    assert "train again with a lower --lr" in str(error.value)

    checkpoint = run_states(workdir)
    assert checkpoint["step"] == 2
    for name in ("model", "ema"):
        for key, tensor in checkpoint[name].items():
            assert torch.isfinite(tensor).all(), (name, key)
    # The lock is released on the error, so the run can go on.
    monkeypatch.undo()
    assert train_cluster(workdir, 0, tiny_config(max_steps=3), progress=False).step == 3


@pytest.mark.parametrize(
    ("budget", "steps", "reason"),
    [
        ({"max_steps": None, "epochs": 1}, SMALL_CLUSTER_SIZE // 8, "epochs"),
        ({"max_steps": 4, "epochs": 1}, 4, "max_steps"),
        ({"max_steps": None, "max_minutes": 1e-9}, 1, "max_minutes"),
    ],
)
def test_budget_stops_training(make_workdir, budget, steps, reason):
    workdir = make_workdir()
    result = train_cluster(workdir, 0, tiny_config(**budget), progress=False)
    assert result.step == steps
    assert result.stop_reason == reason
    assert run_states(workdir)["step"] == steps


@pytest.mark.parametrize(("bf16", "channels_last"), [(True, False), (False, True)])
def test_bf16_and_channels_last_train(make_workdir, bf16, channels_last):
    workdir = make_workdir()
    result = train_cluster(workdir, 0, tiny_config(max_steps=2, bf16=bf16, channels_last=channels_last),
                           progress=False)
    assert math.isfinite(result.last_loss)
    for tensor in run_states(workdir)["ema"].values():
        assert tensor.dtype in (torch.float32, torch.int64)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_size": "small"}, "model size 'tiny' \\(requested 'small'\\)"),
        ({"sde": "vp"}, "sde name 've' \\(requested 'vp'\\)"),
        ({"lr": 5e-4}, "train config lr 0.001 \\(requested 0.0005\\)"),
    ],
)
def test_resume_with_other_settings_rejected(make_workdir, changes, message):
    workdir = make_workdir()
    train_cluster(workdir, 0, tiny_config(max_steps=1), progress=False)
    with pytest.raises(AugsvhnError, match=message):
        train_cluster(workdir, 0, tiny_config(max_steps=2, **changes), progress=False)
    assert run_states(workdir)["step"] == 1


def test_resume_with_other_version_rejected(make_workdir, monkeypatch):
    workdir = make_workdir()
    train_cluster(workdir, 0, tiny_config(max_steps=1), progress=False)
    monkeypatch.setattr("augsvhn.training.__version__", "99.0")
    with pytest.raises(AugsvhnError, match="augsvhn version '.*' \\(requested '99.0'\\)"):
        train_cluster(workdir, 0, tiny_config(max_steps=2), progress=False)


def test_locked_folder_rejected(make_workdir):
    workdir = make_workdir()
    with DirectoryLock(cluster_model_dir(workdir, 0), "test"):
        with pytest.raises(AugsvhnError, match="in use by another augsvhn run"):
            train_cluster(workdir, 0, tiny_config(max_steps=1), progress=False)


def test_make_train_config_reuses_saved(make_workdir):
    workdir = make_workdir()
    train_cluster(workdir, 0, tiny_config(max_steps=1, batch_size=4), progress=False)
    config = make_train_config(cluster_model_dir(workdir, 0), max_steps=5)
    assert config.batch_size == 4
    assert config.model_size == "tiny"
    assert config.max_steps == 5


# ---- command line --------------------------------------------------------------------------------------------


def test_cli_trains_and_resumes(make_workdir, svhn_root):
    workdir = make_workdir()
    runner = CliRunner()
    first = runner.invoke(
        cli,
        ["train", "--workdir", str(workdir), "--svhn-root", str(svhn_root), "--cluster", "0", "--model-size", "tiny",
         "--batch-size", "4", "--max-steps", "2", "--device", "cpu", "--samples-per-digit", "0", "--lr", "0.001"],
    )
    assert first.exit_code == 0, first.output
    assert "cluster 0: step 2 (max_steps)" in first.output

    # Only the budget changes; the other settings come from the run's config.json.
    second = runner.invoke(cli, ["train", "--workdir", str(workdir), "--cluster", "0", "--max-steps", "3"])
    assert second.exit_code == 0, second.output
    checkpoint = run_states(workdir)
    assert checkpoint["step"] == 3
    assert checkpoint["model_size"] == "tiny"
    assert checkpoint["train_config"]["batch_size"] == 4

    third = runner.invoke(cli, ["train", "--workdir", str(workdir), "--cluster", "0", "--model-size", "small"])
    assert third.exit_code == 1
    assert "Error: checkpoint" in third.output
    assert "model size 'tiny' (requested 'small')" in third.output
    assert "Traceback" not in third.output


def test_cli_rejects_unknown_cluster(make_workdir):
    workdir = make_workdir()
    result = CliRunner().invoke(cli, ["train", "--workdir", str(workdir), "--cluster", "7"])
    assert result.exit_code == 2
    assert "cluster '7' does not exist" in result.output
    assert "choose one of all, 0, 1" in result.output
    assert not (workdir / "models").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_gpu_fails(make_workdir):
    workdir = make_workdir()
    result = CliRunner().invoke(cli, ["train", "--workdir", str(workdir), "--cluster", "0", "--device", "cuda"])
    assert result.exit_code == 1
    assert "no CUDA device" in result.output


def test_cli_other_svhn_data_fails(make_workdir, tmp_path, train_split):
    workdir = make_workdir()
    other_root = tmp_path / "other-svhn"
    other_root.mkdir()
    images = train_split.images[:20]  # (20, 32, 32, 3)
    labels = np.where(train_split.labels[:20] == 0, 10, train_split.labels[:20])
    scipy.io.savemat(other_root / "train_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": labels[:, None]})

    result = CliRunner().invoke(cli, ["train", "--workdir", str(workdir), "--svhn-root", str(other_root),
                                      "--cluster", "0", "--model-size", "tiny", "--max-steps", "1"])
    assert result.exit_code == 1
    assert "clusters file made from other data" in result.output
    assert not (cluster_model_dir(workdir, 0) / "checkpoint.pt").exists()


def test_cli_without_clusters_fails(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--workdir", str(tmp_path / "empty")])
    assert result.exit_code == 1
    assert "augsvhn cluster" in result.output


def test_cli_choices_match_modules():
    from augsvhn.losses import LOSS_NAMES
    from augsvhn.models import MODEL_SIZES
    from augsvhn.sde import SDE_NAMES

    assert TRAIN_SDE_CHOICES == SDE_NAMES
    assert set(TRAIN_LOSS_CHOICES) == set(LOSS_NAMES)
    assert TRAIN_MODEL_SIZES == tuple(MODEL_SIZES)


def test_cli_help_states_config_defaults():
    defaults = TrainConfig()
    helps = {param.name: param.help for param in train.params}
    for option in ("sde", "loss", "model_size", "max_steps", "batch_size", "lr", "label_dropout", "seed",
                   "checkpoint_every", "log_every", "samples_per_digit"):
        assert f"else {getattr(defaults, option)}]" in helps[option], option

