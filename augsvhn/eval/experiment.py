"""The `eval-classifier` experiment: four training arms x K seeds, scored on every test slice, with resume.

Layout of the report folder REPORT_DIR:

    settings.json                        the settings that fix the results; a rerun must match them
    runs/<arm>-seed<s>/checkpoint.pt     model weights and settings (loadable with torch.load(weights_only=True))
    runs/<arm>-seed<s>/predictions.npz   predicted digits per slice; written last, so it marks the run finished
    slices/<name>.png                    a grid of digits of each slice
    report.json, report.md, accuracy.png, per_class.json, confusion_<arm>.png

A rerun after an interruption skips every (arm, seed) whose predictions file exists.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from augsvhn import __version__
from augsvhn.data import fingerprint, load_svhn
from augsvhn.errors import AugsvhnError, DataError
from augsvhn.eval import classifier, report, slices
from augsvhn.fsutil import DirectoryLock, atomic_path, atomic_write_json, remove_temporary_files
from augsvhn.plots import save_image_grid
from augsvhn.shards import MANIFEST_NAME, file_sha256, read_manifest, read_shard

logger = logging.getLogger("augsvhn.eval.experiment")

SETTINGS_NAME = "settings.json"
# Settings that may change between a run and its resumption without changing any finished result.
RESUMABLE_KEYS = ("seeds", "device", "augsvhn_version")
DEFAULT_EPOCHS = 15.0
DEFAULT_BATCH_SIZE = 128
DEFAULT_SEEDS = 3
DEFAULT_SYNTHETIC_FRACTION = 0.5


@dataclass
class ExperimentSettings:
    """Settings of one eval-classifier experiment, written to REPORT_DIR/settings.json."""

    model: str
    stem_adaptation: str
    steps: int
    epochs: float | None  # the --epochs that set `steps`, or None when --max-steps did
    batch_size: int
    synthetic_fraction: float
    seeds: int
    device: str
    bf16: bool
    clusters: list[int] | None  # synthetic clusters used; None = all
    synthetic_images: int
    test_digits: int  # real test digits scored (all of them unless test_limit was given)
    shards_manifest_sha256: str
    svhn_train_sha256: str
    svhn_test_sha256: str
    augsvhn_version: str
    optimiser: str
    augmentation: str


def load_synthetic(shards_dir: str | Path, clusters: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Read the synthetic digits of a finished shards folder, optionally only those of some clusters.

    Each shard's SHA-256 is checked against the manifest. Returns images uint8 (N, 32, 32, 3), labels int64 (N,)
    and the SHA-256 of manifest.json. Raises DataError for a missing, altered or empty selection.
    """
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    entries = manifest["shards"]
    available = sorted({entry["cluster"] for entry in entries})
    if clusters is not None:
        unknown = sorted(set(clusters) - set(available))
        if unknown:
            raise DataError(f"clusters {unknown} have no shards in {shards_dir}; available clusters: {available}")
        entries = [entry for entry in entries if entry["cluster"] in clusters]
    if not entries:
        raise DataError(f"{shards_dir} lists no shards; generate some with `augsvhn generate`")

    images, labels = [], []
    for entry in entries:
        path = shards_dir / entry["path"]
        if not path.is_file():
            raise DataError(f"shard {path} listed in the manifest is missing")
        if file_sha256(path) != entry["sha256"]:
            raise DataError(f"shard {path} does not match its SHA-256 in the manifest; run `augsvhn verify`")
        shard = read_shard(path)
        images.append(shard.images)
        labels.append(shard.labels.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels), file_sha256(shards_dir / MANIFEST_NAME)


def check_settings(out_dir: Path, settings: ExperimentSettings) -> None:
    """Write settings.json, or check that an existing one matches; raise AugsvhnError naming the differences."""
    path = out_dir / SETTINGS_NAME
    current = asdict(settings)
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise AugsvhnError(f"cannot read {path}: {error}; delete it or choose another --out") from error
        differences = [
            f"{key}: {saved.get(key)!r} in the folder, {value!r} now"
            for key, value in current.items()
            if key not in RESUMABLE_KEYS and saved.get(key) != value
        ]
        if differences:
            raise AugsvhnError(
                f"{out_dir} contains results of other settings ({'; '.join(differences)}); "
                "rerun with the same settings to resume, or choose another --out"
            )
    atomic_write_json(path, current)


def run_directory(out_dir: Path, arm: str, seed: int) -> Path:
    return out_dir / "runs" / f"{arm}-seed{seed}"


def save_run(
    run_dir: Path, model: torch.nn.Module, settings: ExperimentSettings, arm: str, seed: int, predictions: dict
) -> None:
    """Write the checkpoint, then the predictions file that marks the run finished, both atomically."""
    checkpoint = {
        "model_state": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "arm": arm,
        "seed": seed,
        "settings_json": json.dumps(asdict(settings), sort_keys=True),
    }
    with atomic_path(run_dir / "checkpoint.pt") as temporary:
        with open(temporary, "wb") as file:
            torch.save(checkpoint, file)
    buffer = io.BytesIO()
    np.savez(buffer, **{name: values.astype(np.int8) for name, values in predictions.items()})
    with atomic_path(run_dir / "predictions.npz") as temporary:
        temporary.write_bytes(buffer.getvalue())


def load_predictions(run_dir: Path, slice_names: list[str]) -> dict[str, np.ndarray] | None:
    """Return the saved predictions of a finished run, or None when the run has not finished."""
    path = run_dir / "predictions.npz"
    if not path.is_file():
        return None
    with np.load(path) as saved:
        missing = [name for name in slice_names if name not in saved.files]
        if missing:
            raise AugsvhnError(f"{path} lacks the slices {missing}; delete {run_dir} to retrain that run")
        return {name: saved[name].astype(np.int64) for name in slice_names}


def run_experiment(
    svhn_root: str | Path,
    shards_dir: str | Path,
    out_dir: str | Path,
    model: str = "resnet18",
    synthetic_fraction: float = DEFAULT_SYNTHETIC_FRACTION,
    epochs: float | None = None,
    max_steps: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seeds: int = DEFAULT_SEEDS,
    device: str = "auto",
    clusters: list[int] | None = None,
    test_limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Train and score every (arm, seed), skipping finished ones, then write the report. Returns report.json's dict.

    `epochs` counts passes over the real train digits and sets the number of optimiser steps, the same for every
    arm. `max_steps` sets that number directly. Give at most one of them; with neither, DEFAULT_EPOCHS applies.
    `test_limit` scores only the first that many test digits, for quick checks, and slice thresholds are then
    quantiles over those digits.
    """
    if epochs is not None and max_steps is not None:
        raise ValueError("give either epochs or max_steps, not both")
    if not 0.0 < synthetic_fraction < 1.0:
        raise ValueError(f"synthetic fraction must be in (0, 1), got {synthetic_fraction}")
    if seeds < 1 or batch_size < 2:
        raise ValueError(f"need seeds >= 1 and batch size >= 2, got {seeds} and {batch_size}")
    out_dir = Path(out_dir)
    device = classifier.resolve_device(device)
    _, stem = classifier.build_classifier(model)

    train = load_svhn(svhn_root, "train")
    test = load_svhn(svhn_root, "test")
    test_images, test_labels = test.images[:test_limit], test.labels[:test_limit]
    synthetic_images, synthetic_labels, manifest_sha256 = load_synthetic(shards_dir, clusters)
    if epochs is None and max_steps is None:
        epochs = DEFAULT_EPOCHS
    steps = max_steps if max_steps is not None else classifier.steps_for_epochs(epochs, len(train), batch_size)
    bf16 = classifier.bf16_helps(device)
    settings = ExperimentSettings(
        model=model,
        stem_adaptation=stem,
        steps=int(steps),
        epochs=epochs,
        batch_size=batch_size,
        synthetic_fraction=synthetic_fraction,
        seeds=seeds,
        device=device,
        bf16=bf16,
        clusters=sorted(clusters) if clusters is not None else None,
        synthetic_images=int(len(synthetic_labels)),
        test_digits=int(len(test_labels)),
        shards_manifest_sha256=manifest_sha256,
        svhn_train_sha256=fingerprint(train.images),
        svhn_test_sha256=fingerprint(test_images),
        augsvhn_version=__version__,
        optimiser=(
            f"SGD (Nesterov momentum {classifier.MOMENTUM}, weight decay {classifier.WEIGHT_DECAY}), one-cycle "
            f"schedule with peak learning rate {classifier.LEARNING_RATE} x batch/128, "
            f"{classifier.WARMUP_FRACTION:.0%} warm-up"
        ),
        augmentation="all arms: random crop (2 px reflect padding) and colour jitter (+-20%), no flips; "
        "classic_augmentation adds Gaussian blur (p 0.5, sigma 0.3-2 px), brightness, contrast and gamma changes",
    )

    with DirectoryLock(out_dir, "eval-classifier"):
        remove_temporary_files(out_dir)
        check_settings(out_dir, settings)
        test_slices = slices.build_slices(test_images, test_labels)
        slice_names = [test_slice.name for test_slice in test_slices]
        for test_slice in test_slices:
            path = out_dir / "slices" / f"{test_slice.name}.png"
            if not path.is_file():
                title = f"{test_slice.name}: {test_slice.description}"
                save_image_grid(test_slice.images[:64], path, 4, suptitle=title)

        training = classifier.TrainingSettings(model, int(steps), batch_size, synthetic_fraction, device, bf16)
        real = (train.images, train.labels)
        synthetic = (synthetic_images, synthetic_labels)
        predictions: dict[str, dict[int, dict[str, np.ndarray]]] = {arm: {} for arm in classifier.ARMS}
        for seed in range(seeds):
            for arm in classifier.ARMS:
                run_dir = run_directory(out_dir, arm, seed)
                finished = load_predictions(run_dir, slice_names)
                if finished is not None:
                    logger.info("skipping %s seed %d: finished in %s", arm, seed, run_dir)
                    predictions[arm][seed] = finished
                    continue
                remove_temporary_files(run_dir)  # left by an interrupted earlier attempt at this run
                model_trained = classifier.train_classifier(arm, seed, training, real, synthetic, progress)
                result = {s.name: classifier.predict(model_trained, s.images, device, bf16) for s in test_slices}
                save_run(run_dir, model_trained, settings, arm, seed, result)
                predictions[arm][seed] = result

        report_data = report.build_report(asdict(settings), test_slices, predictions)
        report.write_report(out_dir, report_data, test_slices, predictions)
    return report_data
