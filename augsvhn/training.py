"""Training loop of one class-conditional denoiser per cluster: EMA, checkpoints, resume, logs and plots.

Each cluster k trains in WORKDIR/models/cluster-<k>/, which contains:
- config.json: the TrainConfig of the run,
- checkpoint.pt: the latest checkpoint (see augsvhn.checkpoints),
- train_log.jsonl: one line per `log_every` steps (step, epoch, loss, images/s, lr, elapsed time),
- loss.png: the loss curve, and samples.png: a few EMA samples per digit at the end.

Running `train_cluster` again on the same folder resumes from checkpoint.pt. The data order and every random draw
follow from the seed and the saved generator states, so on the CPU a resumed run gives bit-identical weights to an
uninterrupted run at the same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from augsvhn import __version__
from augsvhn.checkpoints import (
    FORMAT_VERSION,
    check_checkpoint_matches,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from augsvhn.distributed import SINGLE_PROCESS, DistributedContext
from augsvhn.errors import AugsvhnError, DataError
from augsvhn.fsutil import DirectoryLock, atomic_write_bytes, atomic_write_json, remove_temporary_files
from augsvhn.losses import drop_labels, get_loss
from augsvhn.models import NUM_CLASSES, build_denoiser
from augsvhn.sde import get_sde, max_pairwise_distance
from augsvhn.workdir import cluster_model_dir

logger = logging.getLogger("augsvhn.training")

CONFIG_NAME = "config.json"

# Cluster index of the model trained on the images of all clusters together (WORKDIR/models/pooled), which the
# cluster models can start from (TrainConfig.init_from).
POOLED = -1
LOG_NAME = "train_log.jsonl"

# TrainConfig fields that define the trained model. Resuming with another value of any of them is rejected,
# while the budget, device, logging and checkpoint intervals may change between runs.
RUN_SETTINGS = (
    "sde",
    "sde_params",
    "sigma_max",
    "loss",
    "loss_params",
    "model_size",
    "dropout",
    "batch_size",
    "lr",
    "lr_warmup_images",
    "adam_betas",
    "ema_halflife_images",
    "ema_rampup_ratio",
    "grad_clip",
    "label_dropout",
    "seed",
    "init_from",
)


@dataclass
class TrainConfig:
    """Settings of one training run, written to config.json in the cluster's model folder."""

    sde: str = "ve"  # one of sde.SDE_NAMES
    sde_params: dict = field(default_factory=dict)  # extra SDE parameters, such as beta_max or sigma_min
    sigma_max: float | None = None  # VE sigma_max; None = largest distance between two training images
    loss: str = "edm"  # "edm" (Karras et al. 2022) or "dsm" (Song et al. 2021)
    loss_params: dict = field(default_factory=dict)  # extra parameters of losses.get_loss
    model_size: str = "tiny"  # key of models.MODEL_SIZES; "tiny" learns the most per CPU minute
    dropout: float | None = None  # dropout rate of the U-Net's residual blocks; None = the model size's own rate
    # Small batches, a high learning rate, a short warm-up and a short EMA lowered the loss and the Fréchet distance
    # fastest in runs of minutes on a CPU (docs/benchmarks.md). On a GPU, larger batches keep the device busier.
    batch_size: int = 32  # images per optimiser step
    lr: float = 1e-3  # Adam learning rate after warm-up
    lr_warmup_images: int = 1_000  # linear learning-rate warm-up over this many images; 0 = none
    adam_betas: tuple[float, float] = (0.9, 0.999)
    ema_halflife_images: float = 10_000  # EMA half-life in training images (the EDM training loop uses 500,000)
    ema_rampup_ratio: float | None = 0.05  # half-life at most this fraction of the images seen; None = no ramp-up
    grad_clip: float | None = 1.0  # max global gradient norm; None = no clipping
    label_dropout: float = 0.1  # fraction of labels replaced by models.NULL_LABEL, for classifier-free guidance
    max_steps: int | None = 20_000  # stop after this many optimiser steps; None = no step limit
    epochs: int | None = None  # stop after this many passes over the cluster's images; None = no epoch limit
    max_minutes: float | None = None  # stop after this much training time, summed over resumed runs; None = none
    seed: int = 0  # seed of the data order, the noise and the initial weights
    checkpoint_every: int = 1000  # steps between checkpoints; one is also written at the end
    log_every: int = 50  # steps between log lines
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda" or "cuda:<i>"
    bf16: bool | None = None  # bfloat16 autocast; None = on for CUDA and CPUs with bfloat16 instructions
    channels_last: bool = False  # channels-last memory format for the network and its inputs
    samples_per_digit: int = 4  # EMA samples per digit in samples.png at the end; 0 = no samples.png
    sample_steps: int | None = None  # steps of Heun's sampler for samples.png; None = the sampler's default
    init_from: str | None = None  # checkpoint.pt, or a folder containing one, whose EMA weights start the run

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        positive_ints = ("batch_size", "checkpoint_every", "log_every")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 or None, got {value}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive or None, got {self.max_minutes}")
        if self.max_steps is None and self.epochs is None and self.max_minutes is None:
            raise ValueError("set at least one of max_steps, epochs and max_minutes, or training never stops")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not self.ema_halflife_images > 0:
            raise ValueError(f"ema_halflife_images must be positive, got {self.ema_halflife_images}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.sigma_max is not None and self.sde != "ve":
            raise ValueError(f"sigma_max applies to the VE SDE only, but sde is {self.sde!r}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1) or None, got {self.dropout}")
        if self.samples_per_digit < 0:
            raise ValueError(f"samples_per_digit must be 0 or more, got {self.samples_per_digit}")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-able values."""
        values = dataclasses.asdict(self)
        values["adam_betas"] = list(self.adam_betas)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build a TrainConfig from `to_dict()` output; unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {', '.join(unknown)}; known ones: {', '.join(sorted(known))}")
        return cls(**values)


@dataclass
class ClusterData:
    """Training images of one cluster, scaled to [-1, 1]."""

    images: torch.Tensor  # float32 (N, 3, 32, 32) in [-1, 1]
    labels: torch.Tensor  # int64 (N,), digits 0-9
    fingerprint: str  # data.fingerprint of the whole training split
    label_counts: list[int]  # number of images of each digit 0-9


@dataclass
class TrainResult:
    """Outcome of `train_cluster`."""

    model_dir: Path
    step: int  # optimiser steps done in total
    steps_done: int  # optimiser steps done by this call
    epoch: int  # epoch of the next step
    images_seen: int
    elapsed_s: float  # training time over all runs
    stop_reason: str  # "max_steps", "epochs" or "max_minutes"
    last_loss: float | None  # mean loss of the last logged interval; None when no step ran in this call
    images_per_s: float | None  # throughput of this call; None when no step ran


# ---- small pieces --------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:<i>" into a torch.device; "auto" picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"invalid device {name!r}; use auto, cpu, cuda or cuda:<index>") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AugsvhnError(f"device {name!r} requested, but PyTorch finds no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:<index>")
    return device


def ema_decay(batch_size: int, halflife_images: float, images_seen: int, rampup_ratio: float | None) -> float:
    """Return the EMA decay beta per step for a half-life given in images.

    beta = 0.5 ** (batch_size / halflife), so the weight of a step halves after `halflife` more images. With a
    ramp-up, the half-life is at most `rampup_ratio * images_seen`, so early weights are forgotten quickly. This
    is the schedule of the EDM training loop (Karras et al. 2022, code release NVlabs/edm,
    training/training_loop.py), with `images_seen` counted after the step.
    """
    if rampup_ratio is not None:
        halflife_images = min(halflife_images, images_seen * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_images, 1e-8))


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Set every EMA parameter to decay * ema + (1 - decay) * current, and copy the buffers."""
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        ema_param.lerp_(param.detach(), 1.0 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def default_training_bf16(device: torch.device) -> bool:
    """Return whether training uses bfloat16 autocast by default: on CUDA, and on CPUs with AVX512-BF16 or AMX.

    On a CPU with these instructions, autocast about doubles the training speed of the tiny model, and the loss
    follows the float32 loss within its noise (tests/test_fast_paths.py).
    """
    from augsvhn.sampling import cpu_has_bf16_instructions

    return device.type == "cuda" or cpu_has_bf16_instructions()


def learning_rate(config: TrainConfig, images_seen: int) -> float:
    """Return the learning rate after a linear warm-up over `lr_warmup_images` images."""
    if config.lr_warmup_images <= 0:
        return config.lr
    return config.lr * min(1.0, (images_seen + config.batch_size) / config.lr_warmup_images)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Return the order of the n training images in an epoch, a function of (seed, epoch) alone.

    Like torch's DistributedSampler, the order is reseeded every epoch, so resuming needs only the step count.
    """
    seed_words = np.random.SeedSequence([seed, epoch, 0x0DA7A]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed(int(seed_words[0]) << 32 | int(seed_words[1]))
    return torch.randperm(n, generator=generator)


def _seed_of(seed: int, purpose: int) -> int:
    """Return a 63-bit seed for one use of randomness (initial weights, noise) from the run's seed."""
    words = np.random.SeedSequence([seed, purpose]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def _initial_weights(init_from: str, denoiser_config: dict) -> dict[str, torch.Tensor]:
    """Return the EMA weights of the checkpoint named by `init_from` (a checkpoint file or a training folder).

    Fine-tuning a model trained on the images of all clusters gives each cluster's model the digit shapes that
    it would otherwise have to learn from its own 1,000-2,000 images. Raises DataError when the checkpoint is
    missing or its network differs from the one configured.
    """
    path = Path(init_from)
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        raise DataError(f"no checkpoint to initialise from at {path}; train that model first or fix --init-from")
    checkpoint = load_checkpoint(path)
    if checkpoint.get("denoiser") != denoiser_config:
        raise DataError(
            f"checkpoint {path} contains another network ({checkpoint.get('denoiser')}) than the one configured "
            f"({denoiser_config}); use the same --model-size as that run"
        )
    return checkpoint["ema"]


def model_name(cluster: int) -> str:
    """Name of a cluster's model in logs and plots: "cluster <k>", or "pooled model" for POOLED."""
    return "pooled model" if cluster == POOLED else f"cluster {cluster}"


def model_dir_of(workdir: str | Path, cluster: int) -> Path:
    """Return the training folder of a cluster's model, or WORKDIR/models/pooled for the POOLED model."""
    if cluster == POOLED:
        return Path(workdir) / "models" / "pooled"
    return cluster_model_dir(workdir, cluster)


_WEIGHTS_SEED = 1
_NOISE_SEED = 2
_SAMPLES_SEED = 3


def load_train_config(model_dir: str | Path) -> TrainConfig | None:
    """Read config.json of a training folder; None when the folder has none."""
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise DataError(f"training settings {path} are invalid ({error}); fix or delete the file") from error


def make_train_config(model_dir: str | Path, **overrides: Any) -> TrainConfig:
    """Return the settings saved in a folder's config.json (or the defaults) updated with `overrides`.

    A command line that repeats no option therefore resumes a run with its saved settings.
    """
    saved = load_train_config(model_dir)
    values = saved.to_dict() if saved is not None else TrainConfig().to_dict()
    values.update(overrides)
    return TrainConfig.from_dict(values)


def load_cluster_data(workdir: str | Path, cluster: int, svhn_root: str | Path | None = None) -> ClusterData:
    """Load the real training images of one cluster, scaled to [-1, 1].

    `svhn_root` is resolved by data.resolve_svhn_root (None: $AUGSVHN_SVHN_ROOT, then the workdir's config.json).
    Raises DataError when the SVHN training split differs from the one the clusters were made from.
    """
    from augsvhn.clusters import cluster_indices, load_clusters
    from augsvhn.data import load_svhn, resolve_svhn_root

    split = load_svhn(resolve_svhn_root(svhn_root, workdir), "train")
    clusters = load_clusters(workdir, images=split.images)
    indices = np.arange(len(split.labels)) if cluster == POOLED else cluster_indices(clusters, cluster)
    if len(indices) == 0:
        raise DataError(f"cluster {cluster} of {workdir} has no training images")
    images = torch.from_numpy(split.images[indices]).permute(0, 3, 1, 2)  # (N, 3, 32, 32) uint8
    labels = torch.from_numpy(split.labels[indices].astype(np.int64))
    counts = np.bincount(split.labels[indices], minlength=NUM_CLASSES)
    return ClusterData(
        images=images.float() / 127.5 - 1.0,
        labels=labels,
        fingerprint=clusters.data_fingerprint,
        label_counts=[int(count) for count in counts],
    )


# ---- the run -------------------------------------------------------------------------------------------------


class _Run:
    """Model, EMA, optimiser, generators and counters of one training run, with checkpoint (de)serialisation.

    With several processes (`distributed.world_size` > 1), every rank keeps the same model, EMA, optimiser and
    generator states. `config.batch_size` is the global batch of one optimiser step: rank r computes the loss on
    the r-th of `world_size` equal slices of it, and DistributedDataParallel averages the gradients. Only rank 0
    writes files, and a checkpoint is the same whatever the number of processes that wrote it.
    """

    def __init__(
        self,
        workdir: Path,
        cluster: int,
        config: TrainConfig,
        data: ClusterData,
        device: torch.device,
        distributed: DistributedContext = SINGLE_PROCESS,
    ):
        self.workdir, self.cluster, self.config, self.data, self.device = workdir, cluster, config, data, device
        self.model_dir = model_dir_of(workdir, cluster)
        self.distributed = distributed
        self.rank, self.world_size = distributed.rank, distributed.world_size

        # SDE: the VE sigma_max defaults to the largest distance between two training images (see sde.VESDE).
        sde_params = dict(config.sde_params)
        if config.sde == "ve":
            if config.sigma_max is not None:
                sde_params["sigma_max"] = config.sigma_max
            elif "sigma_max" not in sde_params:
                sde_params["sigma_max"] = max_pairwise_distance(data.images) if len(data.images) > 1 else 1.0
        try:
            self.sde = get_sde(config.sde, **sde_params)
        except TypeError as error:
            raise ValueError(f"invalid parameters {sde_params} for the {config.sde!r} SDE: {error}") from error
        self.sigma_max = float(self.sde.ve_sigma(torch.tensor([self.sde.T])).item())
        self.loss_fn = get_loss(config.loss, self.sde, **config.loss_params)

        # Network, EMA copy and optimiser; the initial weights depend on the seed alone.
        torch.manual_seed(_seed_of(config.seed, _WEIGHTS_SEED))
        self.model = build_denoiser(config.model_size, dropout=config.dropout).to(device)
        self.ema = build_denoiser(config.model_size, dropout=config.dropout).to(device)
        if config.init_from is not None:
            self.model.load_state_dict(_initial_weights(config.init_from, self.model.config()))
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False)
        self.ema.eval()
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.ema.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=config.adam_betas, eps=1e-8)

        # Noise levels, noise and label dropout draw from one CPU generator (the losses draw on the CPU), so a
        # run's random numbers do not depend on the device.
        self.noise_generator = torch.Generator().manual_seed(_seed_of(config.seed, _NOISE_SEED))

        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size = min(config.batch_size, len(data.images))  # global batch, summed over the ranks
        if self.batch_size % self.world_size != 0:
            raise AugsvhnError(
                f"the batch of {self.batch_size} images of cluster {cluster} cannot be split evenly over "
                f"{self.world_size} processes; use a --batch-size divisible by {self.world_size}, or another "
                f"number of processes"
            )
        rank_batch_size = self.batch_size // self.world_size
        self.rank_slice = slice(self.rank * rank_batch_size, (self.rank + 1) * rank_batch_size)
        self.batches_per_epoch = len(data.images) // self.batch_size
        # The network the loss calls: `model` itself, or after `wrap_for_distributed` a DDP wrapper of it.
        self.loss_denoiser: torch.nn.Module = self.model
        self.step = 0
        self.images_seen = 0
        self.elapsed_s = 0.0
        self.last_saved_step: int | None = None

    @property
    def epoch(self) -> int:
        return self.step // self.batches_per_epoch

    def batch_indices(self, permutation: torch.Tensor) -> torch.Tensor:
        """Return the indices of the global batch at the current step, a slice of the epoch's permutation.

        Every rank gets the whole global batch and trains on its `rank_slice` of it. The ranks' images are
        therefore disjoint and together make up the batch a single process would use.
        """
        position = self.step % self.batches_per_epoch
        start = position * self.batch_size
        return permutation[start : start + self.batch_size]

    def wrap_for_distributed(self) -> None:
        """Let the loss call the model through DistributedDataParallel, on this rank's slice of each batch.

        Called after `resume`, once every rank has the same weights.
        """
        if self.world_size == 1:
            return
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(self.model, device_ids=device_ids)
        self.loss_denoiser = _RankSliceDenoiser(wrapped, self.rank_slice, self.model.sigma_data)

    # Checkpoints.

    def requested_settings(self) -> dict[str, Any]:
        """Return the checkpoint entries a resumed run must share with the checkpoint."""
        run_settings = {name: self.config.to_dict()[name] for name in RUN_SETTINGS}
        return {
            "augsvhn_version": __version__,
            "model_size": self.config.model_size,
            "sde": self.sde.config(),
            "loss": self.loss_fn.config(),
            "cluster": self.cluster,
            "data_fingerprint": self.data.fingerprint,
            "train_config": run_settings,
        }

    def state(self) -> dict[str, Any]:
        """Return the checkpoint dictionary of the current step."""
        rng = {
            "torch": torch.get_rng_state(),
            "noise": self.noise_generator.get_state(),
            "data_order": {"seed": self.config.seed, "epoch": self.epoch},
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format_version": FORMAT_VERSION,
            "augsvhn_version": __version__,
            "model_size": self.config.model_size,
            "denoiser": self.model.config(),
            "sde": self.sde.config(),
            "loss": self.loss_fn.config(),
            "train_config": self.config.to_dict(),
            "cluster": self.cluster,
            "data_fingerprint": self.data.fingerprint,
            "label_counts": list(self.data.label_counts),
            "sigma_max": self.sigma_max,
            "step": self.step,
            "epoch": self.epoch,
            "images_seen": self.images_seen,
            "elapsed_s": self.elapsed_s,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
        }

    def save(self) -> None:
        """Write the checkpoint of the current step, after checking that every weight is finite.

        Rank 0 writes it while the other ranks wait, and every rank raises when the writing failed.
        """
        with self.distributed.all_or_none():
            if self.distributed.is_main:
                self._check_finite_weights()
                save_checkpoint(checkpoint_path(self.model_dir), self.state())
        self.last_saved_step = self.step

    def _check_finite_weights(self) -> None:
        for name, module in (("model", self.model), ("EMA", self.ema)):
            for key, tensor in module.state_dict().items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise AugsvhnError(f"{name} weight {key} is not finite at step {self.step}; no checkpoint written")

    def resume(self) -> bool:
        """Restore the state of checkpoint.pt when it exists. Returns whether a checkpoint was loaded."""
        path = checkpoint_path(self.model_dir)
        if not path.exists():
            return False
        checkpoint = load_checkpoint(path)
        saved_run_settings = {name: checkpoint["train_config"].get(name) for name in RUN_SETTINGS}
        check_checkpoint_matches({**checkpoint, "train_config": saved_run_settings}, path, **self.requested_settings())

        self.model.load_state_dict(checkpoint["model"])
        self.ema.load_state_dict(checkpoint["ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.step = checkpoint["step"]
        self.images_seen = checkpoint["images_seen"]
        self.elapsed_s = checkpoint["elapsed_s"]
        self.last_saved_step = self.step

        rng = checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        self.noise_generator.set_state(rng["noise"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        return True


class _RankSliceDenoiser(torch.nn.Module):
    """Denoiser seen by the loss on one rank: runs the network on the rank's slice of the batch only.

    The loss draws its noise levels and noise for the whole global batch from the shared generator, so the
    random numbers of an image do not depend on the number of processes. Rows outside the slice come back as
    zeros without a gradient, and the caller averages the per-image loss over the slice alone. This is valid
    because every loss in augsvhn.losses computes each image's loss from that image alone.
    """

    def __init__(self, network: torch.nn.Module, rank_slice: slice, sigma_data: float):
        super().__init__()
        self.network, self.rank_slice, self.sigma_data = network, rank_slice, sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        part = self.rank_slice
        denoised = self.network(x[part], sigma[part], labels[part])  # (B / world_size, 3, 32, 32)
        before = denoised.new_zeros((part.start, *denoised.shape[1:]))
        after = denoised.new_zeros((len(x) - part.stop, *denoised.shape[1:]))
        return torch.cat([before, denoised, after])  # (B, 3, 32, 32)


def _total_steps(config: TrainConfig, batches_per_epoch: int) -> int | None:
    """Return the step budget set by max_steps and epochs; None when only max_minutes limits the run."""
    limits = [config.max_steps] if config.max_steps is not None else []
    if config.epochs is not None:
        limits.append(config.epochs * batches_per_epoch)
    return min(limits) if limits else None


def _stop_reason(run: _Run) -> str | None:
    """Return why the run must stop before its next step, or None to go on."""
    config = run.config
    if config.max_steps is not None and run.step >= config.max_steps:
        return "max_steps"
    if config.epochs is not None and run.step >= config.epochs * run.batches_per_epoch:
        return "epochs"
    if config.max_minutes is not None and run.elapsed_s >= 60 * config.max_minutes:
        return "max_minutes"
    return None


def _train_step(run: _Run, permutation: torch.Tensor, use_bf16: bool) -> float:
    """Do one optimiser step and the EMA update. Returns the batch's mean loss.

    Raises AugsvhnError before changing any weight when the loss or the gradient norm is not finite.
    """
    config, device = run.config, run.device

    # Batch: the whole global batch on every rank (see _RankSliceDenoiser), so that the random draws below do not
    # depend on the number of processes.
    indices = run.batch_indices(permutation).to(device)
    x0 = run.images[indices]  # (B, 3, 32, 32)
    labels = run.labels[indices]  # (B,)
    if config.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)

    # Label dropout: a fraction of the batch trains the unconditional model (Ho and Salimans 2022, algorithm 1).
    labels = drop_labels(labels, config.label_dropout, generator=run.noise_generator)

    # Loss and gradient.
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(config, run.images_seen)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        per_image_loss = run.loss_fn(run.loss_denoiser, x0, labels, generator=run.noise_generator)  # (B,)
        loss = per_image_loss[run.rank_slice].mean()
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # with several ranks, DistributedDataParallel averages the gradients here
    max_norm = config.grad_clip if config.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)

    # Finite check, with one device synchronisation for both values. The mean over the ranks gives every rank the
    # global batch's loss, so that all ranks take the same decision.
    values = run.distributed.mean(torch.stack([loss.detach().float(), grad_norm.detach().float()]))
    loss_value, grad_norm_value = values.tolist()
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
        checkpoint_note = (
            f"the last good checkpoint (step {run.last_saved_step}) in {run.model_dir} is kept"
            if run.last_saved_step is not None
            else "no checkpoint had been written yet"
        )
        # A rerun repeats the same random draws from the checkpoint, so only other settings can avoid the failure.
        advice = f"remove {run.model_dir} and train again with a lower --lr"
        if use_bf16:
            advice = f"rerun with --no-bf16 to go on from the checkpoint without bfloat16 autocast, or {advice}"
        raise AugsvhnError(
            f"training of cluster {run.cluster} stopped: the loss is {loss_value} and the gradient norm "
            f"{grad_norm_value} at step {run.step + 1}; {checkpoint_note}. To go on, {advice}"
        )

    # Optimiser step and EMA.
    run.optimizer.step()
    run.step += 1
    run.images_seen += run.batch_size
    decay = ema_decay(run.batch_size, config.ema_halflife_images, run.images_seen, config.ema_rampup_ratio)
    update_ema(run.ema, run.model, decay)
    return loss_value


def _train_loop(run: _Run, use_bf16: bool, progress: bool) -> TrainResult:
    """Run steps until the budget is spent, logging every `log_every` and saving every `checkpoint_every` steps."""
    config = run.config
    log_path = run.model_dir / LOG_NAME
    total_steps = _total_steps(config, run.batches_per_epoch)
    bar = tqdm(
        total=total_steps,
        initial=run.step,
        desc=model_name(run.cluster),
        unit="step",
        disable=None if progress and run.distributed.is_main else True,
        dynamic_ncols=True,
    )
    elapsed_before = run.elapsed_s
    call_start = time.perf_counter()
    first_step = run.step
    interval_losses: list[float] = []
    interval_start = call_start
    last_loss = None
    permutation, permutation_epoch = None, None
    run.model.train()
    is_main = run.distributed.is_main
    log_context = open(log_path, "a", encoding="utf-8") if is_main else contextlib.nullcontext()

    with bar, log_context as log_file:
        while (stop_reason := _stop_reason(run)) is None:
            if permutation_epoch != run.epoch:
                permutation, permutation_epoch = epoch_permutation(len(run.images), config.seed, run.epoch), run.epoch
            interval_losses.append(_train_step(run, permutation, use_bf16))
            now = time.perf_counter()
            run.elapsed_s = elapsed_before + now - call_start
            if config.max_minutes is not None:
                run.elapsed_s = run.distributed.broadcast_float(run.elapsed_s)  # all ranks must stop at one step
            bar.update(1)

            last_of_run = _stop_reason(run) is not None
            if run.step % config.log_every == 0 or last_of_run:
                images_per_s = len(interval_losses) * run.batch_size / max(now - interval_start, 1e-9)
                last_loss = float(np.mean(interval_losses))
                entry = {
                    "step": run.step,
                    "epoch": run.epoch,
                    "loss": last_loss,
                    "images_per_s": images_per_s,
                    "lr": run.optimizer.param_groups[0]["lr"],
                    "elapsed_s": run.elapsed_s,
                }
                if is_main:
                    log_file.write(json.dumps(entry) + "\n")
                    log_file.flush()
                    bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{images_per_s:.0f}")
                    logger.info(
                        "%s step %d%s epoch %d loss %.4f %.0f images/s lr %.2e elapsed %s",
                        model_name(run.cluster), run.step, f"/{total_steps}" if total_steps else "", run.epoch, last_loss,
                        images_per_s, entry["lr"], _format_duration(run.elapsed_s),
                    )
                interval_losses, interval_start = [], now
            if run.step % config.checkpoint_every == 0:
                run.save()
                interval_start += time.perf_counter() - now  # keep checkpoint writing out of the images/s

    if run.step != run.last_saved_step:
        run.save()
    steps_done = run.step - first_step
    call_seconds = time.perf_counter() - call_start
    return TrainResult(
        model_dir=run.model_dir,
        step=run.step,
        steps_done=steps_done,
        epoch=run.epoch,
        images_seen=run.images_seen,
        elapsed_s=run.elapsed_s,
        stop_reason=stop_reason,
        last_loss=last_loss,
        images_per_s=steps_done * run.batch_size / call_seconds if steps_done else None,
    )


def _format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


# ---- logs, plots and samples ---------------------------------------------------------------------------------


def read_train_log(model_dir: str | Path) -> list[dict[str, Any]]:
    """Return the entries of train_log.jsonl of a training folder ([] when missing)."""
    path = Path(model_dir) / LOG_NAME
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("skipping an unreadable line of %s: %r", path, line[:80])
    return entries


def _trim_log(model_dir: Path, last_step: int) -> None:
    """Drop log entries after `last_step`: steps a crashed run did after its last checkpoint are done again."""
    entries = [entry for entry in read_train_log(model_dir) if entry.get("step", 0) <= last_step]
    text = "".join(json.dumps(entry) + "\n" for entry in entries)
    atomic_write_bytes(model_dir / LOG_NAME, text.encode("utf-8"))


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Return the bias-corrected exponential moving average of a series (as TensorBoard's smoothing)."""
    smoothed, average = [], 0.0
    for index, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight ** (index + 1)))
    return smoothed


def write_loss_plot(model_dir: str | Path) -> Path | None:
    """Write loss.png from train_log.jsonl; returns None when the log is empty."""
    from augsvhn.plots import save_line_plot

    entries = read_train_log(model_dir)
    if not entries:
        return None
    steps = [entry["step"] for entry in entries]
    losses = [entry["loss"] for entry in entries]
    return save_line_plot(
        {"loss": (steps, losses), "smoothed": (steps, smooth(losses))},
        Path(model_dir) / "loss.png",
        xlabel="step",
        ylabel="loss (mean over the log interval)",
        title=f"training loss, {Path(model_dir).name}",
        logy=min(losses) > 0,
    )


def _write_sample_grid(run: _Run, samples_per_digit: int, use_bf16: bool) -> Path:
    """Write samples.png: `samples_per_digit` EMA samples of each digit, one row per digit, Heun's sampler."""
    from augsvhn.plots import save_image_grid
    from augsvhn.sampling import get_sampler, to_uint8

    labels = torch.arange(NUM_CLASSES).repeat_interleave(samples_per_digit)  # (10 * samples_per_digit,)
    generator = torch.Generator().manual_seed(_seed_of(run.config.seed, _SAMPLES_SEED))
    result = get_sampler("heun")(
        run.ema, run.sde, labels, generator=generator, steps=run.config.sample_steps, device=run.device, bf16=use_bf16
    )
    return save_image_grid(
        to_uint8(result.images),
        run.model_dir / "samples.png",
        nrow=NUM_CLASSES,
        row_labels=[str(digit) for digit in range(NUM_CLASSES)],
        suptitle=f"{model_name(run.cluster)}, EMA at step {run.step}, Heun {result.nfe} NFE",
    )


# ---- entry point ---------------------------------------------------------------------------------------------


def train_cluster(
    workdir: str | Path,
    cluster: int,
    config: TrainConfig,
    progress: bool = True,
    svhn_root: str | Path | None = None,
    distributed: DistributedContext = SINGLE_PROCESS,
) -> TrainResult:
    """Train (or resume training) the denoiser of one cluster in WORKDIR/models/cluster-<k>.

    `progress` shows a tqdm bar on a terminal. `svhn_root` is the SVHN folder (None: $AUGSVHN_SVHN_ROOT, then
    the folder in the workdir's config.json); its training split must be the one the clusters were made from.
    `distributed` is the process group of a torchrun start (see augsvhn.distributed): every rank calls this
    function with the same arguments, runs on `distributed.device` and trains on its share of each batch, and
    rank 0 alone holds the lock and writes files. WORKDIR and the SVHN folder must then be readable by every rank
    at the same path.

    Holds a DirectoryLock on the folder while running. Resumes from checkpoint.pt when it exists, after checking
    that the checkpoint was made with the same model, SDE, loss, optimiser settings, seed, cluster, data and
    augsvhn version; the number of processes that wrote it does not matter. Raises AugsvhnError when a setting
    differs, and when the loss becomes non-finite, in which case the last checkpoint written stays as it was.
    """
    workdir = Path(workdir)
    config.validate()
    device = torch.device(distributed.device) if distributed.active else resolve_device(config.device)
    use_bf16 = config.bf16 if config.bf16 is not None else default_training_bf16(device)
    model_dir = model_dir_of(workdir, cluster)
    is_main = distributed.is_main

    with contextlib.ExitStack() as stack:
        # Rank 0 takes the lock before any rank reads the folder; a failure here stops every rank.
        with distributed.all_or_none():
            if is_main:
                stack.enter_context(DirectoryLock(model_dir, f"train cluster {cluster}"))
                remove_temporary_files(model_dir)

        with distributed.all_or_none():
            data = load_cluster_data(workdir, cluster, svhn_root)
            run = _Run(workdir, cluster, config, data, device, distributed)
            resumed = run.resume()
            run.wrap_for_distributed()
            if is_main:
                _trim_log(model_dir, run.step if resumed else 0)
                atomic_write_json(model_dir / CONFIG_NAME, config.to_dict())
        if len(data.images) < config.batch_size:
            logger.warning(
                "%s has %d training images, fewer than the batch size %d: batches hold %d images",
                model_name(cluster), len(data.images), config.batch_size, run.batch_size,
            )
        logger.info(
            "%s: %s at step %d on %s%s%s, %d images, model %s, SDE %s (sigma_max %.2f), loss %s",
            model_name(cluster), "resuming" if resumed else "starting", run.step, device, " with bf16 autocast" if use_bf16 else "",
            f" and {distributed.world_size - 1} more processes" if distributed.world_size > 1 else "",
            len(data.images), config.model_size, config.sde, run.sigma_max, config.loss,
        )

        result = _train_loop(run, use_bf16, progress)
        logger.info(
            "%s: stopped at step %d (%s), %s of training in total; checkpoint %s",
            model_name(cluster), result.step, result.stop_reason, _format_duration(result.elapsed_s), checkpoint_path(model_dir),
        )

        # Plots and samples on rank 0; the other ranks wait, so that all return with the folder complete.
        with distributed.all_or_none():
            if is_main:
                write_loss_plot(model_dir)
                samples_outdated = result.steps_done > 0 or not (model_dir / "samples.png").exists()
                if config.samples_per_digit > 0 and samples_outdated:
                    _write_sample_grid(run, config.samples_per_digit, use_bf16)
    return result
