"""Generated digits as a torch Dataset, and mixing them with real SVHN at a chosen share.

    from augsvhn import SyntheticSVHN
    synthetic = SyntheticSVHN("runs/shards", transform=torchvision.transforms.ToTensor())
    image, label = synthetic[0]          # like torchvision.datasets.SVHN: (PIL image, int label 0-9)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, WeightedRandomSampler

from augsvhn.errors import DataError
from augsvhn.shards import read_manifest


class SyntheticSVHN(Dataset):
    """The images of a shards folder written by `augsvhn generate`, as (PIL image, label) pairs.

    Only the shards listed in the folder's manifest.json are read, so a folder whose generation is still running
    or was interrupted (no manifest yet) is rejected. HDF5 files are opened on first access in each process and
    reopened after a fork, so the dataset works in a DataLoader with `num_workers` > 0.

    Args:
        root: the shards folder (the --out of `augsvhn generate`).
        clusters: clusters to include; None = all clusters of the manifest.
        transform: applied to the PIL image (RGB, 32 x 32), as in torchvision datasets.
        target_transform: applied to the int label.

    Attributes:
        labels: int64 array (N,) of the digit labels 0-9.
        cluster_of: int64 array (N,) of the cluster each image was generated for.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        clusters: Sequence[int] | None = None,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ):
        self.root = Path(root)
        self.transform = transform
        self.target_transform = target_transform

        manifest = read_manifest(self.root)
        available = sorted({entry["cluster"] for entry in manifest["shards"]})
        if clusters is not None:
            unknown = sorted(set(clusters) - set(available))
            if unknown:
                raise DataError(
                    f"{self.root} has no shards of cluster(s) {', '.join(map(str, unknown))}; "
                    f"it has clusters {', '.join(map(str, available))}"
                )
        self.shards = [entry for entry in manifest["shards"] if clusters is None or entry["cluster"] in clusters]
        self.paths = [self.root / entry["path"] for entry in self.shards]

        # The labels of every shard are read now (one byte per image); images are read on access.
        labels = [self._read_labels(path, entry) for path, entry in zip(self.paths, self.shards)]
        counts = [entry["count"] for entry in self.shards]
        self.labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, dtype=np.int64)
        self.cluster_of = np.repeat([entry["cluster"] for entry in self.shards], counts).astype(np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first item of each shard

        self._files: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    @staticmethod
    def _read_labels(path: Path, entry: dict) -> np.ndarray:
        try:
            with h5py.File(path, "r") as file:
                labels = file["labels"][...]
        except (OSError, KeyError) as error:
            raise DataError(f"cannot read the labels of shard {path}: {error}; run `augsvhn verify`") from error
        if len(labels) != entry["count"]:
            raise DataError(
                f"shard {path} contains {len(labels)} labels, the manifest lists {entry['count']}; run `augsvhn verify`"
            )
        return labels

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} images")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        row = index - int(self._starts[shard])
        try:
            pixels = self._file(shard)["images"][row]  # uint8 (32, 32, 3): RGB
        except (OSError, KeyError, ValueError, RuntimeError) as error:
            raise DataError(
                f"cannot read image {row} of shard {self.paths[shard]}: {error}; run `augsvhn verify {self.root}`"
            ) from error
        image = Image.fromarray(pixels)
        label = int(self.labels[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def _file(self, shard: int) -> h5py.File:
        # An HDF5 handle must not be shared across fork(): DataLoader workers open their own.
        if self._pid != os.getpid():
            self._files = {}
            self._pid = os.getpid()
        if shard not in self._files:
            self._files[shard] = h5py.File(self.paths[shard], "r")
        return self._files[shard]

    def close(self) -> None:
        """Close the HDF5 files this process opened."""
        if self._pid == os.getpid():
            for file in self._files.values():
                file.close()
        self._files = {}

    def __getstate__(self) -> dict:
        # Open HDF5 handles cannot be pickled (DataLoader workers started with "spawn" receive a pickled copy).
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def __repr__(self) -> str:
        clusters = sorted(set(self.cluster_of.tolist()))
        return f"SyntheticSVHN(root={str(self.root)!r}, images={len(self)}, clusters={clusters})"


# ---- mixing real and synthetic images ------------------------------------------------------------


@dataclass
class MixedTrainingSet:
    """Real and synthetic images in one dataset, with a sampler that draws synthetic images at a chosen share.

    `dataset` is ConcatDataset([real, synthetic]): indices below `num_real` are real images. `sampler` draws
    `num_samples` indices per epoch with replacement; each draw is synthetic with probability
    `synthetic_fraction`, and within each part every image is equally likely. Pass both to a DataLoader (or use
    `loader`), so that batches hold on average `synthetic_fraction` synthetic images.
    """

    dataset: ConcatDataset
    sampler: WeightedRandomSampler
    num_real: int
    synthetic_fraction: float

    def loader(self, batch_size: int, **kwargs: Any) -> DataLoader:
        """Return a DataLoader over `dataset` with `sampler`; `kwargs` go to DataLoader (num_workers, ...)."""
        return DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, **kwargs)


def mixed_training_set(
    real_dataset: Dataset,
    synthetic_dataset: Dataset,
    synthetic_fraction: float,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> MixedTrainingSet:
    """Combine real and synthetic images so that a share `synthetic_fraction` of the drawn images is synthetic.

    Both datasets must return items of the same kind (for example (tensor, label) after the same transform).

    Args:
        real_dataset: the real training images, for example data.RealSVHN.
        synthetic_dataset: the generated images, for example SyntheticSVHN.
        synthetic_fraction: probability in [0, 1] that a drawn image is synthetic; 0 = real images only,
            1 = synthetic images only.
        num_samples: images drawn per epoch; None = len(real_dataset) (len(synthetic_dataset) when the fraction
            is 1), so that an epoch takes as many steps as one over the real images.
        generator: random generator of the sampler, for reproducible epochs.

    The share holds per draw, so the synthetic count of a batch of B images is Binomial(B, synthetic_fraction).
    Draws are with replacement: over an epoch some images appear more than once and others not at all.
    """
    if not 0.0 <= synthetic_fraction <= 1.0:
        raise ValueError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}")
    num_real, num_synthetic = len(real_dataset), len(synthetic_dataset)
    if synthetic_fraction < 1 and num_real == 0:
        raise ValueError(f"synthetic_fraction {synthetic_fraction} < 1 needs real images, but real_dataset is empty")
    if synthetic_fraction > 0 and num_synthetic == 0:
        raise ValueError(
            f"synthetic_fraction {synthetic_fraction} > 0 needs synthetic images, but synthetic_dataset is empty"
        )
    if num_samples is None:
        num_samples = num_synthetic if synthetic_fraction == 1 else num_real
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")

    # Weight of one image = share of its part / size of its part, so each part's total weight is its share.
    weights = torch.cat(
        [
            torch.full((num_real,), (1 - synthetic_fraction) / max(num_real, 1), dtype=torch.float64),
            torch.full((num_synthetic,), synthetic_fraction / max(num_synthetic, 1), dtype=torch.float64),
        ]
    )
    sampler = WeightedRandomSampler(weights, num_samples=num_samples, replacement=True, generator=generator)
    dataset = ConcatDataset([real_dataset, synthetic_dataset])
    return MixedTrainingSet(dataset=dataset, sampler=sampler, num_real=num_real, synthetic_fraction=synthetic_fraction)
