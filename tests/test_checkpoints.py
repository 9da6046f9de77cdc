import hashlib
import os

import pytest
import torch

from augsvhn import __version__
from augsvhn.checkpoints import (
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    REQUIRED_KEYS,
    check_checkpoint_matches,
    checkpoint_sha256,
    load_checkpoint,
    load_for_sampling,
    save_checkpoint,
)
from augsvhn.errors import AugsvhnError, DataError
from augsvhn.models import build_denoiser
from augsvhn.sde import get_sde


def make_checkpoint(step: int = 7) -> dict:
    """Return a complete checkpoint of a tiny denoiser whose EMA differs from the trained weights."""
    torch.manual_seed(0)
    model = build_denoiser("tiny")
    ema = build_denoiser("tiny")
    with torch.no_grad():
        for parameter in ema.parameters():
            parameter.add_(0.25)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32), torch.ones(2), torch.tensor([1, 10])).square().mean().backward()
    optimizer.step()
    sde = get_sde("ve", sigma_max=42.0)
    return {
        "format_version": FORMAT_VERSION,
        "augsvhn_version": __version__,
        "model_size": "tiny",
        "denoiser": model.config(),
        "sde": sde.config(),
        "loss": {"name": "edm", "p_mean": -1.2, "p_std": 1.2},
        "train_config": {"batch_size": 2, "lr": 1e-3, "adam_betas": [0.9, 0.999], "sigma_max": None},
        "cluster": 1,
        "data_fingerprint": "ab" * 32,
        "label_counts": [3, 1, 4, 1, 5, 9, 2, 6, 5, 3],
        "sigma_max": 42.0,
        "step": step,
        "epoch": 1,
        "images_seen": 2 * step,
        "elapsed_s": 1.5,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "noise": torch.Generator().manual_seed(5).get_state()},
    }


def assert_state_dicts_equal(saved: dict, loaded: dict) -> None:
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key].cpu(), loaded[key].cpu()), key


def test_round_trip_keeps_everything(tmp_path):
    checkpoint = make_checkpoint()
    path = save_checkpoint(tmp_path / CHECKPOINT_NAME, checkpoint)
    loaded = load_checkpoint(path)

    assert set(loaded) == set(REQUIRED_KEYS)
    assert_state_dicts_equal(checkpoint["model"], loaded["model"])
    assert_state_dicts_equal(checkpoint["ema"], loaded["ema"])
    assert loaded["optimizer"]["param_groups"] == checkpoint["optimizer"]["param_groups"]
    first_state = checkpoint["optimizer"]["state"][0]
    for name, value in first_state.items():
        assert torch.equal(value, loaded["optimizer"]["state"][0][name]), name
    assert torch.equal(loaded["rng"]["torch"], checkpoint["rng"]["torch"])
    assert torch.equal(loaded["rng"]["noise"], checkpoint["rng"]["noise"])
    for key in ("sde", "denoiser", "loss", "train_config", "label_counts", "step", "cluster", "sigma_max"):
        assert loaded[key] == checkpoint[key], key
    assert os.listdir(tmp_path) == [CHECKPOINT_NAME]


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / CHECKPOINT_NAME, make_checkpoint(step=3))
    digest_before = checkpoint_sha256(path)

    def save_half_then_fail(obj, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, make_checkpoint(step=4))

    assert checkpoint_sha256(path) == digest_before
    assert os.listdir(tmp_path) == [CHECKPOINT_NAME]
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 3


class RunsCodeWhenUnpickled:
    """An object whose unpickling creates a folder, standing in for a malicious payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_code_rejected(tmp_path):
    marker = tmp_path / "created-by-unpickling"
    path = tmp_path / CHECKPOINT_NAME
    checkpoint = make_checkpoint()
    checkpoint["rng"]["payload"] = RunsCodeWhenUnpickled(marker)
    torch.save(checkpoint, path)

    with pytest.raises(DataError, match="rejected because unpickling them could run code"):
        load_checkpoint(path)
    assert not marker.exists()

    # The same file does run code under a full unpickler, so the check above can fail.
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def test_truncated_file_rejected(tmp_path):
    path = save_checkpoint(tmp_path / CHECKPOINT_NAME, make_checkpoint())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="unreadable or truncated"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"junk\n", "unreadable or truncated"),
        (b"", "unreadable or truncated"),
        (b"PK\x03\x04" + b"\x00" * 60, "unreadable or truncated"),
        # Random bytes parse as pickle opcodes that the weights-only unpickler rejects.
        (bytes(range(256)) * 4, "rejected because unpickling them could run code"),
    ],
)
def test_non_checkpoint_bytes_rejected(tmp_path, content, message):
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_checkpoint(path)


def test_missing_file_rejected(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_checkpoint(tmp_path / CHECKPOINT_NAME)


def test_other_format_version_rejected(tmp_path):
    checkpoint = make_checkpoint()
    checkpoint["format_version"] = FORMAT_VERSION + 1
    path = save_checkpoint(tmp_path / CHECKPOINT_NAME, checkpoint)
    with pytest.raises(DataError, match=f"format version {FORMAT_VERSION + 1}"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("setting", "requested", "message"),
    [
        ("model_size", "small", "model size 'tiny' \\(requested 'small'\\)"),
        ("sde", get_sde("vp").config(), "sde name 've' \\(requested 'vp'\\)"),
        ("sde", get_sde("ve", sigma_max=43.0).config(), "sde sigma_max 42.0 \\(requested 43.0\\)"),
        ("augsvhn_version", "0.0.1", f"augsvhn version '{__version__}' \\(requested '0.0.1'\\)"),
    ],
)
def test_mismatched_setting_rejected(setting, requested, message):
    checkpoint = make_checkpoint()
    with pytest.raises(AugsvhnError, match=message):
        check_checkpoint_matches(checkpoint, "run/checkpoint.pt", **{setting: requested})


def test_matching_settings_accepted():
    checkpoint = make_checkpoint()
    check_checkpoint_matches(
        checkpoint,
        "run/checkpoint.pt",
        model_size="tiny",
        sde=get_sde("ve", sigma_max=42.0 * (1 + 1e-12)).config(),
        augsvhn_version=__version__,
    )


def test_load_for_sampling_returns_ema(tmp_path):
    checkpoint = make_checkpoint()
    save_checkpoint(tmp_path / CHECKPOINT_NAME, checkpoint)
    denoiser, sde, meta = load_for_sampling(tmp_path, "cpu")

    assert not denoiser.training
    assert not any(parameter.requires_grad for parameter in denoiser.parameters())
    assert_state_dicts_equal(checkpoint["ema"], denoiser.state_dict())
    assert sde.config() == checkpoint["sde"]
    assert meta["label_counts"] == checkpoint["label_counts"]
    assert meta["checkpoint_path"] == str(tmp_path / CHECKPOINT_NAME)
    for state_key in ("model", "ema", "optimizer", "rng"):
        assert state_key not in meta


def test_load_for_sampling_rejects_other_version(tmp_path):
    checkpoint = make_checkpoint()
    checkpoint["augsvhn_version"] = "0.0.1"
    save_checkpoint(tmp_path / CHECKPOINT_NAME, checkpoint)
    with pytest.raises(AugsvhnError, match="augsvhn version '0.0.1'"):
        load_for_sampling(tmp_path, "cpu")


def test_sha256_of_file_bytes(tmp_path):
    path = save_checkpoint(tmp_path / CHECKPOINT_NAME, make_checkpoint())
    assert checkpoint_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
