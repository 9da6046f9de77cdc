"""Train timm classifiers from scratch in four arms and score them on the test slices.

The arms differ only in their training data; all share the optimiser, schedule, number of steps and seed:

- `baseline`: real SVHN train digits;
- `classic_augmentation`: real digits with random Gaussian blur and brightness, contrast and gamma changes;
- `augmented`: real digits plus synthetic digits making up `synthetic_fraction` of every batch;
- `synthetic_only`: synthetic digits only, scored on real test digits, which is the Classification Accuracy
  Score of Ravuri and Vinyals, "Classification Accuracy Score for Conditional Generative Models", NeurIPS 2019.

Every arm also gets the digit-safe augmentation of `augsvhn.eval.augment` (random crop, colour jitter).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from augsvhn.eval.augment import augment_batch

logger = logging.getLogger("augsvhn.eval.classifier")

ARMS = ("baseline", "classic_augmentation", "augmented", "synthetic_only")
NUM_CLASSES = 10

# Optimiser: SGD with Nesterov momentum and a one-cycle learning-rate schedule (Smith and Topin 2019).
LEARNING_RATE = 0.1  # peak, for batch size 128; scaled linearly with the batch size
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
WARMUP_FRACTION = 0.15
EVAL_BATCH_SIZE = 512


@dataclass(frozen=True)
class TrainingSettings:
    """Training settings of one classifier run, apart from its data and seed."""

    model: str  # timm model name
    steps: int  # optimiser steps
    batch_size: int
    synthetic_fraction: float  # share of each batch that is synthetic in the `augmented` arm
    device: str  # "cpu" or "cuda"
    bf16: bool  # bfloat16 autocast


# ---- model ---------------------------------------------------------------------------------------


def build_classifier(name: str, num_classes: int = NUM_CLASSES) -> tuple[nn.Module, str]:
    """Create timm model `name` from scratch with its stem adapted to 32 x 32 digits.

    The ImageNet stem of many timm models divides the resolution by 4 (stride-2 convolution, then max-pool), which
    leaves a 32 x 32 digit 8 x 8 pixels wide after one layer. Adaptations, in order of preference:

    - a ResNet-style single `conv1` followed by `maxpool`: `conv1` becomes a 3 x 3 stride-2 convolution with the
      same channels and the max-pool is removed, so the stem divides by 2;
    - any other model with a `maxpool` (or `stem.pool`) max-pooling layer: that layer is removed;
    - a model with a patch embedding (vision transformers) is created with `img_size=32`;
    - otherwise the model keeps its own stem.

    Returns the model and a sentence that describes the adaptation. Raises ValueError for an unknown name.
    """
    if not timm.is_model(name):
        raise ValueError(
            f"unknown timm model {name!r}; list the names with `python -c \"import timm; print(timm.list_models())\"`"
        )
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if hasattr(model, "patch_embed"):
        # Vision transformers fix their input size at creation; patch-embedding models take `img_size`.
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=32)
        return model, "created with img_size=32 (patch embedding for 32x32 input); stem otherwise unchanged"

    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=2, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model, "conv1 replaced by a 3x3 stride-2 convolution and the max-pool removed (input stride 2, not 4)"

    for owner_name, attribute in (("", "maxpool"), ("stem", "pool")):
        owner = getattr(model, owner_name, None) if owner_name else model
        if isinstance(getattr(owner, attribute, None), nn.MaxPool2d):
            setattr(owner, attribute, nn.Identity())
            path = f"{owner_name}.{attribute}" if owner_name else attribute
            return model, f"stem max-pool `{path}` removed (input stride halved)"

    return model, "no stem change: this model has no ResNet-style stem or stem max-pool to adapt"


def resolve_device(device: str) -> str:
    """Map "auto" to "cuda" when a GPU is available, else "cpu". Raises ValueError for unusable choices."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch finds no CUDA GPU; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return device


def bf16_helps(device: str) -> bool:
    """Return whether bfloat16 autocast is worth using: on CUDA GPUs that support it, and on CPUs with bf16 kernels.

    On the CPU this queries torch for oneDNN bf16 kernels on the processor. Without them bf16 is
    emulated and slower than float32.
    """
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        # NOTE: a private torch operator (checked in torch 2.14). If a release drops it, the CPU runs in float32.
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ---- data ----------------------------------------------------------------------------------------


def to_float_tensor(images: np.ndarray) -> torch.Tensor:
    """Convert uint8 images (N, 32, 32, 3) to float (N, 3, 32, 32) in [0, 1]."""
    return torch.tensor(images).permute(0, 3, 1, 2).float() / 255.0  # a copy, because the SVHN arrays are read-only


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] to [-1, 1], the input scale of every classifier here."""
    return x * 2.0 - 1.0


class BatchSampler:
    """Draw training batches for one arm with replacement-free epochs over each source.

    `real` and `synthetic` are (uint8 images, int64 labels); either may be None when the arm does not use it.
    `synthetic_share` of each batch (rounded) comes from the synthetic source, the rest from the real one. Each
    source has its own permutation stream, drawn from `generator`.
    """

    def __init__(self, real, synthetic, batch_size: int, synthetic_share: float, generator: torch.Generator):
        self.sources = []
        synthetic_count = int(round(batch_size * synthetic_share)) if synthetic is not None else 0
        real_count = batch_size - synthetic_count if real is not None else 0
        assert real_count + synthetic_count == batch_size, "a batch must be filled from the sources the arm has"
        for data, count in ((real, real_count), (synthetic, synthetic_count)):
            if count > 0:
                images, labels = data
                self.sources.append([torch.tensor(images), torch.tensor(labels), count, None, 0])
        self.generator = generator

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for source in self.sources:
            source_images, source_labels, count, order, position = source
            picked = []
            while count > 0:
                if order is None or position >= len(order):
                    order = torch.randperm(len(source_labels), generator=self.generator)
                    position = 0
                take = order[position : position + count]
                picked.append(take)
                position += len(take)
                count -= len(take)
            source[3], source[4] = order, position
            index = torch.cat(picked)
            images.append(source_images[index])
            labels.append(source_labels[index])
        batch_images = torch.cat(images).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, 32, 32)
        return batch_images, torch.cat(labels).long()


# ---- training and prediction --------------------------------------------------------------------


def train_classifier(
    arm: str,
    seed: int,
    settings: TrainingSettings,
    real: tuple[np.ndarray, np.ndarray] | None,
    synthetic: tuple[np.ndarray, np.ndarray] | None,
    progress: bool = True,
) -> nn.Module:
    """Train one classifier of `arm` from scratch with `seed` and return it in eval mode.

    The seed fixes the initial weights (the same for every arm), the batch order and the augmentation draws.
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {', '.join(ARMS)}")
    use_real = real if arm != "synthetic_only" else None
    use_synthetic = synthetic if arm in ("augmented", "synthetic_only") else None
    share = {"augmented": settings.synthetic_fraction, "synthetic_only": 1.0}.get(arm, 0.0)
    if use_synthetic is None and arm in ("augmented", "synthetic_only"):
        raise ValueError(f"arm {arm!r} needs synthetic digits")

    torch.manual_seed(seed)
    model, _ = build_classifier(settings.model)
    model = model.to(settings.device, memory_format=torch.channels_last).train()
    generator = torch.Generator().manual_seed(seed)
    sampler = BatchSampler(use_real, use_synthetic, settings.batch_size, share, generator)

    peak_lr = LEARNING_RATE * settings.batch_size / 128
    optimiser = torch.optim.SGD(
        model.parameters(), lr=peak_lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=peak_lr, total_steps=settings.steps, pct_start=WARMUP_FRACTION
    )

    bar = tqdm(range(settings.steps), desc=f"{arm} seed {seed}", unit="step", disable=None if progress else True)
    start = time.perf_counter()
    for step in bar:
        images, labels = sampler.next()
        images = augment_batch(images, generator, classic=arm == "classic_augmentation")
        images = normalise(images).to(settings.device, memory_format=torch.channels_last)
        labels = labels.to(settings.device)
        with torch.autocast(settings.device, dtype=torch.bfloat16, enabled=settings.bf16):
            loss = F.cross_entropy(model(images), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 20 == 0 or step == settings.steps - 1:
            rate = (step + 1) * settings.batch_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.3f}", images_per_s=f"{rate:.0f}")
    elapsed = time.perf_counter() - start
    logger.info(
        "trained %s seed %d: %d steps in %.0f s (%.0f images/s), last loss %.3f",
        arm, seed, settings.steps, elapsed, settings.steps * settings.batch_size / max(elapsed, 1e-9), loss.item(),
    )  # fmt: skip
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, device: str, bf16: bool) -> np.ndarray:
    """Return the predicted digit (int64 (N,)) of each uint8 image (N, 32, 32, 3)."""
    model.eval()
    predictions = []
    for start in range(0, len(images), EVAL_BATCH_SIZE):
        x = normalise(to_float_tensor(images[start : start + EVAL_BATCH_SIZE]))
        x = x.to(device, memory_format=torch.channels_last)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        predictions.append(logits.float().argmax(dim=1).cpu())
    if not predictions:
        return np.zeros(0, dtype=np.int64)
    return torch.cat(predictions).numpy().astype(np.int64)


def steps_for_epochs(epochs: float, n_real: int, batch_size: int) -> int:
    """Number of optimiser steps for `epochs` passes over `n_real` real training digits."""
    return max(1, math.ceil(epochs * n_real / batch_size))
