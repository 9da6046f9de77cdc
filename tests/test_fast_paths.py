"""Fast paths of sampling and training (bfloat16 autocast, channels-last, batch size "auto") keep the results."""

import numpy as np
import pytest
import torch

from augsvhn.data import load_svhn
from augsvhn.losses import get_loss
from augsvhn.models import build_denoiser
from augsvhn.sampling import (
    CPU_AUTO_BATCH_SIZE,
    cpu_has_bf16_instructions,
    default_bf16,
    get_sampler,
    prepare_denoiser,
    resolve_batch_size,
)
from augsvhn.sde import get_sde


def perturbed_tiny_denoiser(seed=0):
    """A tiny denoiser whose zero-initialised output layers are perturbed, so that the network is not the identity."""
    torch.manual_seed(seed)
    denoiser = build_denoiser("tiny").eval()
    with torch.no_grad():
        for parameter in denoiser.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return denoiser


def sample(denoiser, batch_size=32, sampler="heun", **options):
    labels = torch.arange(10)
    return get_sampler(sampler)(denoiser, get_sde("ve", sigma_max=20.0), labels,
                                generator=torch.Generator().manual_seed(7), steps=3, guidance=1.0,
                                batch_size=batch_size, **options).images


def test_bf16_samples_close_to_float32():
    denoiser = perturbed_tiny_denoiser()
    reference = sample(denoiser)
    bf16 = sample(denoiser, bf16=True)
    difference = (bf16 - reference).abs()
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9): the pixels move by a few levels of 255 at most.
    assert difference.mean().item() < 0.01
    assert difference.max().item() < 0.1
    assert not torch.equal(bf16, reference)  # autocast did take effect


def test_channels_last_samples_match_float32():
    denoiser = perturbed_tiny_denoiser()
    reference = sample(denoiser)
    fast = sample(prepare_denoiser(perturbed_tiny_denoiser(), channels_last=True), channels_last=True)
    assert (fast - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("sampler", ["heun", "em"])
def test_bf16_batch_size_cannot_change_result(sampler):
    denoiser = perturbed_tiny_denoiser()
    results = [sample(denoiser, batch_size=size, sampler=sampler, bf16=True) for size in (10, 3)]
    assert torch.equal(results[0], results[1])


def test_auto_batch_size_on_cpu():
    denoiser = perturbed_tiny_denoiser()
    assert resolve_batch_size("auto", denoiser, "cpu") == CPU_AUTO_BATCH_SIZE
    assert resolve_batch_size("48", denoiser, "cpu") == 48
    assert resolve_batch_size(5, denoiser, "cpu") == 5


@pytest.mark.parametrize("value", ["0", "-3", "big", None])
def test_batch_size_rejects_invalid_values(value):
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        resolve_batch_size(value, perturbed_tiny_denoiser(), "cpu")


def test_cpu_bf16_flags_read_from_cpuinfo(tmp_path):
    with_bf16 = tmp_path / "with"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    without = tmp_path / "without"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert cpu_has_bf16_instructions(str(with_bf16))
    assert not cpu_has_bf16_instructions(str(without))
    assert not cpu_has_bf16_instructions(str(tmp_path / "missing"))
    assert default_bf16("cpu") is False


def training_losses(images, labels, bf16, steps=8, batch=12):
    """Per-step EDM losses of a tiny denoiser trained from the same start and the same noise."""
    torch.manual_seed(0)
    denoiser = build_denoiser("tiny")
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-3)
    loss_fn = get_loss("edm", get_sde("ve", sigma_max=60.0))
    generator = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        chunk = slice(step * batch, (step + 1) * batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(denoiser, images[chunk], labels[chunk], generator=generator).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return np.array(losses)


def test_bf16_training_loss_follows_float32(svhn_root):
    split = load_svhn(svhn_root, "train")
    images = torch.from_numpy(split.images[:96]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (96, 3, 32, 32)
    labels = torch.from_numpy(split.labels[:96].astype(np.int64))
    reference = training_losses(images, labels, bf16=False)
    bf16 = training_losses(images, labels, bf16=True)
    assert np.all(np.isfinite(bf16))
    # Same batches and noise: each step's loss differs only by the rounding of the bfloat16 products, far less
    # than the step-to-step spread of the loss caused by the random noise levels.
    assert np.abs(bf16 - reference).max() < 0.1 * reference.std() + 0.02 * reference.mean()
    assert reference[-3:].mean() < reference[:3].mean()  # the loss fell, so the comparison is not of noise alone


@pytest.fixture()
def two_cluster_workdir(tmp_path, svhn_root):
    """A workdir whose cluster 0 contains the first 40 real training digits and cluster 1 the rest."""
    from augsvhn import clusters as clusters_module
    from augsvhn.data import fingerprint
    from augsvhn.workdir import update_config

    split = load_svhn(svhn_root, "train")
    assignment = np.ones(len(split.labels), dtype=np.int64)
    assignment[:40] = 0
    settings = clusters_module.HistogramSettings()
    record = clusters_module.ClusterAssignment(
        k=2, assignment=assignment, centroids=np.zeros((2, settings.num_features)), mean_colours=np.zeros((2, 3)),
        histogram=settings, data_fingerprint=fingerprint(split.images), svhn_root=str(svhn_root), seed=0, n_init=1,
        inertia=0.0,
    )
    clusters_module.save_clusters(tmp_path, record)
    update_config(tmp_path, svhn_root=str(svhn_root))
    return tmp_path


def test_cluster_model_starts_from_pooled(two_cluster_workdir):
    from augsvhn.checkpoints import checkpoint_path, load_checkpoint
    from augsvhn.errors import DataError
    from augsvhn.training import POOLED, TrainConfig, model_dir_of, train_cluster

    settings = dict(model_size="tiny", batch_size=8, max_steps=1, device="cpu", samples_per_digit=0, bf16=False,
                    sigma_max=50.0)
    pooled = train_cluster(two_cluster_workdir, POOLED, TrainConfig(**settings), progress=False)
    assert pooled.model_dir == two_cluster_workdir / "models" / "pooled"
    pooled_ema = load_checkpoint(checkpoint_path(pooled.model_dir))["ema"]

    # With a negligible learning rate, one step leaves the weights where --init-from put them.
    config = TrainConfig(**settings, lr=1e-12, init_from=str(pooled.model_dir))
    tuned = train_cluster(two_cluster_workdir, 0, config, progress=False)
    tuned_model = load_checkpoint(checkpoint_path(tuned.model_dir))["model"]
    for name, tensor in pooled_ema.items():
        assert torch.allclose(tuned_model[name].float(), tensor.float(), atol=1e-6), name
    assert model_dir_of(two_cluster_workdir, 0) == tuned.model_dir

    with pytest.raises(DataError, match="another network"):
        train_cluster(two_cluster_workdir, 1, TrainConfig(**{**settings, "model_size": "small"},
                                                          init_from=str(pooled.model_dir)), progress=False)


@pytest.mark.parametrize("value", ["0", "many"])
def test_generate_rejects_bad_batch_size(tmp_path, value):
    from click.testing import CliRunner

    from augsvhn.cli import cli

    result = CliRunner().invoke(cli, ["generate", "--workdir", str(tmp_path), "--out", str(tmp_path / "out"),
                                      "--per-cluster", "10", "--batch-size", value])
    assert result.exit_code == 2
    assert "neither a positive integer nor auto" in result.output
