"""Faults during real runs: processes killed with SIGKILL, two writers, a full disk, diverging models.

The commands run as real processes (`python -m augsvhn ...`) where a fault must hit a running process, and
through click's CliRunner otherwise. Models are tiny U-Nets trained for a few steps on a 40-digit cluster of the
real SVHN subset, so that each test takes seconds.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from augsvhn import clusters as clusters_module
from augsvhn import losses, shards
from augsvhn.checkpoints import checkpoint_path, load_checkpoint, save_checkpoint
from augsvhn.cli import cli
from augsvhn.data import fingerprint, load_svhn
from augsvhn.fsutil import LOCK_NAME, is_temporary_name
from augsvhn.training import TrainConfig, train_cluster
from augsvhn.workdir import cluster_model_dir, update_config

REPO = Path(__file__).resolve().parents[1]
SMALL_CLUSTER_SIZE = 40  # cluster 0 of the test workdir contains the first 40 real training digits
PROCESS_TIMEOUT_S = 120  # upper bound on a child process; a healthy one needs a few seconds

TRAIN_ARGUMENTS = [
    "--cluster", "0", "--model-size", "tiny", "--batch-size", "4", "--max-steps", "6", "--checkpoint-every", "2",
    "--log-every", "2", "--device", "cpu", "--samples-per-digit", "0", "--lr", "0.001",
]
# One Heun step (one network call per shard) keeps the runs short: the sampler pads every call to 32 images.
GENERATE_ARGUMENTS = [
    "--per-cluster", "4", "--shard-size", "1", "--sampler", "heun", "--steps", "1", "--batch-size", "1",
    "--device", "cpu", "--seed", "5",
]


# ---- helpers ---------------------------------------------------------------------------------------------------


def make_workdir(folder: Path, svhn_root: Path) -> Path:
    """Write a workdir whose cluster 0 contains the first 40 real training digits and cluster 1 the rest."""
    train = load_svhn(svhn_root, "train")
    assignment = np.ones(len(train.labels), dtype=np.int64)
    assignment[:SMALL_CLUSTER_SIZE] = 0
    settings = clusters_module.HistogramSettings()
    clusters_module.save_clusters(
        folder,
        clusters_module.ClusterAssignment(
            k=2, assignment=assignment, centroids=np.zeros((2, settings.num_features)), mean_colours=np.zeros((2, 3)),
            histogram=settings, data_fingerprint=fingerprint(train.images), svhn_root=str(svhn_root), seed=0,
            n_init=1, inertia=0.0,
        ),
    )
    update_config(folder, svhn_root=str(svhn_root))
    return folder


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, svhn_root):
    """A workdir with a tiny model of cluster 0 trained for 2 steps (read-only for the tests)."""
    workdir = make_workdir(tmp_path_factory.mktemp("trained"), svhn_root)
    config = TrainConfig(model_size="tiny", batch_size=4, max_steps=2, lr=1e-3, lr_warmup_images=8,
                         checkpoint_every=2, device="cpu", samples_per_digit=0)
    train_cluster(workdir, 0, config, progress=False)
    return workdir


def start_cli(*arguments: str, **popen_options) -> subprocess.Popen:
    """Start `python -m augsvhn ARGUMENTS` as a child process."""
    return subprocess.Popen(
        [sys.executable, "-m", "augsvhn", *arguments],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen_options,
    )


def wait_until(condition, process: subprocess.Popen, what: str) -> None:
    """Poll `condition` every 5 ms until it holds; fail if `process` exits first or the timeout passes."""
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace")
            pytest.fail(f"the process exited with {process.returncode} before {what}:\n{output}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=PROCESS_TIMEOUT_S)
    assert process.returncode == -signal.SIGKILL


def lock_holder(folder: Path) -> dict:
    """Return the JSON stored in the folder's lock file, or {} while it is missing or being written."""
    try:
        holder = json.loads((folder / LOCK_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def temporary_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.rglob("*") if is_temporary_name(path.name))


def visible_files(folder: Path) -> list[str]:
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in visible_files(folder)}


def assert_no_traceback(result) -> None:
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """Mount a tmpfs of `size` on `folder` (needs root and a kernel that allows it); skip the test otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


# ---- kill -9 and rerun -----------------------------------------------------------------------------------------


def test_generate_kill_and_rerun(trained_workdir, tmp_path):
    """SIGKILL during `generate`, then the same command: the shards equal those of an uninterrupted run.

    While the killed process runs, a second `generate` into its folder is rejected, naming the folder and the
    process; after the kill, the rerun takes over the lock the dead process left.
    """
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    common = ["generate", "--workdir", str(trained_workdir), *GENERATE_ARGUMENTS]
    result = CliRunner().invoke(cli, common + ["--out", str(whole)])
    assert result.exit_code == 0, result.output

    process = start_cli(*common, "--out", str(resumed))
    try:
        wait_until(lambda: "pid" in lock_holder(resumed), process, "the lock was taken")
        second = CliRunner().invoke(cli, common + ["--out", str(resumed)])
        assert process.poll() is None, "the first process finished before the second writer was tried"
        assert second.exit_code == 1
        assert f"{resumed} is in use by another augsvhn run (process {process.pid} on" in second.output
        assert_no_traceback(second)

        first_shard = resumed / shards.shard_relative_path(0, 0)
        wait_until(first_shard.exists, process, "the first shard was written")
        kill(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    # Only complete shards are visible; the lock of the dead process is still there.
    left = visible_files(resumed)
    assert "manifest.json" not in left
    assert 1 <= len(left) < 4
    for name in left:
        assert len(shards.read_shard(resumed / name).images) == 1
    assert lock_holder(resumed)["pid"] == process.pid

    rerun = CliRunner().invoke(cli, common + ["--out", str(resumed)])
    assert rerun.exit_code == 0, rerun.output
    assert folder_bytes(resumed) == folder_bytes(whole)
    assert temporary_files(resumed) == []
    assert not (resumed / LOCK_NAME).exists()
    assert shards.verify_shards(resumed) == []


def test_train_kill_and_rerun(svhn_root, tmp_path):
    """SIGKILL during `train`, then the same command: the weights equal those of an uninterrupted run.

    While the killed process runs, a second `train` of the same cluster is rejected, naming the folder and the
    process.
    """
    straight = make_workdir(tmp_path / "straight", svhn_root)
    resumed = make_workdir(tmp_path / "resumed", svhn_root)
    result = CliRunner().invoke(cli, ["train", "--workdir", str(straight), *TRAIN_ARGUMENTS])
    assert result.exit_code == 0, result.output

    model_dir = cluster_model_dir(resumed, 0)
    process = start_cli("train", "--workdir", str(resumed), *TRAIN_ARGUMENTS)
    try:
        wait_until(lambda: "pid" in lock_holder(model_dir), process, "the lock was taken")
        second = CliRunner().invoke(cli, ["train", "--workdir", str(resumed), *TRAIN_ARGUMENTS])
        assert process.poll() is None, "the first process finished before the second writer was tried"
        assert second.exit_code == 1
        assert f"{model_dir} is in use by another augsvhn run (process {process.pid} on" in second.output
        assert_no_traceback(second)

        wait_until(checkpoint_path(model_dir).exists, process, "the first checkpoint was written")
        kill(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    killed_step = load_checkpoint(checkpoint_path(model_dir))["step"]
    assert killed_step in (2, 4)

    rerun = CliRunner().invoke(cli, ["train", "--workdir", str(resumed), *TRAIN_ARGUMENTS])
    assert rerun.exit_code == 0, rerun.output
    assert "cluster 0: step 6 (max_steps)" in rerun.output
    expected = load_checkpoint(checkpoint_path(cluster_model_dir(straight, 0)))
    actual = load_checkpoint(checkpoint_path(model_dir))
    assert actual["step"] == expected["step"] == 6
    for part in ("model", "ema"):
        for key in expected[part]:
            assert torch.equal(expected[part][key], actual[part][key]), (part, key)
    assert temporary_files(model_dir) == []
    assert not (model_dir / LOCK_NAME).exists()


def test_train_folder_in_use_by_live_process(trained_workdir, tmp_path):
    """A lock held by a live process that is not an augsvhn run is never taken over."""
    model_dir = cluster_model_dir(trained_workdir, 0)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from augsvhn.fsutil import DirectoryLock\n"
         "with DirectoryLock(sys.argv[1], 'test'):\n    print('ready', flush=True); time.sleep(60)",
         str(model_dir)],
        cwd=REPO, stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == b"ready"
        result = CliRunner().invoke(cli, ["train", "--workdir", str(trained_workdir), "--cluster", "0"])
        assert result.exit_code == 1
        assert f"{model_dir} is in use by another augsvhn run (process {holder.pid} on" in result.output
        assert_no_traceback(result)
    finally:
        holder.kill()
        holder.wait()
    assert load_checkpoint(checkpoint_path(model_dir))["step"] == 2


# ---- full disk and unwritable output ---------------------------------------------------------------------------


def test_generate_disk_full(trained_workdir, tmp_path):
    """ENOSPC for real: --out is a 12 KiB tmpfs, too small for the lock file and a shard of 32 images."""
    with tmpfs(tmp_path / "disk", "12k") as out:
        result = CliRunner().invoke(
            cli, ["generate", "--workdir", str(trained_workdir), "--out", str(out), "--per-cluster", "32",
                  "--shard-size", "32", "--sampler", "heun", "--steps", "1", "--device", "cpu"],
        )
        assert result.exit_code == 1, result.output
        assert f"cannot write {out / 'cluster-0' / 'shard-00000.h5'}: No space left on device" in result.output
        assert_no_traceback(result)
        assert visible_files(out) == []
        assert temporary_files(out) == []
        assert not (out / LOCK_NAME).exists()


def test_train_disk_full_keeps_checkpoint(svhn_root, tmp_path):
    """ENOSPC for real: the model folder is a tmpfs with room for the step-2 checkpoint but not for a second one.

    The next checkpoint is written to a temporary file beside the old one, so it fails and the old one stays.
    """
    workdir = make_workdir(tmp_path / "work", svhn_root)
    arguments = ["train", "--workdir", str(workdir), *TRAIN_ARGUMENTS]
    arguments[arguments.index("--max-steps") + 1] = "2"
    assert CliRunner().invoke(cli, arguments).exit_code == 0

    model_dir = cluster_model_dir(workdir, 0)
    saved = {path.name: path.read_bytes() for path in model_dir.iterdir() if path.is_file()}
    size_kib = sum(len(data) for data in saved.values()) // 1024 + 256
    with tmpfs(model_dir, f"{size_kib}k"):
        for name, data in saved.items():
            (model_dir / name).write_bytes(data)
        arguments[arguments.index("--max-steps") + 1] = "4"
        result = CliRunner().invoke(cli, arguments)

        assert result.exit_code == 1, result.output
        assert f"cannot write {checkpoint_path(model_dir)}: No space left on device" in result.output
        assert_no_traceback(result)
        assert load_checkpoint(checkpoint_path(model_dir))["step"] == 2
        assert temporary_files(model_dir) == []
        assert not (model_dir / LOCK_NAME).exists()


def test_train_file_size_limit_keeps_checkpoint(svhn_root, tmp_path):
    """EFBIG for real, without root: `train` runs in a child process whose RLIMIT_FSIZE is below a checkpoint's size.

    The first run writes the step-2 checkpoint without a limit; the second, limited, run fails at step 4.
    """
    import resource

    workdir = make_workdir(tmp_path / "work", svhn_root)
    arguments = ["train", "--workdir", str(workdir), *TRAIN_ARGUMENTS]
    arguments[arguments.index("--max-steps") + 1] = "2"
    assert CliRunner().invoke(cli, arguments).exit_code == 0
    model_dir = cluster_model_dir(workdir, 0)
    checkpoint_bytes = checkpoint_path(model_dir).stat().st_size

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (checkpoint_bytes // 2, checkpoint_bytes // 2))

    arguments[arguments.index("--max-steps") + 1] = "4"
    process = start_cli(*arguments, preexec_fn=limit_file_size)
    output = process.communicate(timeout=PROCESS_TIMEOUT_S)[0].decode(errors="replace")
    assert process.returncode == 1, output
    assert f"Error: cannot write {checkpoint_path(model_dir)}: File too large" in output
    assert "Traceback" not in output
    assert load_checkpoint(checkpoint_path(model_dir))["step"] == 2
    assert temporary_files(model_dir) == []
    assert not (model_dir / LOCK_NAME).exists()


def test_output_under_a_file_rejected(trained_workdir, tmp_path):
    """--out below a regular file: ENOTDIR, reported with the path."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(
        cli, ["generate", "--workdir", str(trained_workdir), "--out", str(blocker / "out"), *GENERATE_ARGUMENTS]
    )
    assert result.exit_code == 1
    assert f"cannot write {blocker / 'out'}: Not a directory" in result.output
    assert_no_traceback(result)


# ---- checkpoints of other settings, and unsafe checkpoints -----------------------------------------------------


def copy_workdir(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target, ignore=shutil.ignore_patterns(LOCK_NAME))
    return target


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [("--model-size", "small", "model size 'tiny' (requested 'small')"),
     ("--sde", "vp", "sde name 've' (requested 'vp')"),
     ("--loss", "dsm", "loss name 'edm' (requested 'dsm')")],
)
def test_train_other_settings_rejected(trained_workdir, tmp_path, option, value, named):
    workdir = copy_workdir(trained_workdir, tmp_path / "work")
    result = CliRunner().invoke(cli, ["train", "--workdir", str(workdir), "--cluster", "0", "--max-steps", "3",
                                      option, value])
    assert result.exit_code == 1
    assert f"checkpoint {checkpoint_path(cluster_model_dir(workdir, 0))} was made with other settings" in result.output
    assert named in result.output
    assert_no_traceback(result)


def rewrite_checkpoint(path: Path, **changes) -> None:
    checkpoint = load_checkpoint(path)
    checkpoint.update(changes)
    save_checkpoint(path, checkpoint)


@pytest.mark.parametrize("command", ["train", "generate"])
def test_other_version_rejected(trained_workdir, tmp_path, command):
    workdir = copy_workdir(trained_workdir, tmp_path / "work")
    rewrite_checkpoint(checkpoint_path(cluster_model_dir(workdir, 0)), augsvhn_version="0.0.1")
    if command == "train":
        arguments = ["train", "--workdir", str(workdir), "--cluster", "0", "--max-steps", "3"]
    else:
        arguments = ["generate", "--workdir", str(workdir), "--out", str(tmp_path / "out"), *GENERATE_ARGUMENTS]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 1
    assert "augsvhn version '0.0.1' (requested '0.1.0')" in result.output
    assert_no_traceback(result)
    assert not (tmp_path / "out" / "cluster-0").exists()


class CreatesFolderWhenUnpickled:
    """Stands in for a malicious payload: unpickling it creates a folder."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_generate_rejects_checkpoint_with_code(trained_workdir, tmp_path):
    workdir = copy_workdir(trained_workdir, tmp_path / "work")
    path = checkpoint_path(cluster_model_dir(workdir, 0))
    checkpoint = load_checkpoint(path)
    checkpoint["payload"] = CreatesFolderWhenUnpickled(tmp_path / "marker")
    torch.save(checkpoint, path)

    result = CliRunner().invoke(
        cli, ["generate", "--workdir", str(workdir), "--out", str(tmp_path / "out"), *GENERATE_ARGUMENTS]
    )
    assert result.exit_code == 1
    assert f"checkpoint {path} contains Python objects other than tensors" in result.output
    assert_no_traceback(result)
    assert not (tmp_path / "marker").exists()


def test_generate_rejects_truncated_checkpoint(trained_workdir, tmp_path):
    workdir = copy_workdir(trained_workdir, tmp_path / "work")
    path = checkpoint_path(cluster_model_dir(workdir, 0))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = CliRunner().invoke(
        cli, ["generate", "--workdir", str(workdir), "--out", str(tmp_path / "out"), *GENERATE_ARGUMENTS]
    )
    assert result.exit_code == 1
    assert f"checkpoint {path} is unreadable or truncated" in result.output
    assert_no_traceback(result)


def test_generate_rejects_mismatched_weights(trained_workdir, tmp_path):
    """A checkpoint whose EMA weights do not fit its model size is reported, not loaded half-way."""
    workdir = copy_workdir(trained_workdir, tmp_path / "work")
    path = checkpoint_path(cluster_model_dir(workdir, 0))
    checkpoint = load_checkpoint(path)
    key = next(iter(checkpoint["ema"]))
    checkpoint["ema"][key] = torch.zeros(3, 3)
    save_checkpoint(path, checkpoint)
    result = CliRunner().invoke(
        cli, ["generate", "--workdir", str(workdir), "--out", str(tmp_path / "out"), *GENERATE_ARGUMENTS]
    )
    assert result.exit_code == 1
    assert f"checkpoint {path}" in result.output
    assert "do not fit" in result.output
    assert_no_traceback(result)


# ---- diverging models ------------------------------------------------------------------------------------------


def test_train_diverging_loss_stops(svhn_root, tmp_path, monkeypatch):
    """A loss that turns NaN at step 3 stops `train` with exit 1; the step-2 checkpoint stays and is finite."""
    workdir = make_workdir(tmp_path / "work", svhn_root)
    real_get_loss = losses.get_loss
    calls = []

    def get_loss_nan_at_step_3(name, sde, **params):
        loss_fn = real_get_loss(name, sde, **params)

        def loss_with_nan(denoiser, x0, labels, generator=None):
            calls.append(1)
            values = loss_fn(denoiser, x0, labels, generator=generator)
            return values * float("nan") if len(calls) == 3 else values

        loss_with_nan.config = loss_fn.config
        return loss_with_nan

    monkeypatch.setattr("augsvhn.training.get_loss", get_loss_nan_at_step_3)
    result = CliRunner().invoke(cli, ["train", "--workdir", str(workdir), *TRAIN_ARGUMENTS])
    assert result.exit_code == 1
    assert "Error: training of cluster 0 stopped: the loss is nan" in result.output
    assert "the last good checkpoint (step 2)" in result.output
    assert_no_traceback(result)

    checkpoint = load_checkpoint(checkpoint_path(cluster_model_dir(workdir, 0)))
    assert checkpoint["step"] == 2
    for part in ("model", "ema"):
        for key, tensor in checkpoint[part].items():
            assert torch.isfinite(tensor).all(), (part, key)


def test_generate_never_writes_non_finite(trained_workdir, tmp_path):
    """A model whose EMA output is NaN makes `generate` fail before any shard is written."""
    workdir = copy_workdir(trained_workdir, tmp_path / "work")
    path = checkpoint_path(cluster_model_dir(workdir, 0))
    checkpoint = load_checkpoint(path)
    for key, tensor in checkpoint["ema"].items():
        if tensor.is_floating_point():
            checkpoint["ema"][key] = torch.full_like(tensor, float("nan"))
    save_checkpoint(path, checkpoint)

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["generate", "--workdir", str(workdir), "--out", str(out), *GENERATE_ARGUMENTS])
    assert result.exit_code == 1
    assert "returned non-finite pixels in 1 of 1 images of cluster-0/shard-00000.h5" in result.output
    assert_no_traceback(result)
    assert visible_files(out) == []
    assert temporary_files(out) == []


# ---- verify ----------------------------------------------------------------------------------------------------


def test_verify_names_each_bad_shard(trained_workdir, tmp_path):
    """A flipped bit in one shard and a shard cut short are both named; the intact shards are not."""
    out = tmp_path / "out"
    arguments = ["generate", "--workdir", str(trained_workdir), "--out", str(out), *GENERATE_ARGUMENTS]
    arguments[arguments.index("--per-cluster") + 1] = "3"
    assert CliRunner().invoke(cli, arguments).exit_code == 0
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code == 0

    flipped, cut = out / shards.shard_relative_path(0, 0), out / shards.shard_relative_path(0, 2)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:1000])

    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 1
    assert "cluster-0/shard-00000.h5: SHA-256" in result.output
    assert "cluster-0/shard-00002.h5: SHA-256" in result.output
    assert "cluster-0/shard-00002.h5: cannot read shard" in result.output
    assert "shard-00001.h5" not in result.output
    assert_no_traceback(result)


# ---- the dataset while a writer appends shards -----------------------------------------------------------------

WRITER_SCRIPT = """
import sys, time
import numpy as np
from augsvhn import __version__
from augsvhn.shards import manifest_entry, shard_relative_path, write_manifest, write_shard

out, rounds = sys.argv[1], int(sys.argv[2])
entries = []
for index in range(rounds):
    rng = np.random.default_rng(index)
    count = 20 + index % 7
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(count) + index) % 10
    attributes = {"cluster": 0, "shard_index": index, "seed": 1, "sampler": "heun", "steps": 2, "nfe": 3,
                  "sde": "{}", "guidance": 0.0, "label_mode": "uniform", "checkpoint_sha256": "0" * 64,
                  "augsvhn_version": __version__}
    sha256 = write_shard(f"{out}/{shard_relative_path(0, index)}", images, labels, attributes)
    entries.append(manifest_entry(0, index, sha256, labels))
    write_manifest(out, entries, {"seed": 1})
    print(index, flush=True)
    time.sleep(0.02)
"""


def as_list(batch):
    return batch


def test_dataset_while_writer_appends(tmp_path):
    """SyntheticSVHN with 2 DataLoader workers reads a folder while another process appends shards.

    Every reader sees exactly the shards of the manifest it opened: items decode, counts and labels match.
    """
    from augsvhn.dataset import SyntheticSVHN

    out = tmp_path / "shards"
    rounds = 60
    writer = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(out), str(rounds)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert writer.stdout.readline().strip() == b"0"
        sizes_seen = []
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while time.monotonic() < deadline:
            dataset = SyntheticSVHN(out)
            listed = len(dataset.shards)
            expected_labels = np.concatenate([(np.arange(20 + i % 7) + i) % 10 for i in range(listed)])
            assert len(dataset) == len(expected_labels)
            assert np.array_equal(dataset.labels, expected_labels)

            loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=2, collate_fn=as_list)
            items = [item for batch in loader for item in batch]
            assert [label for _, label in items] == expected_labels.tolist()
            assert all(image.size == (32, 32) and image.mode == "RGB" for image, _ in items)
            sizes_seen.append(listed)
            if listed == rounds:
                break
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == 0, writer.stderr.read().decode(errors="replace")
    assert sizes_seen[-1] == rounds
    assert len(set(sizes_seen)) >= 2, "the readers never overlapped with the writer"


# ---- bad input files through the CLI ---------------------------------------------------------------------------


def one_line_error(result, path: Path) -> str:
    """Check that a command failed with exit 1 and one error line naming `path`; return that line."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    assert str(path) in errors[0]
    return errors[0]


def real_mat_bytes(svhn_root: Path, tmp_path: Path) -> bytes:
    import scipy.io

    train = load_svhn(svhn_root, "train")
    labels = np.where(train.labels[:20] == 0, 10, train.labels[:20])[:, None]  # (20, 1), digit 0 stored as 10
    scipy.io.savemat(tmp_path / "valid.mat", {"X": train.images[:20].transpose(1, 2, 3, 0), "y": labels})
    return (tmp_path / "valid.mat").read_bytes()


@pytest.mark.parametrize(
    ("case", "problem"),
    [("truncated", "is truncated or not a MATLAB file"), ("random bytes", "is truncated or not a MATLAB file"),
     ("images channels first", "X has shape (3, 32, 32, 20); expected (32, 32, 3, N)"),
     ("labels out of range", "labels outside 1..10"), ("no labels", "has no variable 'y'")],
)
def test_cluster_bad_mat_file(svhn_root, tmp_path, case, problem):
    import scipy.io

    root = tmp_path / "svhn"
    root.mkdir()
    path = root / "train_32x32.mat"
    valid = real_mat_bytes(svhn_root, tmp_path)
    train = load_svhn(svhn_root, "train")
    images = train.images[:20].transpose(1, 2, 3, 0)  # (32, 32, 3, 20) as stored
    if case == "truncated":
        path.write_bytes(valid[: len(valid) // 3])
    elif case == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif case == "images channels first":
        scipy.io.savemat(path, {"X": train.images[:20].transpose(3, 1, 2, 0), "y": np.ones((20, 1))})
    elif case == "labels out of range":
        scipy.io.savemat(path, {"X": images, "y": np.full((20, 1), 11)})
    else:
        scipy.io.savemat(path, {"X": images})

    result = CliRunner().invoke(cli, ["cluster", "--svhn-root", str(root), "--workdir", str(tmp_path / "work"),
                                      "--no-k-scan", "--n-init", "1"])
    assert problem in one_line_error(result, path)


def write_shards_folder(folder: Path, count: int = 2) -> Path:
    from augsvhn import __version__

    entries = []
    for index in range(count):
        images = np.full((4, 32, 32, 3), 40 * index, dtype=np.uint8)
        labels = np.arange(4)
        attributes = {"cluster": 0, "shard_index": index, "seed": 1, "sampler": "heun", "steps": 2, "nfe": 3,
                      "sde": "{}", "guidance": 0.0, "label_mode": "uniform", "checkpoint_sha256": "0" * 64,
                      "augsvhn_version": __version__}
        sha256 = shards.write_shard(folder / shards.shard_relative_path(0, index), images, labels, attributes)
        entries.append(shards.manifest_entry(0, index, sha256, labels))
    shards.write_manifest(folder, entries, {"seed": 1})
    return folder


def test_shard_without_images_dataset(tmp_path):
    import h5py

    folder = write_shards_folder(tmp_path / "shards")
    path = folder / shards.shard_relative_path(0, 1)
    with h5py.File(path, "a") as file:
        del file["images"]

    verify = CliRunner().invoke(cli, ["verify", str(folder)])
    assert verify.exit_code == 1
    assert "cluster-0/shard-00001.h5: shard" in verify.output
    assert "lacks the dataset 'images'" in verify.output
    assert "shard-00000.h5" not in verify.output
    assert "Traceback" not in verify.output

    show = CliRunner().invoke(cli, ["show", str(folder), "--out", str(tmp_path / "grid.png")])
    assert "lacks the dataset 'images'" in one_line_error(show, path)


def test_shard_with_wrong_shape(tmp_path):
    import h5py

    folder = write_shards_folder(tmp_path / "shards")
    path = folder / shards.shard_relative_path(0, 0)
    with h5py.File(path, "a") as file:
        del file["images"]
        file["images"] = np.zeros((4, 3, 32, 32), dtype=np.uint8)  # channels first

    verify = CliRunner().invoke(cli, ["verify", str(folder)])
    assert verify.exit_code == 1
    assert "cluster-0/shard-00000.h5: images are uint8 (4, 3, 32, 32), expected uint8 (n, 32, 32, 3)" in verify.output
    assert "Traceback" not in verify.output


def test_manifest_lists_missing_shard(tmp_path):
    folder = write_shards_folder(tmp_path / "shards")
    missing = folder / shards.shard_relative_path(0, 1)
    missing.unlink()

    verify = CliRunner().invoke(cli, ["verify", str(folder)])
    assert verify.exit_code == 1
    assert "cluster-0/shard-00001.h5: shard file is missing" in verify.output
    assert "Traceback" not in verify.output

    show = CliRunner().invoke(cli, ["show", str(folder), "--out", str(tmp_path / "grid.png"), "--columns", "10"])
    one_line_error(show, missing)


@pytest.mark.parametrize("text", ["{not json", '{"format": "augsvhn-shards", "format_version": 1, "shards": 3}'])
def test_manifest_malformed(tmp_path, text):
    folder = write_shards_folder(tmp_path / "shards")
    manifest = folder / shards.MANIFEST_NAME
    manifest.write_text(text)
    verify = CliRunner().invoke(cli, ["verify", str(folder)])
    assert verify.exit_code == 1
    assert str(manifest) in verify.output.splitlines()[0]
    assert "Traceback" not in verify.output

    show = CliRunner().invoke(cli, ["show", str(folder), "--out", str(tmp_path / "grid.png")])
    one_line_error(show, manifest)


def test_clusters_file_corrupt(trained_workdir, tmp_path):
    workdir = copy_workdir(trained_workdir, tmp_path / "work")
    npz = workdir / clusters_module.CLUSTERS_NPZ
    npz.write_bytes(npz.read_bytes()[:100])
    result = CliRunner().invoke(cli, ["train", "--workdir", str(workdir), "--cluster", "0"])
    assert "does not match" in one_line_error(result, npz)


def test_clusters_file_from_other_data(trained_workdir, tmp_path):
    """Clusters made from other digits (here: another fingerprint) are rejected before training starts."""
    workdir = copy_workdir(trained_workdir, tmp_path / "work")
    metadata_path = workdir / clusters_module.CLUSTERS_JSON
    metadata = json.loads(metadata_path.read_text())
    metadata["data_fingerprint"] = "f" * 64
    metadata_path.write_text(json.dumps(metadata))
    result = CliRunner().invoke(cli, ["train", "--workdir", str(workdir), "--cluster", "0", "--max-steps", "3"])
    assert "clusters file made from other data" in one_line_error(result, metadata_path)
    assert load_checkpoint(checkpoint_path(cluster_model_dir(workdir, 0)))["step"] == 2
