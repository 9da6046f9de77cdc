"""Training checkpoints: atomic save, safe load, setting checks and loading the EMA denoiser for sampling.

A checkpoint is one `torch.save` file containing only tensors, numbers, strings and plain containers, so it is read
with `torch.load(weights_only=True)`: PyTorch's restricted unpickler rejects any other Python object, and loading
a checkpoint therefore runs no code from the file.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
from pathlib import Path
from typing import Any

import torch

from augsvhn import __version__
from augsvhn.errors import AugsvhnError, DataError
from augsvhn.fsutil import atomic_path

logger = logging.getLogger("augsvhn.checkpoints")

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"

# Keys every checkpoint written by `augsvhn train` contains.
REQUIRED_KEYS = (
    "format_version",  # int, layout of this dictionary; FORMAT_VERSION when written
    "augsvhn_version",  # str, package version that wrote the file
    "model_size",  # str, key of models.MODEL_SIZES
    "denoiser",  # dict, Denoiser.config()
    "sde",  # dict, SDE.config(), includes "name"
    "loss",  # dict, {"name": ..., **loss parameters}
    "train_config",  # dict, TrainConfig as JSON-able values
    "cluster",  # int, cluster index the model was trained on
    "data_fingerprint",  # str, fingerprint of the training images of the whole split
    "label_counts",  # list of 10 ints, digits 0-9 among the cluster's training images
    "sigma_max",  # float, largest noise level of the SDE in VE scaling
    "step",  # int, optimiser steps done
    "epoch",  # int, epoch of the next step
    "images_seen",  # int, training images seen so far
    "elapsed_s",  # float, training time over all runs, in seconds
    "model",  # state dict of the trained denoiser
    "ema",  # state dict of the exponential moving average of the denoiser
    "optimizer",  # optimiser state dict
    "rng",  # dict of random generator states
)

# Keys that are not part of the metadata returned by `load_for_sampling`.
_STATE_KEYS = ("model", "ema", "optimizer", "rng")


def checkpoint_path(model_dir: str | Path) -> Path:
    """Return the path of the latest checkpoint in a training folder."""
    return Path(model_dir) / CHECKPOINT_NAME


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> Path:
    """Write `checkpoint` to `path` atomically: the file appears under its final name only when complete.

    The dictionary must contain every key of REQUIRED_KEYS. Returns the path written.
    """
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    assert not missing, f"checkpoint lacks keys {missing}"
    path = Path(path)
    with atomic_path(path) as temporary_path:
        with open(temporary_path, "wb") as file:
            writer = _WriteErrorRecorder(file)
            try:
                torch.save(checkpoint, writer)
            except RuntimeError as error:
                # torch.save reports a failed write (a full disk, for example) as a RuntimeError without errno.
                # Raise the OSError of the write instead, which atomic_path turns into an error naming the path.
                if writer.error is not None:
                    raise writer.error from error
                raise
    logger.debug("saved checkpoint %s at step %d", path, checkpoint["step"])
    return path


class _WriteErrorRecorder:
    """File wrapper that keeps the OSError of a failed write, which torch.save would replace by a RuntimeError."""

    def __init__(self, file):
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU with `torch.load(weights_only=True)` and check its format version.

    Raises DataError when the file is missing, unreadable, contains Python objects other than tensors and plain
    containers, or has another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} not found; train the cluster first with `augsvhn train`")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise DataError(
            f"checkpoint {path} contains Python objects other than tensors and plain containers, so it was "
            f"rejected because unpickling them could run code. Load only checkpoints written by `augsvhn train` "
            f"({error.__class__.__name__}: {str(error).splitlines()[0]})"
        ) from error
    # Bytes that are not a ZIP archive go to PyTorch's legacy reader, which fails with KeyError, IndexError or
    # TypeError on text and random data (torch 2.x), so these count as unreadable files too.
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
        raise DataError(
            f"checkpoint {path} is unreadable or truncated ({error.__class__.__name__}: {error}); pass a "
            f"checkpoint.pt written by `augsvhn train`, or train the cluster again"
        ) from error
    if not isinstance(checkpoint, dict):
        raise DataError(f"checkpoint {path} contains a {type(checkpoint).__name__}, expected a dictionary")
    format_version = checkpoint.get("format_version")
    if format_version != FORMAT_VERSION:
        raise DataError(
            f"checkpoint {path} has format version {format_version!r}, but this augsvhn reads version "
            f"{FORMAT_VERSION}; train the cluster again"
        )
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise DataError(f"checkpoint {path} lacks the entries {', '.join(missing)}; train the cluster again")
    return checkpoint


def _values_differ(saved: Any, requested: Any) -> bool:
    """Return whether two settings differ. Floats equal up to rounding match, as recomputed sigma_max values do."""
    if isinstance(saved, dict) and isinstance(requested, dict):
        if saved.keys() != requested.keys():
            return True
        return any(_values_differ(saved[key], requested[key]) for key in saved)
    if isinstance(saved, (list, tuple)) and isinstance(requested, (list, tuple)):
        if len(saved) != len(requested):
            return True
        return any(_values_differ(a, b) for a, b in zip(saved, requested))
    both_numbers = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in (saved, requested))
    if both_numbers:
        return not math.isclose(saved, requested, rel_tol=1e-9, abs_tol=1e-12)
    return saved != requested


def check_checkpoint_matches(checkpoint: dict[str, Any], path: str | Path, **requested: Any) -> None:
    """Raise AugsvhnError when a checkpoint was made with other settings than the requested ones.

    Each keyword names a checkpoint entry (such as `model_size`, `sde`, `loss`, `augsvhn_version`) and gives the
    requested value. The message names every differing setting with its saved and requested value.
    """
    differences = []
    for key, value in requested.items():
        saved = checkpoint.get(key)
        name = key.replace("_", " ")
        if isinstance(saved, dict) and isinstance(value, dict):
            # Name only the entries of a settings dictionary (SDE, loss, training) that differ.
            for entry in sorted(set(saved) | set(value)):
                if _values_differ(saved.get(entry), value.get(entry)):
                    differences.append(f"{name} {entry} {saved.get(entry)!r} (requested {value.get(entry)!r})")
        elif _values_differ(saved, value):
            differences.append(f"{name} {saved!r} (requested {value!r})")
    if differences:
        raise AugsvhnError(
            f"checkpoint {path} was made with other settings: {'; '.join(differences)}. "
            f"Use the settings of the checkpoint, or train in a new workdir or after removing {Path(path).parent}"
        )


def checkpoint_metadata(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Return the settings and counters of a checkpoint without its state dicts and random generator states."""
    return {key: value for key, value in checkpoint.items() if key not in _STATE_KEYS}


def load_for_sampling(model_dir: str | Path, device: str | torch.device = "cpu"):
    """Load the EMA denoiser of a training folder for sampling.

    Returns `(ema_denoiser, sde, meta)`: the EMA weights in a Denoiser in eval mode on `device`, the SDE it was
    trained with, and the checkpoint metadata (settings, step, cluster, label counts, sigma_max) plus the entry
    `checkpoint_path`. Raises AugsvhnError when the checkpoint was written by another augsvhn version.
    """
    from augsvhn.models import denoiser_from_config
    from augsvhn.sde import sde_from_config

    path = checkpoint_path(model_dir)
    checkpoint = load_checkpoint(path)
    check_checkpoint_matches(checkpoint, path, augsvhn_version=__version__)

    try:
        ema_denoiser = denoiser_from_config(checkpoint["denoiser"])
        ema_denoiser.load_state_dict(checkpoint["ema"])
        sde = sde_from_config(checkpoint["sde"])
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"checkpoint {path}: the EMA weights or the model and SDE settings do not fit together ({first_line}); "
            f"train the cluster again"
        ) from error
    ema_denoiser.requires_grad_(False)
    ema_denoiser.eval().to(device)

    meta = checkpoint_metadata(checkpoint)
    meta["checkpoint_path"] = str(path)
    return ema_denoiser, sde, meta


def checkpoint_sha256(path: str | Path) -> str:
    """Return the SHA-256 hex digest of a checkpoint file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
