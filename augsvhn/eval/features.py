"""A small SVHN digit classifier whose penultimate layer is the feature space of the sample-quality metrics.

Fréchet Inception Distance and its relatives are usually computed in the pool features of an ImageNet
Inception-v3. Those weights cannot be downloaded everywhere this package runs, and ImageNet features say little
about 32 x 32 digits, so the metrics here use `DigitCNN`: a compact convolutional net trained from scratch on the
real SVHN train split, trained once and cached (see `feature_cache_dir`).

Features are the 128 outputs of the penultimate fully connected layer after its ReLU, not L2-normalised, as
the Inception pool features of Heusel et al. (2017) are taken raw. Distances between feature sets are therefore
only comparable between runs that use the same cached network (the same training data and `FeatureNetSettings`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from augsvhn.data import fingerprint
from augsvhn.errors import DataError
from augsvhn.eval.augment import random_crop
from augsvhn.eval.classifier import normalise, to_float_tensor
from augsvhn.fsutil import atomic_path

logger = logging.getLogger("augsvhn.eval.features")

CACHE_ENV = "AUGSVHN_CACHE"
CACHE_FORMAT_VERSION = 1  # raise when DigitCNN or the training loop changes, so that old cache files are ignored
NUM_CLASSES = 10
EVAL_BATCH_SIZE = 512


@dataclass(frozen=True)
class FeatureNetSettings:
    """Architecture and training budget of a `DigitCNN`.

    The budget is counted in optimiser steps, not epochs, so that the Classification Accuracy Score trains every
    synthetic set, whatever its size, with the same compute. 280 steps of 128 digits are 8 passes over the
    4,487-digit train subset of the tests.
    """

    width: int = 16  # channels of the first convolution; later stages use 2x and 4x
    feature_dim: int = 128  # size of the penultimate layer, the feature space of the metrics
    steps: int = 280  # optimiser steps
    batch_size: int = 128
    learning_rate: float = 3e-3  # peak of the one-cycle schedule (AdamW)
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 0  # initial weights, batch order and crop offsets

    def __post_init__(self) -> None:
        for name in ("width", "feature_dim", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DigitCNN(nn.Module):
    """Six 3 x 3 conv-BN-ReLU blocks over 32, 16, 8 and 4 pixels, global average pooling and two linear layers."""

    def __init__(self, width: int = 16, feature_dim: int = 128, num_classes: int = NUM_CLASSES):
        super().__init__()
        w = width
        self.trunk = nn.Sequential(
            _conv_block(3, w),
            nn.MaxPool2d(2),  # 16 x 16
            _conv_block(w, 2 * w),
            _conv_block(2 * w, 2 * w),
            nn.MaxPool2d(2),  # 8 x 8
            _conv_block(2 * w, 4 * w),
            _conv_block(4 * w, 4 * w),
            nn.MaxPool2d(2),  # 4 x 4
            _conv_block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 4w)
        )
        self.penultimate = nn.Sequential(nn.Linear(4 * w, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the penultimate activations (B, feature_dim) of images x (B, 3, 32, 32) in [-1, 1]."""
        return self.penultimate(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_digit_cnn(
    images: np.ndarray,
    labels: np.ndarray,
    settings: FeatureNetSettings = FeatureNetSettings(),
    device: str = "cpu",
    progress: bool = True,
    description: str = "feature net",
) -> DigitCNN:
    """Train a `DigitCNN` from scratch on uint8 images (N, 32, 32, 3) with labels 0-9; return it in eval mode.

    AdamW with a one-cycle learning rate, label smoothing and random 2-pixel crops. All randomness comes from
    `settings.seed`, so the same data and settings give the same network on the same device and thread count.
    """
    labels = np.array(labels, dtype=np.int64)  # a writable copy, because torch.from_numpy warns on read-only arrays
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need as many labels as images and at least one image, got {len(images)} and {len(labels)}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be digits 0-9, got values from {labels.min()} to {labels.max()}")

    torch.manual_seed(settings.seed)
    network = DigitCNN(settings.width, settings.feature_dim).to(device).train()
    generator = torch.Generator().manual_seed(settings.seed)
    x_all = to_float_tensor(images)  # (N, 3, 32, 32) in [0, 1], kept on the CPU
    y_all = torch.from_numpy(labels)

    optimiser = torch.optim.AdamW(network.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=settings.learning_rate, total_steps=settings.steps)
    order, position = torch.randperm(len(y_all), generator=generator), 0
    start = time.perf_counter()
    bar = tqdm(range(settings.steps), desc=description, unit="step", disable=None if progress else True)
    for _ in bar:
        # Batch without replacement within a pass over the data.
        if position + settings.batch_size > len(order):
            order, position = torch.randperm(len(y_all), generator=generator), 0
        index = order[position : position + settings.batch_size]
        position += settings.batch_size
        x = normalise(random_crop(x_all[index], generator)).to(device)

        loss = F.cross_entropy(network(x), y_all[index].to(device), label_smoothing=settings.label_smoothing)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    logger.info("trained %s: %d steps in %.0f s", description, settings.steps, time.perf_counter() - start)
    return network.eval()


@torch.no_grad()
def _batched(network: DigitCNN, images: np.ndarray, device: str, head: bool) -> np.ndarray:
    network.eval()
    outputs = []
    for start in range(0, len(images), EVAL_BATCH_SIZE):
        x = normalise(to_float_tensor(images[start : start + EVAL_BATCH_SIZE])).to(device)
        features = network.features(x)
        outputs.append((network.head(features) if head else features).float().cpu())
    if not outputs:
        width = NUM_CLASSES if head else network.penultimate[0].out_features
        return np.zeros((0, width), dtype=np.float64)
    return torch.cat(outputs).numpy().astype(np.float64)


def predict_digits(network: DigitCNN, images: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Return the predicted digit, int64 (N,), of each uint8 image (N, 32, 32, 3)."""
    return _batched(network, images, device, head=True).argmax(axis=1).astype(np.int64)


def accuracy_of(network: DigitCNN, images: np.ndarray, labels: np.ndarray, device: str = "cpu") -> float:
    """Share of `images` whose predicted digit equals `labels`."""
    return float(np.mean(predict_digits(network, images, device) == np.asarray(labels)))


@dataclass
class FeatureExtractor:
    """A trained `DigitCNN` with its settings, its accuracy on the real test split and where it is cached."""

    network: DigitCNN
    settings: FeatureNetSettings
    test_accuracy: float  # on the real test split passed to `load_or_train_extractor`
    train_seconds: float  # wall-clock time of the training run that made the cached weights
    cache_path: Path | None
    device: str = "cpu"

    @property
    def feature_dim(self) -> int:
        return self.settings.feature_dim

    def features(self, images: np.ndarray) -> np.ndarray:
        """Return the penultimate features, float64 (N, feature_dim), of uint8 images (N, 32, 32, 3)."""
        return _batched(self.network, images, self.device, head=False)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Return the predicted digit, int64 (N,), of each uint8 image (N, 32, 32, 3)."""
        return predict_digits(self.network, images, self.device)

    def describe(self) -> dict:
        """Return a JSON-able description for reports."""
        return {
            "network": "DigitCNN (augsvhn.eval.features), trained from scratch on the real SVHN train split",
            "features": f"penultimate layer after ReLU, {self.feature_dim} values, not L2-normalised",
            "settings": asdict(self.settings),
            "test_accuracy": self.test_accuracy,
            "train_seconds": self.train_seconds,
            "cache_path": str(self.cache_path) if self.cache_path else None,
        }


# ---- cache ---------------------------------------------------------------------------------------


def feature_cache_dir(option_value: str | os.PathLike | None = None) -> Path:
    """Return the folder of cached feature networks: `option_value`, else $AUGSVHN_CACHE, else ~/.cache/augsvhn."""
    if option_value:
        return Path(option_value)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "augsvhn"


def cache_key(train_images: np.ndarray, train_labels: np.ndarray, settings: FeatureNetSettings) -> str:
    """Return the first 16 hex digits of a SHA-256 over the training data, the settings and the cache format."""
    digest = hashlib.sha256(fingerprint(train_images).encode())
    digest.update(np.ascontiguousarray(train_labels, dtype=np.int64).data)
    digest.update(json.dumps(asdict(settings), sort_keys=True).encode())
    digest.update(f"format {CACHE_FORMAT_VERSION}".encode())
    return digest.hexdigest()[:16]


def _save(path: Path, network: DigitCNN, settings: FeatureNetSettings, test_accuracy: float, seconds: float) -> None:
    payload = {
        "format_version": CACHE_FORMAT_VERSION,
        "settings": asdict(settings),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in network.state_dict().items()},
        "test_accuracy": float(test_accuracy),
        "train_seconds": float(seconds),
    }
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


def _load(path: Path, settings: FeatureNetSettings, device: str) -> tuple[DigitCNN, float]:
    """Load cached weights (no code runs: weights_only=True). Raises DataError for a corrupt or foreign file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format_version") != CACHE_FORMAT_VERSION or payload.get("settings") != asdict(settings):
            raise DataError(f"feature net cache {path} was made with other settings; delete it to retrain")
        network = DigitCNN(settings.width, settings.feature_dim)
        network.load_state_dict(payload["state_dict"])
    except (OSError, RuntimeError, KeyError, AttributeError, EOFError, pickle.UnpicklingError) as error:
        raise DataError(f"cannot read the feature net cache {path}: {error}; delete it to retrain") from error
    return network.to(device).eval(), float(payload["train_seconds"])


def load_or_train_extractor(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    cache_dir: str | os.PathLike | None = None,
    settings: FeatureNetSettings = FeatureNetSettings(),
    device: str = "cpu",
    progress: bool = True,
) -> FeatureExtractor:
    """Return the feature extractor for this training data and settings, training and caching it on first use.

    The cache file is `<cache_dir>/features-<cache_key>.pt` (see `feature_cache_dir` for the default folder),
    written atomically. The test accuracy is measured again on `test_images` at every load.
    """
    path = feature_cache_dir(cache_dir) / f"features-{cache_key(train_images, train_labels, settings)}.pt"
    if path.is_file():
        network, seconds = _load(path, settings, device)
        logger.info("loaded the feature net from %s", path)
    else:
        logger.info("training the feature net on %d real digits (cached afterwards in %s)", len(train_labels), path)
        start = time.perf_counter()
        network = train_digit_cnn(train_images, train_labels, settings, device, progress)
        seconds = time.perf_counter() - start
        _save(path, network, settings, accuracy_of(network, test_images, test_labels, device), seconds)

    test_accuracy = accuracy_of(network, test_images, test_labels, device)
    logger.info("feature net accuracy on the real test split: %.3f", test_accuracy)
    return FeatureExtractor(network, settings, test_accuracy, seconds, path, device)
