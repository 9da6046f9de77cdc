"""Multi-process training and generation through real `torchrun` with 2 CPU processes (Gloo), on real SVHN digits.

The torchrun tests bind the rendezvous to this machine only (--standalone) and give each process one thread.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import augsvhn
from augsvhn import clusters as clusters_module
from augsvhn import distributed, shards
from augsvhn.checkpoints import checkpoint_path, load_checkpoint, load_for_sampling
from augsvhn.data import fingerprint, load_svhn
from augsvhn.errors import AugsvhnError
from augsvhn.fsutil import DirectoryLock
from augsvhn.generation import generate
from augsvhn.losses import get_loss
from augsvhn.sde import get_sde
from augsvhn.training import TrainConfig, _RankSliceDenoiser, train_cluster
from augsvhn.workdir import cluster_model_dir, update_config

PACKAGE_DIR = Path(augsvhn.__file__).parent
CLUSTER_SIZE = 40  # cluster 0: the first 40 real training digits, 5 global batches of 8 per epoch
TRAIN_OPTIONS = ["--cluster", "0", "--model-size", "tiny", "--batch-size", "8", "--lr", "0.001", "--device", "cpu",
                 "--no-bf16", "--checkpoint-every", "2", "--log-every", "1", "--samples-per-digit", "0"]


def tiny_config(max_steps: int) -> TrainConfig:
    """The settings of TRAIN_OPTIONS (and the defaults the command line leaves unchanged) as a TrainConfig."""
    return TrainConfig(model_size="tiny", batch_size=8, lr=1e-3, max_steps=max_steps, checkpoint_every=2,
                       log_every=1, samples_per_digit=0, device="cpu", bf16=False)


def torchrun(*arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `augsvhn <arguments>` in 2 processes started by torchrun, with a rendezvous on this machine only."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               "-m", "augsvhn", *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run the in-process steps on one thread, like each torchrun process, so that a busy machine stays fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_split(svhn_root):
    return load_svhn(svhn_root, "train")


@pytest.fixture(scope="module")
def make_workdir(tmp_path_factory, svhn_root, train_split):
    """Return a function that writes a workdir whose cluster 0 contains the first 40 real training digits."""

    def make(name: str):
        workdir = tmp_path_factory.mktemp(name)
        assignment = np.ones(len(train_split.labels), dtype=np.int64)
        assignment[:CLUSTER_SIZE] = 0
        settings = clusters_module.HistogramSettings()
        assignment_record = clusters_module.ClusterAssignment(
            k=2, assignment=assignment, centroids=np.zeros((2, settings.num_features)),
            mean_colours=np.zeros((2, 3)), histogram=settings, data_fingerprint=fingerprint(train_split.images),
            svhn_root=str(svhn_root), seed=0, n_init=1, inertia=0.0,
        )
        clusters_module.save_clusters(workdir, assignment_record)
        update_config(workdir, svhn_root=str(svhn_root))
        return workdir

    return make


@pytest.fixture(scope="module")
def one_process_run(make_workdir):
    """Workdir with a 1-process run of 4 steps, and the checkpoint of that run after its first step."""
    workdir = make_workdir("one")
    train_cluster(workdir, 0, tiny_config(max_steps=1), progress=False)
    first = load_checkpoint(checkpoint_path(cluster_model_dir(workdir, 0)))
    train_cluster(workdir, 0, tiny_config(max_steps=4), progress=False)
    return workdir, first


def relative_distance(checkpoint: dict, reference: dict, start: dict) -> float:
    """Return ||w - w_ref|| / ||w_ref - w_start|| over the model weights: 0 when the runs agree."""
    difference = sum(float((checkpoint["model"][key] - reference["model"][key]).square().sum())
                     for key in reference["model"])
    travelled = sum(float((reference["model"][key] - start["model"][key]).square().sum())
                    for key in reference["model"])
    return (difference / travelled) ** 0.5


# ---- the torchrun environment and the single-process context -------------------------------------------------


def test_environment_absent_is_single_process():
    assert distributed.torchrun_environment({}) is None


def test_environment_parsed():
    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "node-a", "MASTER_PORT": "29500"}
    values = distributed.torchrun_environment(environ)
    assert (values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]) == (3, 4, 1)
    assert values["MASTER_ADDR"] == "node-a"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "0"}, "not WORLD_SIZE"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK=2"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "invalid"),
    ],
)
def test_environment_invalid_rejected(environ, message):
    with pytest.raises(AugsvhnError, match=message):
        distributed.torchrun_environment(environ)


def test_process_device_on_cpu():
    assert distributed.process_device("cpu", local_rank=5) == "cpu"
    if not torch.cuda.is_available():
        assert distributed.process_device("auto", local_rank=0) == "cpu"
        with pytest.raises(AugsvhnError, match="no CUDA device"):
            distributed.process_device("cuda", local_rank=0)


def test_single_process_context_reraises():
    context = distributed.SINGLE_PROCESS
    assert context.is_main and not context.active
    with pytest.raises(KeyError):
        with context.all_or_none():
            raise KeyError("x")
    assert torch.equal(context.mean(torch.tensor([1.0, 3.0])), torch.tensor([1.0, 3.0]))
    assert context.broadcast_float(2.5) == 2.5


def test_rank_slices_reproduce_full_batch_loss():
    # With the generator in the same state, each rank's slice of the per-image loss equals the rows of the
    # single-process loss, and the mean of the two slice means equals the full-batch mean.
    torch.manual_seed(0)
    network = torch.nn.Conv2d(3, 3, 3, padding=1)

    def denoiser(x, sigma, labels):
        return network(x) / (1 + sigma.reshape(-1, 1, 1, 1))

    denoiser.sigma_data = 0.5
    loss_fn = get_loss("edm", get_sde("ve", sigma_max=10.0))
    x0, labels = torch.rand(8, 3, 32, 32) * 2 - 1, torch.arange(8)
    full = loss_fn(denoiser, x0, labels, generator=torch.Generator().manual_seed(3))
    slice_means = []
    for rank in (0, 1):
        part = slice(4 * rank, 4 * rank + 4)
        rank_denoiser = _RankSliceDenoiser(denoiser, part, 0.5)
        sliced = loss_fn(rank_denoiser, x0, labels, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(sliced[part], full[part], rtol=1e-6, atol=0)
        slice_means.append(sliced[part].mean())
    assert torch.allclose(torch.stack(slice_means).mean(), full.mean(), rtol=1e-6)


# ---- torchrun training ---------------------------------------------------------------------------------------


def test_resume_one_to_two_processes(make_workdir, one_process_run):
    reference_dir, start = one_process_run
    reference = load_checkpoint(checkpoint_path(cluster_model_dir(reference_dir, 0)))
    workdir = make_workdir("one_then_two")
    train_cluster(workdir, 0, tiny_config(max_steps=2), progress=False)

    result = torchrun("train", "--workdir", str(workdir), "--max-steps", "4", *TRAIN_OPTIONS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("cluster 0: step 4 (max_steps)") == 1  # printed by rank 0 only
    checkpoint = load_checkpoint(checkpoint_path(cluster_model_dir(workdir, 0)))
    assert checkpoint["step"] == 4
    assert checkpoint["images_seen"] == 4 * 8  # the global batch is 8 images, 4 per process
    # Both processes trained on the images and noise of the single-process run, so the weights follow its path.
    assert relative_distance(checkpoint, reference, start) < 1e-3
    log_lines = (cluster_model_dir(workdir, 0) / "train_log.jsonl").read_text().splitlines()
    log_steps = [json.loads(line)["step"] for line in log_lines]
    assert log_steps == [1, 2, 3, 4]  # one line per step, written once
    denoiser, _, meta = load_for_sampling(cluster_model_dir(workdir, 0))
    assert meta["step"] == 4


def test_resume_two_to_one_process(make_workdir, one_process_run):
    reference_dir, start = one_process_run
    reference = load_checkpoint(checkpoint_path(cluster_model_dir(reference_dir, 0)))
    workdir = make_workdir("two_then_one")

    result = torchrun("train", "--workdir", str(workdir), "--max-steps", "2", *TRAIN_OPTIONS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(checkpoint_path(cluster_model_dir(workdir, 0)))["step"] == 2

    train_cluster(workdir, 0, tiny_config(max_steps=4), progress=False)
    checkpoint = load_checkpoint(checkpoint_path(cluster_model_dir(workdir, 0)))
    assert checkpoint["step"] == 4
    assert relative_distance(checkpoint, reference, start) < 1e-3
    # Another seed moves the weights elsewhere, so the threshold above can fail.
    other = make_workdir("other_seed")
    train_cluster(other, 0, TrainConfig(**{**tiny_config(max_steps=4).to_dict(), "seed": 1}), progress=False)
    assert relative_distance(load_checkpoint(checkpoint_path(cluster_model_dir(other, 0))), reference, start) > 0.1


# ---- torchrun generation -------------------------------------------------------------------------------------


def test_generate_two_processes_byte_identical(one_process_run, tmp_path):
    workdir, _ = one_process_run
    options = ["--workdir", str(workdir), "--per-cluster", "13", "--shard-size", "3", "--sampler", "heun",
               "--steps", "2", "--seed", "5", "--device", "cpu", "--clusters", "0"]
    single = tmp_path / "single"
    generate(workdir, single, 13, sampler="heun", steps=2, seed=5, shard_size=3, device="cpu", clusters=[0],
             progress=False)

    result = torchrun("generate", "--out", str(tmp_path / "two"), *options)
    assert result.returncode == 0, result.stderr[-3000:]
    single_files = sorted(path.relative_to(single) for path in single.rglob("*.h5"))
    two_files = sorted(path.relative_to(tmp_path / "two") for path in (tmp_path / "two").rglob("*.h5"))
    assert len(single_files) == 5  # shards of 3, 3, 3, 3 and 1 images: ranks make 3 and 2 of them
    assert two_files == single_files
    for relative in single_files:
        assert (tmp_path / "two" / relative).read_bytes() == (single / relative).read_bytes(), relative
    single_manifest, two_manifest = shards.read_manifest(single), shards.read_manifest(tmp_path / "two")
    assert [entry["sha256"] for entry in two_manifest["shards"]] == [entry["sha256"] for entry in
                                                                     single_manifest["shards"]]
    assert shards.verify_shards(tmp_path / "two") == []


def test_generate_locked_folder_stops_all_ranks(one_process_run, tmp_path):
    workdir, _ = one_process_run
    out = tmp_path / "locked"
    with DirectoryLock(out, "another generate"):
        result = torchrun("generate", "--workdir", str(workdir), "--out", str(out), "--per-cluster", "2",
                          "--steps", "2", "--device", "cpu", timeout=90)
    assert result.returncode != 0
    # Rank 0's own message can be cut off when torchrun stops it after rank 1 exits, but rank 1 repeats it.
    assert f"{out} is in use by another augsvhn run" in result.stderr
    assert "Error: rank 0 failed, so rank 1 stops too" in result.stderr
    assert f'File "{PACKAGE_DIR}' not in result.stderr  # no traceback from augsvhn, only torchrun's summary
    assert not (out / "manifest.json").exists()
