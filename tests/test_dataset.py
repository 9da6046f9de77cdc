"""SyntheticSVHN and the real + synthetic mix."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms

from augsvhn import SyntheticSVHN, __version__
from augsvhn.data import RealSVHN
from augsvhn.dataset import mixed_training_set
from augsvhn.errors import DataError
from augsvhn.shards import manifest_entry, shard_relative_path, write_manifest, write_shard


def write_folder(folder, counts={0: (40, 25), 2: (10,)}):
    """Write shards whose pixel (0, 0) stores the item's position and labels (position mod 10); return images."""
    entries, all_images = [], []
    position = 0
    for cluster, shard_counts in counts.items():
        for index, n in enumerate(shard_counts):
            rng = np.random.default_rng(position)
            images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            images[:, 0, 0, 0] = np.arange(position, position + n) % 256
            labels = np.arange(position, position + n) % 10
            attributes = {
                "cluster": cluster, "shard_index": index, "seed": 0, "sampler": "heun", "steps": 18, "nfe": 35,
                "sde": "{}", "guidance": 0.0, "label_mode": "uniform", "checkpoint_sha256": "0" * 64,
                "augsvhn_version": __version__,
            }
            sha256 = write_shard(folder / shard_relative_path(cluster, index), images, labels, attributes)
            entries.append(manifest_entry(cluster, index, sha256, labels))
            all_images.append(images)
            position += n
    write_manifest(folder, entries, {"seed": 0})
    return np.concatenate(all_images)


def test_items_like_torchvision(tmp_path):
    images = write_folder(tmp_path)
    dataset = SyntheticSVHN(tmp_path)
    assert len(dataset) == 75
    for index in (0, 39, 40, 64, 65, 74, -1):
        image, label = dataset[index]
        assert isinstance(image, Image.Image)
        assert image.mode == "RGB"
        assert image.size == (32, 32)
        np.testing.assert_array_equal(np.asarray(image), images[index])
        assert label == (index % 75) % 10
        assert isinstance(label, int)
    with pytest.raises(IndexError):
        dataset[75]


def test_labels_and_clusters(tmp_path):
    write_folder(tmp_path)
    dataset = SyntheticSVHN(tmp_path)
    np.testing.assert_array_equal(dataset.labels, np.arange(75) % 10)
    assert dataset.labels.dtype == np.int64
    np.testing.assert_array_equal(dataset.cluster_of, [0] * 65 + [2] * 10)


def test_cluster_subset(tmp_path):
    images = write_folder(tmp_path)
    dataset = SyntheticSVHN(tmp_path, clusters=[2])
    assert len(dataset) == 10
    np.testing.assert_array_equal(np.asarray(dataset[3][0]), images[68])
    with pytest.raises(DataError, match="no shards of cluster"):
        SyntheticSVHN(tmp_path, clusters=[1])


def test_unfinished_folder_rejected(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(DataError, match="not a finished shards folder"):
        SyntheticSVHN(tmp_path)


def test_torchvision_transforms(tmp_path):
    images = write_folder(tmp_path)
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    dataset = SyntheticSVHN(tmp_path, transform=to_tensor, target_transform=lambda label: label + 100)
    image, label = dataset[5]
    assert image.shape == (3, 32, 32)
    expected = torch.from_numpy(images[5]).permute(2, 0, 1).float() / 255 * 2 - 1  # (3, 32, 32) in [-1, 1]
    torch.testing.assert_close(image, expected)
    assert label == 105


def test_dataloader_workers(tmp_path):
    write_folder(tmp_path)
    dataset = SyntheticSVHN(tmp_path, transform=transforms.PILToTensor())
    dataset[0]  # open a file in the parent process first: workers must not reuse its handle
    loader = DataLoader(dataset, batch_size=16, shuffle=False, num_workers=2)
    images, labels = zip(*loader)
    images, labels = torch.cat(images), torch.cat(labels)
    assert images.shape == (75, 3, 32, 32)
    np.testing.assert_array_equal(labels.numpy(), np.arange(75) % 10)
    np.testing.assert_array_equal(images[:, 0, 0, 0].numpy(), np.arange(75))
    dataset.close()


def test_mixed_share_of_synthetic():
    real = TensorDataset(torch.zeros(300), torch.zeros(300))
    synthetic = TensorDataset(torch.ones(50), torch.ones(50))
    mixed = mixed_training_set(real, synthetic, 0.3, num_samples=20000, generator=torch.Generator().manual_seed(0))
    assert len(mixed.sampler) == 20000
    indices = torch.tensor(list(mixed.sampler))
    share = (indices >= mixed.num_real).float().mean().item()
    # Binomial(20000, 0.3): standard deviation 0.0032 of the share, so 0.3 +- 0.015 is more than 4 of them.
    assert share == pytest.approx(0.3, abs=0.015)
    synthetic_drawn = indices[indices >= 300] - 300
    assert synthetic_drawn.unique().numel() == 50  # every synthetic image is drawn

    values, _ = next(iter(mixed.loader(batch_size=20000)))  # a new epoch: the sampler draws again
    assert values.mean().item() == pytest.approx(0.3, abs=0.015)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_mixed_pure_ends(fraction):
    real = TensorDataset(torch.zeros(30))
    synthetic = TensorDataset(torch.ones(10))
    mixed = mixed_training_set(real, synthetic, fraction)
    indices = torch.tensor(list(mixed.sampler))
    assert len(indices) == (10 if fraction == 1 else 30)
    assert bool(((indices >= 30) == bool(fraction)).all())


def test_mixed_rejects_bad_fraction():
    real, synthetic = TensorDataset(torch.zeros(3)), TensorDataset(torch.zeros(0))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        mixed_training_set(real, synthetic, 1.5)
    with pytest.raises(ValueError, match="needs synthetic images"):
        mixed_training_set(real, synthetic, 0.5)


def test_mixed_with_real_svhn(tmp_path, svhn_root):
    write_folder(tmp_path)
    to_tensor = transforms.ToTensor()
    real = RealSVHN(svhn_root, "train", indices=np.arange(200), transform=to_tensor)
    mixed = mixed_training_set(real, SyntheticSVHN(tmp_path, transform=to_tensor), 0.5,
                               generator=torch.Generator().manual_seed(1))
    images, labels = next(iter(mixed.loader(batch_size=64)))
    assert images.shape == (64, 3, 32, 32)
    assert labels.min() >= 0
    assert labels.max() <= 9


def test_pickle_after_open(tmp_path):
    # DataLoader workers started with "spawn" receive a pickled copy, which must not carry open HDF5 handles.
    import pickle

    images = write_folder(tmp_path)
    dataset = SyntheticSVHN(tmp_path)
    dataset[70]
    copy = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(np.asarray(copy[70][0]), images[70])
    np.testing.assert_array_equal(copy.labels, dataset.labels)
