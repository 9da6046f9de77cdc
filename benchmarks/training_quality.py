"""Sample quality against training time: what a longer `augsvhn train` run buys.

    python benchmarks/training_quality.py --workdir WORKDIR --cluster 2 --svhn-root DIR \
        --checkpoints 100,200,400,800 --samples 200 --out docs/training-quality

Trains one cluster's model (or the pooled model, `--cluster pooled`) with augsvhn.training.train_cluster, stopping
at each step count of `--checkpoints` and resuming from there, so the curve is that of a single run. After each
stop it samples `--samples` digits from the EMA weights (Heun, `--sample-steps`, each weight of `--guidance`) and
scores them with augsvhn.eval.quality.evaluate_images against the real test digits. Writes OUT/results.json and
OUT/quality-vs-training.png (Fréchet distance and label agreement against training minutes).
Training settings not given here are TrainConfig's defaults, or those saved in the model folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from augsvhn.checkpoints import load_for_sampling
from augsvhn.data import load_svhn
from augsvhn.eval.features import load_or_train_extractor
from augsvhn.eval.quality import evaluate_images, make_reference
from augsvhn.sampling import get_sampler, to_uint8
from augsvhn.training import POOLED, make_train_config, model_dir_of, train_cluster

logger = logging.getLogger("augsvhn.benchmarks.training_quality")


def sample_quality(model_dir: Path, args, guidance: float, reference, extractor) -> dict:
    """Sample digits 0-9 in turn from a folder's EMA weights and return evaluate_images' metrics."""
    denoiser, sde, _ = load_for_sampling(model_dir, "cpu")
    labels = torch.arange(args.samples) % 10
    start = time.perf_counter()
    result = get_sampler("heun")(denoiser, sde, labels, generator=torch.Generator().manual_seed(args.seed),
                                 steps=args.sample_steps, guidance=guidance, bf16=args.sample_bf16)
    metrics = evaluate_images(to_uint8(result.images), labels.numpy(), reference, extractor)
    metrics["sampling_seconds"] = time.perf_counter() - start
    return metrics


def write_plot(rows: list[dict], path: Path, title: str) -> None:
    """Plot Fréchet distance and label agreement against training minutes (bottom axis) and steps (labels).

    One line per guidance weight; points are labelled with their optimiser step.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [row["elapsed_s"] / 60 for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    weights = list(rows[0]["by_guidance"])
    for axis, key, label in ((axes[0], "frechet_distance", "Fréchet distance (digit features)"),
                             (axes[1], "label_agreement", "label agreement")):
        for weight in weights:
            values = [row["by_guidance"][weight][key] for row in rows]
            axis.plot(minutes, values, marker="o", label=f"guidance {weight}")
        for x, row in zip(minutes, rows):
            axis.annotate(str(row["step"]), (x, row["by_guidance"][weights[0]][key]), fontsize=7,
                          textcoords="offset points", xytext=(2, 4))
        axis.legend(fontsize=7)
        axis.set_xlabel("training minutes (points labelled with optimiser steps)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[1].axhline(0.1, color="grey", linewidth=0.8, linestyle="--")  # chance level of 10 digits
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--svhn-root", required=True)
    parser.add_argument("--cluster", default="0", help="cluster index, or pooled")
    parser.add_argument("--checkpoints", required=True, help="comma-separated step counts at which to evaluate")
    parser.add_argument("--init-from", default=None, help="checkpoint or folder to start from (TrainConfig.init_from)")
    parser.add_argument("--model-size", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--sample-steps", type=int, default=9)
    parser.add_argument("--sample-bf16", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--guidance", default="2", help="comma-separated guidance weights to sample with")
    parser.add_argument("--feature-cache", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    guidances = [float(value) for value in args.guidance.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    cluster = POOLED if args.cluster == "pooled" else int(args.cluster)
    model_dir = model_dir_of(args.workdir, cluster)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_svhn(args.svhn_root, "train"), load_svhn(args.svhn_root, "test")
    extractor = load_or_train_extractor(train.images, train.labels, test.images, test.labels, args.feature_cache)
    reference = make_reference(test.images, extractor)

    overrides = {"samples_per_digit": 0, "epochs": None, "max_minutes": None}
    for name in ("model_size", "batch_size", "lr", "bf16", "init_from"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    rows = []
    for steps in (int(value) for value in args.checkpoints.split(",")):
        config = make_train_config(model_dir, **overrides, max_steps=steps)
        result = train_cluster(args.workdir, cluster, config, progress=False, svhn_root=args.svhn_root)
        row = {"step": result.step, "images_seen": result.images_seen, "elapsed_s": result.elapsed_s,
               "load_average": os.getloadavg()}
        row["by_guidance"] = {f"{weight:g}": sample_quality(model_dir, args, weight, reference, extractor)
                              for weight in guidances}
        rows.append(row)
        logger.info("%s", json.dumps(row))
        results = {"command": "python benchmarks/training_quality.py " + " ".join(os.sys.argv[1:]),
                   "train_config": config.to_dict(), "rows": rows}
        (out / "results.json").write_text(json.dumps(results, indent=1))

    title = f"{model_dir.name}, {config.model_size}, batch {config.batch_size}; {args.samples} digits, Heun " \
            f"{args.sample_steps} steps"
    write_plot(rows, out / "quality-vs-training.png", title)


if __name__ == "__main__":
    main()
