"""Command-line interface: click commands that parse options and call the pipeline modules."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from augsvhn import __version__

logger = logging.getLogger("augsvhn")

DISTRIBUTED_COMMANDS = ("train", "generate")  # the commands that may run under torchrun


class _Group(click.Group):
    """Click group that reports user-facing errors as one line and exit status 1, without a traceback."""

    def invoke(self, ctx: click.Context):
        from augsvhn.errors import AugsvhnError

        try:
            return super().invoke(ctx)
        except AugsvhnError as error:
            raise click.ClickException(str(error)) from error


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also rejects nan and inf, which pass every range comparison or bound."""

    def convert(self, value, param, ctx):
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="augsvhn")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Make labelled synthetic SVHN digits with score-based diffusion models and measure whether they help."""
    world_size = os.environ.get("WORLD_SIZE", "1")
    if ctx.invoked_subcommand not in DISTRIBUTED_COMMANDS and world_size not in ("", "1"):
        # N copies of a single-process command would write the same files at once.
        raise click.UsageError(
            f"'augsvhn {ctx.invoked_subcommand}' runs in one process, but WORLD_SIZE={world_size}; "
            f"only {' and '.join(DISTRIBUTED_COMMANDS)} run under torchrun"
        )
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


# ---- cluster ---------------------------------------------------------------------------------


def svhn_root_option(**overrides):
    """Return the `--svhn-root DIR` option; the command resolves it with augsvhn.data.resolve_svhn_root."""
    settings = {
        "type": click.Path(file_okay=False, path_type=Path),
        "default": None,
        "help": "Folder with the SVHN format-2 files (train_32x32.mat, test_32x32.mat). "
        "Default: $AUGSVHN_SVHN_ROOT, then the folder stored in WORKDIR/config.json by `augsvhn cluster`.",
    }
    settings.update(overrides)
    return click.option("--svhn-root", "svhn_root", **settings)


def workdir_option(**overrides):
    """Return the required `--workdir DIR` option: the experiment folder shared by the commands."""
    settings = {
        "type": click.Path(file_okay=False, path_type=Path),
        "required": True,
        "help": "Experiment folder (created if missing) that holds config.json, the clusters and the models.",
    }
    settings.update(overrides)
    return click.option("--workdir", "workdir", **settings)


@cli.command("cluster")
@svhn_root_option()
@workdir_option()
@click.option("--k", "k", type=click.IntRange(min=2), default=3, show_default=True, help="Number of colour clusters.")
@click.option(
    "--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True, help="Seed of the k-means starts."
)
@click.option(
    "--n-init", type=click.IntRange(min=1), default=10, show_default=True, help="k-means restarts; the best is kept."
)
@click.option(
    "--bins",
    type=click.IntRange(1, 256),
    default=16,
    show_default=True,
    help="Histogram bins per colour channel over the intensities 0..255.",
)
@click.option(
    "--k-scan/--no-k-scan",
    default=True,
    show_default=True,
    help="Also fit K = 2..6 and report inertia and silhouette score.",
)
@click.option("--download", is_flag=True, help="Download the official train and test files first (needs internet).")
def cluster_command(
    svhn_root: Path | None, workdir: Path, k: int, seed: int, n_init: int, bins: int, k_scan: bool, download: bool
) -> None:
    """Group the training images into K colour clusters (k-means on colour histograms), brightest first."""
    from augsvhn.clusters import DEFAULT_SCAN_KS, HistogramSettings, run_clustering
    from augsvhn.data import download_svhn, resolve_svhn_root

    root = resolve_svhn_root(svhn_root, workdir, must_exist=not download)
    if download:
        download_svhn(root, ("train", "test"))
    clusters, paths = run_clustering(
        root,
        workdir,
        k=k,
        seed=seed,
        n_init=n_init,
        settings=HistogramSettings(bins_per_channel=bins),
        scan_ks=DEFAULT_SCAN_KS if k_scan else (),
    )

    sizes = clusters.sizes
    click.echo(
        f"{clusters.k} clusters of {sizes.sum()} training images from {root} (seed {seed}, {bins} bins per channel)"
    )
    click.echo(f"{'cluster':>7}  {'images':>6}  {'share':>6}  mean colour (R, G, B)")
    for c in range(clusters.k):
        red, green, blue = clusters.mean_colours[c]
        share = sizes[c] / sizes.sum()
        click.echo(f"{c:>7}  {sizes[c]:>6}  {share:>6.1%}  ({red:5.1f}, {green:5.1f}, {blue:5.1f})")

    if clusters.k_scan:
        click.echo("K scan (silhouette score on a fixed random subsample of the images):")
        click.echo(f"{'K':>7}  {'inertia':>10}  silhouette")
        for row in clusters.k_scan:
            click.echo(f"{row['k']:>7}  {row['inertia']:>10.2f}  {row['silhouette']:.4f}")

    click.echo("wrote " + ", ".join(str(path) for path in paths.values()))


# ---- train -----------------------------------------------------------------------------------

# Choices of `augsvhn train`, spelt out so that parsing the command line does not import torch; a test checks
# them against sde.SDE_NAMES, losses.LOSS_NAMES and models.MODEL_SIZES.
TRAIN_SDE_CHOICES = ("ve", "vp", "subvp")
TRAIN_LOSS_CHOICES = ("edm", "dsm")
TRAIN_MODEL_SIZES = ("tiny", "small", "base")


def _train_clusters(workdir: str, value: str) -> list[int]:
    """Return the clusters selected by --cluster ("all" or one index), checked against WORKDIR/clusters.json."""
    from augsvhn.clusters import load_clusters

    from augsvhn.training import POOLED

    k = load_clusters(workdir).k
    allowed = ["all", *(str(cluster) for cluster in range(k)), "pooled"]
    if value == "all":
        return list(range(k))
    if value == "pooled":
        return [POOLED]
    if value not in allowed:
        raise click.BadParameter(
            f"cluster {value!r} does not exist in {workdir}; choose one of {', '.join(allowed)}",
            param_hint="'--cluster'",
        )
    return [int(value)]


@cli.command()
@workdir_option(help="Experiment folder made by `augsvhn cluster`; runs go to WORKDIR/models/cluster-<k>/.")
@svhn_root_option()
@click.option("--cluster", "cluster_option", default="all", show_default=True,
              help="Cluster to train: an index from the clusters file, all (one after the other), or pooled "
                   "(one model on the images of all clusters, in WORKDIR/models/pooled).")
@click.option("--init-from", default=None,
              help="Start from the EMA weights of this checkpoint or training folder, or of the pooled model "
                   "with `pooled`; used only when the run has no checkpoint yet. [default: saved, else random]")
@click.option("--sde", type=click.Choice(TRAIN_SDE_CHOICES), default=None,
              help="Forward SDE. [default: the run's saved setting, else ve]")
@click.option("--sigma-max", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="Largest noise level of the VE SDE. [default: largest distance between two training images]")
@click.option("--loss", type=click.Choice(TRAIN_LOSS_CHOICES), default=None,
              help="Training loss: edm (Karras et al. 2022) or dsm (Song et al. 2021). [default: saved, else edm]")
@click.option("--model-size", type=click.Choice(TRAIN_MODEL_SIZES), default=None,
              help="Size of the U-Net. [default: saved, else tiny]")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many optimiser steps in total. [default: saved, else 20000]")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Stop after this many passes over the cluster's images.")
@click.option("--max-minutes", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="Stop after this many minutes of training of each model, summed over resumed runs. Any of "
                   "--max-steps, --epochs and --max-minutes replaces the whole saved budget (budget options not "
                   "given are unset, so --max-minutes alone drops the default step limit); training stops at the "
                   "first one reached.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per optimiser step; under torchrun, summed over all processes, so it must be "
                   "divisible by their number. [default: saved, else 32]")
@click.option("--lr", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="Adam learning rate. [default: saved, else 0.001]")
@click.option("--label-dropout", type=FiniteFloatRange(min=0, max=1, max_open=True), default=None,
              help="Fraction of labels dropped for classifier-free guidance. [default: saved, else 0.1]")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seed of the initial weights, data order and noise. [default: saved, else 0]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where training runs; auto picks cuda when a GPU is available.")
@click.option("--bf16/--no-bf16", default=None,
              help="bfloat16 autocast of the network. [default: on for cuda and for CPUs with AVX512-BF16 or AMX]")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None,
              help="Steps between checkpoints. [default: saved, else 1000]")
@click.option("--log-every", type=click.IntRange(min=1), default=None,
              help="Steps between log lines. [default: saved, else 50]")
@click.option("--samples-per-digit", type=click.IntRange(min=0), default=None,
              help="EMA samples per digit in samples.png at the end; 0 writes none. [default: saved, else 4]")
def train(workdir, svhn_root, cluster_option, init_from, sde, sigma_max, loss, model_size, max_steps, epochs, max_minutes, batch_size, lr,
          label_dropout, seed, device, bf16, checkpoint_every, log_every, samples_per_digit) -> None:
    """Train the class-conditional denoiser of each selected cluster; rerunning the command resumes it."""
    from augsvhn.distributed import distributed_session
    from augsvhn.training import POOLED, make_train_config, model_dir_of, train_cluster

    clusters = _train_clusters(workdir, cluster_option)
    options = {
        "sde": sde, "sigma_max": sigma_max, "loss": loss, "model_size": model_size, "batch_size": batch_size,
        "lr": lr, "label_dropout": label_dropout, "seed": seed, "checkpoint_every": checkpoint_every,
        "log_every": log_every, "samples_per_digit": samples_per_digit,
        "init_from": str(model_dir_of(workdir, POOLED)) if init_from == "pooled" else init_from,
    }
    overrides = {name: value for name, value in options.items() if value is not None}
    overrides.update(device=device, bf16=bf16)
    if max_steps is not None or epochs is not None or max_minutes is not None:
        overrides.update(max_steps=max_steps, epochs=epochs, max_minutes=max_minutes)

    # Under torchrun, every process runs this command; all of them train each cluster in turn.
    with distributed_session(device) as distributed:
        for cluster in clusters:
            try:
                config = make_train_config(model_dir_of(workdir, cluster), **overrides)
            except ValueError as error:
                raise click.UsageError(str(error)) from error
            result = train_cluster(workdir, cluster, config, svhn_root=svhn_root, distributed=distributed)
            loss_text = f", loss {result.last_loss:.4f}" if result.last_loss is not None else ""
            if distributed.is_main:
                click.echo(
                    f"{'pooled' if cluster == POOLED else f'cluster {cluster}'}: step {result.step} "
                    f"({result.stop_reason}){loss_text}, "
                    f"checkpoint in {result.model_dir}"
                    + (f", {distributed.world_size} processes" if distributed.world_size > 1 else "")
                )



# ---- generate, show, verify ------------------------------------------------------------------


class _SamplerChoice(click.Choice):
    """Choice of sampling.SAMPLER_NAMES, imported (with torch) only when the option is parsed or shown."""

    def __init__(self) -> None:
        super().__init__((), case_sensitive=True)

    @property
    def choices(self) -> tuple[str, ...]:
        from augsvhn.sampling import SAMPLER_NAMES

        return SAMPLER_NAMES

    @choices.setter
    def choices(self, value) -> None:
        pass  # the names come from augsvhn.sampling


class _BatchSize(click.ParamType):
    """A positive number of images, or `auto`."""

    name = "INTEGER|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int) and value >= 1:
            return value
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number < 1:
            self.fail(f"{value!r} is neither a positive integer nor auto", param, ctx)
        return number


class _ClusterList(click.ParamType):
    """Comma-separated cluster indices such as `0,2,3`."""

    name = "LIST"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            clusters = [int(part) for part in str(value).split(",") if part.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of cluster numbers such as 0,2,3", param, ctx)
        if not clusters or min(clusters) < 0:
            self.fail(f"{value!r} must list cluster numbers >= 0, such as 0,2,3", param, ctx)
        return sorted(set(clusters))


@cli.command()
@click.option("--workdir", required=True, type=click.Path(file_okay=False),
              help="Experiment folder with trained models in WORKDIR/models/cluster-<k>/.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder for the shards and manifest.json. Rerunning the same command completes it.")
@click.option("--per-cluster", required=True, type=click.IntRange(min=1), help="Images to generate per cluster.")
@click.option("--sampler", type=_SamplerChoice(), default=None,
              help="Sampler. [default: dpm2m, DPM-Solver++(2M) of Lu et al. 2022]")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Sampler steps. [default: the sampler's own: dpm2m 10, heun 18, pc and em 1000]")
@click.option("--guidance", type=FiniteFloatRange(min=0), default=2.0, show_default=True,
              help="Classifier-free guidance weight w: higher values make digits follow their label more closely, "
                   "at some loss of diversity, and each network evaluation costs two calls; 0 uses the "
                   "conditional model alone at half the cost.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Base seed; shard n of cluster k uses a generator seeded by (seed, k, n).")
@click.option("--batch-size", type=_BatchSize(), default="auto", show_default=True,
              help="Images per network call, or auto (256 on the CPU, the largest that fits 80% of the free memory "
                   "on a GPU); changes speed and memory use. The noise of an image does not depend on it.")
@click.option("--bf16/--no-bf16", default=None,
              help="bfloat16 autocast of the network: faster on GPUs and on CPUs with AVX512-BF16 or AMX, and moves "
                   "pixels by a few levels; recorded in the shards. [default: on for cuda, off for cpu]")
@click.option("--channels-last/--no-channels-last", default=False, show_default=True,
              help="Channels-last memory format of the network (speed only).")
@click.option("--compile/--no-compile", "compile_network", default=False, show_default=True,
              help="torch.compile the network (speed only); compiling takes tens of seconds and needs a C++ "
                   "compiler on the CPU.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Images per shard file.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the networks run; auto picks cuda when a GPU is available.")
@click.option("--clusters", type=_ClusterList(), default=None,
              help="Comma-separated clusters to generate, such as 0,2. [default: every trained cluster]")
@click.option("--label-mode", type=click.Choice(["uniform", "cluster"]), default="uniform", show_default=True,
              help="uniform: balanced digits; cluster: digits as frequent as in the cluster's training images.")
def generate(workdir, out_dir, per_cluster, sampler, steps, guidance, seed, batch_size, bf16, channels_last,
             compile_network, shard_size, device, clusters, label_mode) -> None:
    """Generate labelled digits with each cluster's trained model into HDF5 shards."""
    from augsvhn.distributed import distributed_session
    from augsvhn.generation import DEFAULT_SAMPLER
    from augsvhn.generation import generate as generate_images

    # Under torchrun, every process runs this command and makes its share of the shards.
    with distributed_session(device) as distributed:
        manifest = generate_images(
            workdir, out_dir, per_cluster, sampler=sampler or DEFAULT_SAMPLER, steps=steps, guidance=guidance,
            seed=seed, batch_size=batch_size, shard_size=shard_size,
            device=distributed.device if distributed.active else device, clusters=clusters, label_mode=label_mode,
            bf16=bf16, channels_last=channels_last, compile_network=compile_network,
            rank=distributed.rank, world_size=distributed.world_size, sync_errors=distributed.sync_errors,
        )
        if distributed.is_main:
            click.echo(f"wrote {manifest}" + (f" ({distributed.world_size} processes)" if distributed.active else ""))


# Image formats that `augsvhn show` writes with matplotlib, chosen by the file name's suffix.
SHOW_FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def _image_file_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Reject an --out file name whose suffix is not one of SHOW_FORMATS, before any work is done."""
    suffix = Path(value).suffix.lower()
    if suffix not in SHOW_FORMATS:
        raise click.BadParameter(
            f"{value!r} has {'the suffix ' + repr(suffix) if suffix else 'no suffix'}; use a file name ending in "
            f"{', '.join(SHOW_FORMATS)}, such as grid.png"
        )
    return value


@cli.command()
@click.argument("shards_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), callback=_image_file_name,
              help="Image file to write; its suffix sets the format (.png, .jpg, .jpeg, .pdf or .svg).")
@click.option("--rows-per-cluster", type=click.IntRange(min=1), default=2, show_default=True,
              help="Rows of images shown for each cluster.")
@click.option("--columns", type=click.IntRange(min=1), default=10, show_default=True,
              help="Images per row; column c shows digit c mod 10 where the cluster has one.")
def show(shards_dir, out_path, rows_per_cluster, columns) -> None:
    """Write a grid of generated digits, a few rows per cluster, with each image's label above it."""
    from augsvhn.shards import write_preview_grid

    click.echo(f"wrote {write_preview_grid(shards_dir, out_path, rows_per_cluster, columns)}")


@cli.command()
@click.argument("shards_dir", type=click.Path(exists=True, file_okay=False))
def verify(shards_dir) -> None:
    """Check the shards of SHARDS_DIR against its manifest: checksums, counts, shapes, labels, attributes."""
    from augsvhn.shards import read_manifest, verify_shards

    problems = verify_shards(shards_dir)
    if problems:
        for problem in problems:
            click.echo(problem, err=True)
        raise click.ClickException(
            f"{len(problems)} problem(s) in {shards_dir} (listed above); delete the damaged shard files and rerun "
            f"the generate command that wrote the folder, which writes missing shards again"
        )
    manifest = read_manifest(shards_dir)
    click.echo(f"{shards_dir}: {len(manifest['shards'])} shards, {manifest['total_images']} images, all valid")


def synthetic_dir_option():
    """Return the --synthetic option of the evaluation commands: a shards folder written by `augsvhn generate`."""
    return click.option(
        "--synthetic",
        "synthetic_dir",
        type=click.Path(file_okay=False, exists=True, path_type=Path),
        required=True,
        help="Shards folder written by `augsvhn generate` (with manifest.json).",
    )


# ---- eval-classifier -------------------------------------------------------------------------


def _cluster_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """Parse a comma-separated list of cluster numbers such as "0,2"."""
    if value is None:
        return None
    try:
        clusters = sorted({int(part) for part in value.split(",") if part.strip()})
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of cluster numbers such as 0,2") from None
    if not clusters or min(clusters) < 0:
        raise click.BadParameter(f"{value!r} must list cluster numbers >= 0, such as 0,2")
    return clusters


def _timm_model_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    import timm

    if not timm.is_model(value):
        close = timm.list_models(f"*{value}*")[:8]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise click.BadParameter(f"{value!r} is not a timm model name{hint}")
    return value


@cli.command("eval-classifier")
@svhn_root_option(help="Folder with the SVHN format-2 files (train_32x32.mat, test_32x32.mat). "
                  "Default: $AUGSVHN_SVHN_ROOT.")
@synthetic_dir_option()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Report folder; rerunning with the same settings resumes and skips finished runs.",
)
@click.option(
    "--model",
    default="resnet18",
    show_default=True,
    callback=_timm_model_name,
    help="timm model name, trained from scratch with 10 classes; its stem is adapted to 32x32 where possible.",
)
@click.option(
    "--synthetic-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.5,
    show_default=True,
    help="Share of each batch of the `augmented` arm that is synthetic.",
)
@click.option(
    "--epochs",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Training length in passes over the real train digits, the same number of steps for every arm "
    "[default: 15].",
)
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Training length in optimiser steps (instead of --epochs).",
)
@click.option("--batch-size", type=click.IntRange(min=2), default=128, show_default=True, help="Training batch size.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Seeds per arm (0..K-1).")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Training device."
)
@click.option(
    "--clusters",
    callback=_cluster_list,
    default=None,
    help="Comma-separated synthetic clusters to use, such as 0,2 [default: all].",
)
@click.option(
    "--test-limit",
    type=click.IntRange(min=20),
    default=None,
    help="Score only the first N real test digits, for quick checks [default: all].",
)
def eval_classifier_command(
    svhn_root: Path | None,
    synthetic_dir: Path,
    out_dir: Path,
    model: str,
    synthetic_fraction: float,
    epochs: float | None,
    max_steps: int | None,
    batch_size: int,
    seeds: int,
    device: str,
    clusters: list[int] | None,
    test_limit: int | None,
) -> None:
    """Measure whether synthetic digits help a classifier: four training arms x seeds, scored on test slices.

    Arms: baseline (real digits), classic_augmentation (real digits with blur and photometric changes), augmented
    (real plus synthetic digits) and synthetic_only (Classification Accuracy Score). Writes report.json,
    report.md, plots and one checkpoint per arm and seed to --out.
    """
    from augsvhn.data import resolve_svhn_root
    from augsvhn.eval.experiment import run_experiment

    if epochs is not None and max_steps is not None:
        raise click.UsageError("give either --epochs or --max-steps, not both")
    try:
        report_data = run_experiment(
            resolve_svhn_root(svhn_root),
            synthetic_dir,
            out_dir,
            model=model,
            synthetic_fraction=synthetic_fraction,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            seeds=seeds,
            device=device,
            clusters=clusters,
            test_limit=test_limit,
        )
    except ValueError as error:
        from augsvhn.errors import AugsvhnError

        if isinstance(error, AugsvhnError):  # DataError is also a ValueError; the group prints it as an error
            raise
        raise click.UsageError(str(error)) from error

    all_digits = report_data["slices"]["all"]
    click.echo(f"wrote {out_dir / 'report.md'}")
    for arm in report_data["arms"]:
        click.echo(f"{arm:>22}: {100 * all_digits[arm]['accuracy']:.1f}% on all test digits")


# ---- eval-samples ----------------------------------------------------------------------------


@cli.command("eval-samples")
@svhn_root_option()
@synthetic_dir_option()
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
    help="Report folder for metrics.json and metrics.md (created if missing).",
)  # fmt: skip
@click.option(
    "--n", "samples", type=click.IntRange(min=10), default=2000, show_default=True,
    help="Digits per row and real test digits in the reference (all of them when fewer).",
)  # fmt: skip
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
    help="Device of the feature net and the CAS classifiers.",
)  # fmt: skip
@click.option(
    "--feature-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Folder of cached feature nets [default: $AUGSVHN_CACHE, then ~/.cache/augsvhn].",
)  # fmt: skip
@click.option(
    "--workdir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
    help="Experiment folder with the colour clusters; without it, colours are compared with the whole train split.",
)  # fmt: skip
@click.option(
    "--k", "k", type=click.IntRange(min=1), default=3, show_default=True,
    help="Nearest neighbours of the precision/recall manifolds.",
)  # fmt: skip
@click.option(
    "--cas-steps", type=click.IntRange(min=0), default=280, show_default=True,
    help="Optimiser steps of each Classification Accuracy Score classifier (batch 128); 0 skips CAS.",
)  # fmt: skip
@click.option(
    "--feature-steps", type=click.IntRange(min=1), default=280, show_default=True,
    help="Optimiser steps of the feature net (batch 128); another value trains and caches another net.",
)  # fmt: skip
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Subsampling and CAS seed.")
def eval_samples_command(
    svhn_root: Path | None,
    synthetic_dir: Path,
    out_dir: Path,
    samples: int,
    device: str,
    feature_cache: Path | None,
    workdir: Path | None,
    k: int,
    cas_steps: int,
    feature_steps: int,
    seed: int,
) -> None:
    """Score synthetic digits against the real test split: FD, KID, precision, recall, label agreement, CAS.

    Metrics use the features of a small CNN trained on the real train split (trained once, then cached). Writes
    metrics.json and metrics.md with one row per colour cluster, all clusters together, real train digits,
    held-out real test digits (the floor) and uniform noise (the ceiling).
    """
    from augsvhn.data import resolve_svhn_root
    from augsvhn.eval.classifier import resolve_device
    from augsvhn.eval.features import FeatureNetSettings
    from augsvhn.eval.quality import QualitySettings, run_eval_samples

    try:
        settings = QualitySettings(samples=samples, k=k, cas_steps=cas_steps, seed=seed)
        device = resolve_device(device)
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    metrics = run_eval_samples(
        resolve_svhn_root(svhn_root, workdir),
        synthetic_dir,
        out_dir,
        settings,
        device=device,
        feature_cache=feature_cache,
        workdir=workdir,
        feature_settings=FeatureNetSettings(steps=feature_steps),
    )
    click.echo(f"wrote {out_dir / 'metrics.json'}")
    for name, row in metrics["rows"].items():
        click.echo(
            f"{name:>12}: FD {row['frechet_distance']:.3g}  KID {row['kid']:.3g}  precision {row['precision']:.3f}  "
            f"recall {row['recall']:.3f}  label agreement {row['label_agreement']:.3f}"
        )


def main() -> None:
    cli(prog_name="augsvhn")
