"""The generate loop: trained cluster models -> labelled synthetic digits in HDF5 shards.

Shard n of cluster k draws all of its randomness from one generator seeded by (seed, k, n) alone
(`sampling.shard_generator`): first its labels, then the initial and per-step noise of the sampler. The batch
size, the order in which shards are made, interruptions and the number of processes therefore cannot change a
shard's bytes on a given device type and library version.

NOTE: the tests check byte-identical shards across batch sizes on the CPU only. On a GPU, convolution kernels
chosen per batch size may round differently, which can change a pixel by one level.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from augsvhn import __version__
from augsvhn.errors import AugsvhnError, DataError
from augsvhn.fsutil import DirectoryLock, remove_temporary_files
from augsvhn.shards import (
    SHARD_ATTRIBUTES,
    file_sha256,
    list_complete_shards,
    manifest_entry,
    read_shard,
    read_shard_info,
    shard_relative_path,
    write_manifest,
    write_shard,
)

logger = logging.getLogger("augsvhn.generation")

# Sampler used when --sampler is not given. On a well-trained tiny model, DPM-Solver++(2M) with 10 steps (10 NFE)
# came within 1.09x of the Fréchet distance of the predictor-corrector sampler at 2,001 NFE. It also scored no worse
# than Heun's method at up to 49 NFE (benchmarks/sampling.py, docs/benchmarks.md).
DEFAULT_SAMPLER = "dpm2m"
LABEL_MODES = ("uniform", "cluster")
NUM_CLASSES = 10

# Shard attributes that must match the requested settings for an existing shard to be kept.
_SETTING_ATTRIBUTES = ("seed", "sampler", "steps", "guidance", "label_mode", "bf16", "checkpoint_sha256")


@dataclass(frozen=True)
class GenerationSettings:
    """Settings that determine the contents of the shards, stored in the manifest and checked on reruns."""

    per_cluster: int  # images per cluster
    shard_size: int  # images per shard; the last shard of a cluster contains the remainder
    seed: int  # base seed; shard n of cluster k uses sampling.shard_generator(seed, k, n)
    sampler: str  # name in sampling.SAMPLER_NAMES
    steps: int  # sampler steps (the sampler's default when the user gave none); 0 = chosen by the solver ("ode")
    guidance: float  # classifier-free guidance weight w; 0 = plain conditional model
    label_mode: str  # "uniform": balanced digits; "cluster": the cluster's own digit frequencies
    bf16: bool = False  # bfloat16 autocast of the network: faster, and moves pixels by a few levels

    def shard_counts(self) -> list[int]:
        """Return the number of images in each shard of one cluster."""
        shards = math.ceil(self.per_cluster / self.shard_size)
        return [min(self.shard_size, self.per_cluster - n * self.shard_size) for n in range(shards)]


@dataclass
class ClusterModel:
    """A trained model of one cluster; `load` returns (denoiser, sde, meta) and is called only when needed."""

    cluster: int
    checkpoint_sha256: str
    load: Callable[[], tuple[torch.nn.Module, Any, dict]]
    _loaded: tuple | None = field(default=None, repr=False)


# ---- labels ------------------------------------------------------------------------------------


def draw_labels(
    generator: torch.Generator, count: int, label_mode: str, label_counts: Sequence[int] | None = None
) -> torch.Tensor:
    """Draw the digit labels (LongTensor (count,)) of one shard from `generator`.

    "uniform": every digit appears floor(count/10) or ceil(count/10) times, in random order, and the digits that
    get the extra image are a random run of consecutive digits. "cluster": labels are drawn independently with
    probabilities proportional to `label_counts`, the digit counts of the cluster's training images.
    """
    if label_mode == "uniform":
        offset = int(torch.randint(NUM_CLASSES, (1,), generator=generator))
        balanced = (torch.arange(count) + offset) % NUM_CLASSES
        return balanced[torch.randperm(count, generator=generator)]
    if label_mode == "cluster":
        if label_counts is None or len(label_counts) != NUM_CLASSES or sum(label_counts) <= 0:
            raise AugsvhnError(
                f"label mode 'cluster' needs the 10 digit counts of the cluster's training images, got "
                f"{label_counts!r}; use --label-mode uniform or retrain the model"
            )
        probabilities = torch.tensor([float(c) for c in label_counts], dtype=torch.float64)
        return torch.multinomial(probabilities, count, replacement=True, generator=generator)
    raise ValueError(f"unknown label mode {label_mode!r}; choose one of {', '.join(LABEL_MODES)}")


# ---- one shard ---------------------------------------------------------------------------------


def sample_shard(
    denoiser: torch.nn.Module,
    sde: Any,
    settings: GenerationSettings,
    cluster: int,
    shard_index: int,
    count: int,
    label_counts: Sequence[int] | None,
    batch_size: int,
    device: str,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Sample the images of one shard. Returns uint8 images (n, 32, 32, 3), uint8 labels (n,) and the NFE.

    Raises AugsvhnError if the sampler returns non-finite values.
    """
    from augsvhn import sampling

    generator = sampling.shard_generator(settings.seed, cluster, shard_index)
    labels = draw_labels(generator, count, settings.label_mode, label_counts)
    result = sampling.get_sampler(settings.sampler)(
        denoiser,
        sde,
        labels,
        generator=generator,
        steps=settings.steps or None,
        guidance=settings.guidance,
        batch_size=batch_size,
        device=device,
        progress=progress,
        bf16=settings.bf16,
    )
    if not torch.isfinite(result.images).all():
        bad = int((~torch.isfinite(result.images)).flatten(1).any(1).sum())
        raise AugsvhnError(
            f"sampler {settings.sampler!r} returned non-finite pixels in {bad} of {count} images of "
            f"{shard_relative_path(cluster, shard_index)}; nothing was written for this shard. The model of cluster "
            f"{cluster} may have diverged, or {settings.steps} steps may be too few for this sampler"
        )
    images = sampling.to_uint8(result.images)
    return images, labels.numpy().astype(np.uint8), int(result.nfe)


def shard_attributes(
    settings: GenerationSettings, cluster: int, shard_index: int, checkpoint_sha256: str, sde: Any, nfe: int
) -> dict[str, Any]:
    """Return the attributes stored in a shard (see shards.SHARD_ATTRIBUTES)."""
    attributes = {
        "cluster": int(cluster),
        "shard_index": int(shard_index),
        "seed": int(settings.seed),
        "sampler": settings.sampler,
        "steps": int(settings.steps),
        "nfe": int(nfe),
        "sde": sde_json(sde),
        "guidance": float(settings.guidance),
        "label_mode": settings.label_mode,
        "bf16": bool(settings.bf16),
        "checkpoint_sha256": checkpoint_sha256,
        "augsvhn_version": __version__,
    }
    assert set(SHARD_ATTRIBUTES) <= set(attributes)
    return attributes


def sde_json(sde: Any) -> str:
    """Return the SDE's config as compact JSON with sorted keys, the form stored in shards and the manifest."""
    return json.dumps(sde.config(), sort_keys=True, separators=(",", ":"))


# ---- the loop ----------------------------------------------------------------------------------


def generate_shards(
    models: Sequence[ClusterModel],
    out_dir: str | Path,
    settings: GenerationSettings,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    sync_errors: Callable[[BaseException | None], None] | None = None,
) -> Path:
    """Write the shards of `models` that `out_dir` lacks, then the manifest. Returns the manifest path.

    Shards already in `out_dir` are kept when they were made with the same settings and checkpoint. A shard made
    with other settings raises AugsvhnError naming the setting that differs. With `world_size` > 1, the i-th
    missing shard (in cluster, then index order) is made by rank i % world_size, rank 0 holds the folder lock
    and writes the manifest once every rank has finished, and the ranks wait for each other with one of:
    - `sync_errors(error_or_none)`: called by every rank after each phase with its exception or None. It must
      wait for all ranks and raise on every rank when any rank failed, as DistributedContext.sync_errors does,
      so that no rank waits forever for a rank that failed;
    - `barrier()`: waits for all ranks but carries no errors (for example threading.Barrier.wait in tests).
    """
    out_dir = Path(out_dir)
    if world_size > 1 and barrier is None and sync_errors is None:
        raise ValueError("generate_shards with world_size > 1 needs a barrier or sync_errors function")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")

    def finish_phase(error: BaseException | None) -> None:
        if sync_errors is not None:
            sync_errors(error)
        elif error is not None:
            raise error
        elif barrier is not None:
            barrier()

    lock = DirectoryLock(out_dir, "generate") if rank == 0 else None
    try:
        # Plan: every shard of every cluster, minus the complete ones with matching settings. Every rank plans
        # before the ranks synchronise, while no rank writes, so that all ranks split the same list of missing
        # shards. A failure of rank 0 (folder locked, say) reaches the other ranks through sync_errors.
        done: set[tuple[int, int]] = set()
        error = None
        try:
            if lock is not None:
                lock.acquire()
                _remove_interrupted_writes(out_dir)
            done = _check_existing_shards(out_dir, models, settings)
        except Exception as caught:
            error = caught
        finish_phase(error)

        counts = settings.shard_counts()
        plan = [(model, n, count) for model in models for n, count in enumerate(counts)]
        missing = [(model, n, count) for model, n, count in plan if (model.cluster, n) not in done]
        mine = missing[rank::world_size]
        if done:
            logger.info("%s: keeping %d complete shards, making %d", out_dir, len(done), len(missing))

        error = None
        try:
            _make_shards(mine, out_dir, settings, batch_size, device, progress and rank == 0)
        except Exception as caught:
            error = caught
        finish_phase(error)

        manifest_path = out_dir / "manifest.json"
        error = None
        try:
            if rank == 0:
                manifest_path = _write_manifest(out_dir, models, settings)
        except Exception as caught:
            error = caught
        if sync_errors is not None or error is not None:
            finish_phase(error)
        return manifest_path
    finally:
        if lock is not None:
            lock.release()


def _make_shards(
    tasks: list[tuple[ClusterModel, int, int]],
    out_dir: Path,
    settings: GenerationSettings,
    batch_size: int,
    device: str,
    progress: bool,
) -> None:
    bar = tqdm(
        total=sum(count for _, _, count in tasks),
        unit="img",
        desc="generate",
        disable=None if progress else True,
        dynamic_ncols=True,
    )
    previous = None
    with bar:
        for model, shard_index, count in tasks:
            if previous is not None and previous is not model:
                previous._loaded = None  # free the previous cluster's network (and GPU memory)
            previous = model
            denoiser, sde, meta = _load(model)
            bar.set_description(f"cluster {model.cluster} shard {shard_index}", refresh=False)
            start, started_at = bar.n, time.perf_counter()
            images, labels, nfe = sample_shard(
                denoiser,
                sde,
                settings,
                model.cluster,
                shard_index,
                count,
                meta.get("label_counts"),
                batch_size,
                device,
                progress=_shard_progress(bar, settings, count),
            )
            attributes = shard_attributes(settings, model.cluster, shard_index, model.checkpoint_sha256, sde, nfe)
            write_shard(out_dir / shard_relative_path(model.cluster, shard_index), images, labels, attributes)
            bar.n = start + count
            bar.refresh()
            seconds = time.perf_counter() - started_at
            logger.info("wrote %s: %d images, %d NFE, %.1f images/s", shard_relative_path(model.cluster, shard_index),
                        count, nfe, count / max(seconds, 1e-9))
    if previous is not None:
        previous._loaded = None


def _shard_progress(bar: tqdm, settings: GenerationSettings, count: int) -> Callable[[int], None]:
    """Return a sampler progress callback that advances `bar` by the share of the shard's NFE done, in images."""
    from augsvhn import sampling

    expected = sampling.expected_nfe(settings.sampler, settings.steps or None)
    start = bar.n

    def report(nfe: int) -> None:
        if expected:
            bar.n = start + count * min(nfe, expected) // expected
        bar.set_postfix_str(f"nfe {nfe}" + (f"/{expected}" if expected else ""), refresh=False)
        bar.update(0)

    return report


def _prepared(load: Callable[[], tuple], channels_last: bool, compile_network: bool) -> Callable[[], tuple]:
    """Wrap a ClusterModel loader so that the denoiser it returns goes through sampling.prepare_denoiser."""
    from augsvhn.sampling import prepare_denoiser

    def load_prepared() -> tuple:
        denoiser, sde, meta = load()
        return prepare_denoiser(denoiser, channels_last, compile_network), sde, meta

    return load_prepared


def _load(model: ClusterModel) -> tuple[torch.nn.Module, Any, dict]:
    if model._loaded is None:
        model._loaded = model.load()
    return model._loaded


def _remove_interrupted_writes(out_dir: Path) -> None:
    folders = [out_dir] + [path for path in out_dir.glob("cluster-*") if path.is_dir()]
    for folder in folders:
        for path in remove_temporary_files(folder):
            logger.info("deleted %s, left by an interrupted run", path)


def _check_existing_shards(
    out_dir: Path, models: Sequence[ClusterModel], settings: GenerationSettings
) -> set[tuple[int, int]]:
    """Return (cluster, index) of the shards on disk that this run keeps; raise if one does not belong to it."""
    counts = settings.shard_counts()
    checkpoints = {model.cluster: model.checkpoint_sha256 for model in models}
    requested = {
        "seed": settings.seed,
        "sampler": settings.sampler,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "label_mode": settings.label_mode,
        "bf16": settings.bf16,
    }
    advice = "use a new --out folder, or the settings of the existing shards"

    done = set()
    for cluster, index, path in list_complete_shards(out_dir):
        relative = path.relative_to(out_dir).as_posix()
        if cluster not in checkpoints:
            raise AugsvhnError(
                f"{out_dir} contains {relative}, but this run generates clusters "
                f"{', '.join(str(k) for k in sorted(checkpoints))}; {advice}"
            )
        if index >= len(counts):
            raise AugsvhnError(
                f"{out_dir} contains {relative}, but --per-cluster {settings.per_cluster} with --shard-size "
                f"{settings.shard_size} makes {len(counts)} shard(s) per cluster; {advice}"
            )

        try:
            count, attributes = read_shard_info(path)
        except DataError as error:
            raise DataError(f"{error}. Delete {path} and run the command again to regenerate it") from error
        for key in _SETTING_ATTRIBUTES:
            requested_value = checkpoints[cluster] if key == "checkpoint_sha256" else requested[key]
            if attributes.get(key) != requested_value:
                requested_text = "the model checkpoint" if key == "checkpoint_sha256" else f"{key}={requested_value!r}"
                raise AugsvhnError(
                    f"{path} was made with {key}={attributes.get(key)!r}, but this run requests {requested_text}; "
                    f"{advice}"
                )
        if count != counts[index]:
            raise AugsvhnError(
                f"{path} contains {count} images, but --per-cluster {settings.per_cluster} with "
                f"--shard-size {settings.shard_size} needs {counts[index]} in this shard; {advice}"
            )
        done.add((cluster, index))
    return done


def _write_manifest(out_dir: Path, models: Sequence[ClusterModel], settings: GenerationSettings) -> Path:
    entries = []
    clusters = {}
    for model in models:
        sde = None
        for index in range(len(settings.shard_counts())):
            path = out_dir / shard_relative_path(model.cluster, index)
            if not path.is_file():
                raise AugsvhnError(f"{path} is missing after generation; run the same command again to make it")
            shard = read_shard(path)
            entries.append(manifest_entry(model.cluster, index, file_sha256(path), shard.labels))
            sde = shard.attributes["sde"]
        clusters[str(model.cluster)] = {"checkpoint_sha256": model.checkpoint_sha256, "sde": sde}

    manifest_settings = {
        "per_cluster": settings.per_cluster,
        "shard_size": settings.shard_size,
        "seed": settings.seed,
        "sampler": settings.sampler,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "label_mode": settings.label_mode,
        "bf16": settings.bf16,
        "clusters": clusters,
    }
    path = write_manifest(out_dir, entries, manifest_settings)
    logger.info("%s: %d shards, %d images", path, len(entries), sum(entry["count"] for entry in entries))
    return path


# ---- from a workdir ------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """Turn "auto" into "cuda" when a GPU is available and "cpu" otherwise; reject "cuda" without a GPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AugsvhnError(f"device {device!r} requested but PyTorch sees no CUDA GPU; use --device cpu")
    return device


def trained_clusters(workdir: str | Path) -> list[int]:
    """Return the clusters that have a checkpoint in WORKDIR/models/cluster-<k>/, sorted."""
    from augsvhn.checkpoints import checkpoint_path

    models_dir = Path(workdir) / "models"
    clusters = []
    if models_dir.is_dir():
        for path in models_dir.iterdir():
            match = re.fullmatch(r"cluster-(\d+)", path.name)
            if match and checkpoint_path(path).is_file():
                clusters.append(int(match.group(1)))
    return sorted(clusters)


def _current_cluster_sizes(workdir: str | Path) -> np.ndarray | None:
    """Return the image count of each cluster in the workdir's clusters file, or None where there is no file.

    Models copied without their clusters file have None here, and only the checkpoint checks apply to them.
    """
    from augsvhn.clusters import load_clusters

    try:
        return load_clusters(workdir).sizes
    except DataError:
        return None


def _reject_unknown_clusters(workdir: str | Path, clusters: Sequence[int], cluster_sizes: np.ndarray) -> None:
    """Raise AugsvhnError for requested clusters beyond the K of the workdir's clusters file."""
    k = len(cluster_sizes)
    unknown = [c for c in clusters if c >= k]
    if unknown:
        raise AugsvhnError(
            f"cluster(s) {', '.join(map(str, unknown))} do not exist: the clusters of {workdir} are 0 to {k - 1}; "
            f"choose --clusters among them"
        )


def _check_model_matches_cluster(model_dir: Path, cluster: int, cluster_size: int) -> None:
    """Raise AugsvhnError when a cluster's model was trained on another number of images than the cluster has.

    A changed count means the clusters file was replaced after training, so the model learnt another cluster.
    NOTE: an equal count does not prove the same images. `augsvhn cluster` rejects replacing the clusters of a
    workdir with trained cluster models, which covers the usual way to get there.
    """
    from augsvhn.checkpoints import checkpoint_path, load_checkpoint

    path = checkpoint_path(model_dir)
    trained_on = sum(int(count) for count in load_checkpoint(path)["label_counts"])
    if trained_on != cluster_size:
        raise AugsvhnError(
            f"the model in {model_dir} was trained on {trained_on} images, but cluster {cluster} of the current "
            f"clusters file has {cluster_size}: the clusters changed after training. Retrain it with "
            f"`augsvhn train --cluster {cluster}`, or generate from the workdir it was trained in"
        )


def cluster_models(workdir: str | Path, clusters: Sequence[int] | None, device: str) -> list[ClusterModel]:
    """Return a ClusterModel for each requested cluster (all trained ones when `clusters` is None)."""
    from augsvhn.checkpoints import checkpoint_path, checkpoint_sha256, load_for_sampling
    from augsvhn.workdir import cluster_model_dir

    trained = trained_clusters(workdir)
    if clusters is None:
        if not trained:
            raise AugsvhnError(f"no trained models in {Path(workdir) / 'models'}; run `augsvhn train` first")
        clusters = trained
    cluster_sizes = _current_cluster_sizes(workdir)
    if cluster_sizes is not None:
        _reject_unknown_clusters(workdir, clusters, cluster_sizes)
    untrained = [k for k in clusters if k not in trained]
    if untrained:
        raise AugsvhnError(
            f"no checkpoint for cluster(s) {', '.join(map(str, untrained))} in {Path(workdir) / 'models'} "
            f"(trained: {', '.join(map(str, trained)) or 'none'}); train them first or leave them out of --clusters"
        )

    models = []
    for k in sorted(set(clusters)):
        model_dir = cluster_model_dir(workdir, k)
        if cluster_sizes is not None:
            _check_model_matches_cluster(model_dir, k, int(cluster_sizes[k]))
        models.append(
            ClusterModel(
                cluster=k,
                checkpoint_sha256=checkpoint_sha256(checkpoint_path(model_dir)),
                load=lambda model_dir=model_dir: load_for_sampling(model_dir, device),
            )
        )
    return models


def default_steps(sampler: str) -> int:
    """Return the number of steps `sampler` uses when none is given; 0 where its solver chooses them ("ode")."""
    from augsvhn import sampling

    return int(sampling.DEFAULT_STEPS[sampler] or 0)


def generate(
    workdir: str | Path,
    out_dir: str | Path,
    per_cluster: int,
    sampler: str = DEFAULT_SAMPLER,
    steps: int | None = None,
    guidance: float = 2.0,
    seed: int = 0,
    batch_size: int | str = "auto",
    shard_size: int = 1000,
    device: str = "auto",
    clusters: Sequence[int] | None = None,
    label_mode: str = "uniform",
    bf16: bool | None = None,
    channels_last: bool = False,
    compile_network: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    sync_errors: Callable[[BaseException | None], None] | None = None,
) -> Path:
    """Generate `per_cluster` labelled images with each cluster's trained model into shards in `out_dir`.

    Args:
        workdir: experiment folder with trained models in WORKDIR/models/cluster-<k>/.
        out_dir: output folder (see augsvhn.shards for its layout); rerunning the same command keeps complete
            shards and makes only the missing ones.
        per_cluster: images per cluster.
        sampler: name in sampling.SAMPLER_NAMES.
        steps: sampler steps; None = the sampler's default.
        guidance: classifier-free guidance weight w; 0 = plain conditional model. The default 2 raised label
            agreement from about 0.55 to 0.94 on a well-trained tiny model (docs/benchmarks.md), at twice the cost.
        seed: base seed of the per-shard generators.
        batch_size: images per denoiser call, or "auto" (sampling.auto_batch_size); changes speed and memory,
            never the images.
        shard_size: images per shard file.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        clusters: clusters to generate; None = every cluster with a trained model.
        label_mode: "uniform" (balanced digits) or "cluster" (the cluster's own digit frequencies).
        bf16: bfloat16 autocast of the network; None = sampling.default_bf16(device). Recorded in the shards.
        channels_last: channels-last weights and activations, for speed only.
        compile_network: torch.compile the network, for speed only; its first call compiles for tens of seconds.
        progress: show a progress bar (only on a terminal).
        rank, world_size, barrier, sync_errors: split the shards over processes (see `generate_shards`).

    Returns the path of the manifest.
    """
    from augsvhn import sampling

    if sampler not in sampling.SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(sampling.SAMPLER_NAMES)}")
    if label_mode not in LABEL_MODES:
        raise ValueError(f"unknown label mode {label_mode!r}; choose one of {', '.join(LABEL_MODES)}")
    if batch_size != "auto":
        batch_size = sampling.resolve_batch_size(batch_size, None, "cpu")  # raises ValueError below 1
    for name, value in (("per_cluster", per_cluster), ("shard_size", shard_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")

    device = resolve_device(device)
    settings = GenerationSettings(
        per_cluster=per_cluster,
        shard_size=shard_size,
        seed=seed,
        sampler=sampler,
        steps=default_steps(sampler) if steps is None else steps,
        guidance=float(guidance),
        label_mode=label_mode,
        bf16=sampling.default_bf16(device) if bf16 is None else bool(bf16),
    )
    models = cluster_models(workdir, clusters, device)
    if channels_last or compile_network:
        for model in models:
            model.load = _prepared(model.load, channels_last, compile_network)
    if batch_size == "auto":
        denoiser = _load(models[0])[0] if models else None
        batch_size = sampling.resolve_batch_size("auto", denoiser, device, guidance, settings.bf16, channels_last)
        logger.info("batch size auto: %d images per network call on %s", batch_size, device)
    return generate_shards(
        models, out_dir, settings, batch_size, device, progress, rank, world_size, barrier, sync_errors
    )
