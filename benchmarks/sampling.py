"""Speed, memory and sample quality of every sampler at several step counts, for one trained model.

    python benchmarks/sampling.py --model-dir WORKDIR/models/cluster-0 --svhn-root DIR --samples 300 \
        --runs heun:3,5,9,18 dpm2m:5,10,25,50 em:100 pc:100 --guidance 2 --out docs/sampling-benchmark

For each sampler and step count it samples `--samples` digits (labels 0-9 in turn, one fixed seed) and records
images/s, peak memory, the Fréchet distance and label agreement of augsvhn.eval.quality.evaluate_images against
the real test digits, and the achieved GFLOP/s of the network next to the peak GFLOP/s of a large matrix product
in the same precision, measured in the same process. Writes OUT/results.json, OUT/results.md and
OUT/quality-vs-nfe.png.

Peak memory is the resident set size high-water mark of the process on the CPU (Linux: /proc/self/status VmHWM,
reset through /proc/self/clear_refs before each run), and torch.cuda.max_memory_allocated on CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from augsvhn.checkpoints import load_for_sampling
from augsvhn.data import load_svhn
from augsvhn.eval.features import load_or_train_extractor
from augsvhn.eval.quality import evaluate_images, make_reference
from augsvhn.models import forward_gflops
from augsvhn.sampling import expected_nfe, get_sampler, prepare_denoiser, resolve_batch_size, to_uint8

logger = logging.getLogger("augsvhn.benchmarks.sampling")


def parse_runs(values: list[str]) -> list[tuple[str, int]]:
    """Turn ["heun:3,5", "pc:100"] into [("heun", 3), ("heun", 5), ("pc", 100)]."""
    runs = []
    for value in values:
        name, _, steps = value.partition(":")
        if not steps:
            raise SystemExit(f"run {value!r} needs the form SAMPLER:STEPS[,STEPS...], such as heun:9,18")
        runs.extend((name, int(step)) for step in steps.split(","))
    return runs


def reset_peak_memory(device: torch.device) -> None:
    """Reset the peak memory counter: CUDA allocator statistics, or the process's RSS high-water mark on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # 5 resets VmHWM to the current RSS (Linux 4.0 and later)
    except OSError:
        logger.warning("cannot reset the peak RSS; peak memory is the process's maximum so far")


def peak_memory_mib(device: torch.device) -> float:
    """Return the peak memory since `reset_peak_memory` in MiB (see the module docstring for what is counted)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def matmul_peak_gflops(device: torch.device, bf16: bool, size: int = 2048, repeats: int = 5) -> float:
    """Measure the GFLOP/s of a square matrix product in the network's precision (2 size^3 FLOPs per product)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def machine_description() -> dict:
    """Return the CPU model, the core count, the load average and the PyTorch version."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def run_one(denoiser, sde, labels, name: str, steps: int, args, device: torch.device, batch_size: int,
            gflops_per_image: float) -> tuple[dict, np.ndarray]:
    """Sample once with a sampler at `steps` and return its measurements and the uint8 images."""
    reset_peak_memory(device)
    start = time.perf_counter()
    result = get_sampler(name)(
        denoiser, sde, labels, generator=torch.Generator().manual_seed(args.seed), steps=steps,
        guidance=args.guidance, batch_size=batch_size, device=device, bf16=args.bf16,
        channels_last=args.channels_last,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    network_images = result.nfe * len(labels) * (2 if args.guidance > 0 else 1)
    return {
        "sampler": name,
        "steps": steps,
        "nfe": result.nfe,
        "seconds": seconds,
        "images_per_s": len(labels) / seconds,
        "achieved_gflops_per_s": network_images * gflops_per_image / seconds,
        "peak_memory_mib": peak_memory_mib(device),
    }, to_uint8(result.images)


def write_plot(rows: list[dict], path: Path, title: str) -> None:
    """Plot Fréchet distance and label agreement against NFE, one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name in dict.fromkeys(row["sampler"] for row in rows):
        mine = sorted((row for row in rows if row["sampler"] == name), key=lambda row: row["nfe"])
        nfe = [row["nfe"] for row in mine]
        axes[0].plot(nfe, [row["frechet_distance"] for row in mine], marker="o", label=name)
        axes[1].plot(nfe, [row["label_agreement"] for row in mine], marker="o", label=name)
    for axis, label in zip(axes, ("Fréchet distance (digit features)", "label agreement")):
        axis.set_xscale("log")
        axis.set_xlabel("denoiser evaluations per image (NFE)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(results: dict) -> str:
    """Return the table of results.json as Markdown."""
    lines = [
        "| sampler | steps | NFE | images/s | GFLOP/s | peak memory (MiB) | Fréchet distance | label agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["runs"]:
        lines.append(
            f"| {row['sampler']} | {row['steps']} | {row['nfe']} | {row['images_per_s']:.2f} | "
            f"{row['achieved_gflops_per_s']:.1f} | {row['peak_memory_mib']:.0f} | {row['frechet_distance']:.2f} | "
            f"{row['label_agreement']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="training folder with checkpoint.pt")
    parser.add_argument("--svhn-root", required=True, help="folder with train_32x32.mat and test_32x32.mat")
    parser.add_argument("--runs", nargs="+", default=["heun:3,5,9,18", "dpm2m:5,10,25,50", "em:100", "pc:100"],
                        help="SAMPLER:STEPS[,STEPS...] entries")
    parser.add_argument("--samples", type=int, default=300, help="digits per run (FD is biased upwards for few)")
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance weight")
    parser.add_argument("--batch-size", default="auto", help="images per network call, or auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--feature-cache", default=None, help="folder of the cached digit feature net")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # Model, feature net and the real reference.
    denoiser, sde, meta = load_for_sampling(args.model_dir, device)
    gflops_per_image = forward_gflops(denoiser.cpu())
    denoiser = prepare_denoiser(denoiser.to(device), args.channels_last, args.compile)
    train, test = load_svhn(args.svhn_root, "train"), load_svhn(args.svhn_root, "test")
    extractor = load_or_train_extractor(train.images, train.labels, test.images, test.labels, args.feature_cache)
    reference = make_reference(test.images, extractor)
    labels = torch.arange(args.samples) % 10
    batch_size = resolve_batch_size(args.batch_size, denoiser, device, args.guidance, args.bf16, args.channels_last)

    # One run per sampler and step count.
    results = {
        "command": "python benchmarks/sampling.py " + " ".join(os.sys.argv[1:]),
        "machine": machine_description(),
        "model_dir": str(args.model_dir),
        "training_step": meta.get("step"),
        "gflops_per_image": gflops_per_image,
        "matmul_peak_gflops_per_s": matmul_peak_gflops(device, args.bf16),
        "batch_size": batch_size,
        "settings": {k: v for k, v in vars(args).items() if k not in ("runs", "out")},
        "runs": [],
    }
    for name, steps in parse_runs(args.runs):
        logger.info("%s at %d steps (%s NFE) on %d digits", name, steps, expected_nfe(name, steps), args.samples)
        row, images = run_one(denoiser, sde, labels, name, steps, args, device, batch_size, gflops_per_image)
        row.update(evaluate_images(images, labels.numpy(), reference, extractor))
        results["runs"].append(row)
        logger.info("%s", json.dumps(row))
        (out / "results.json").write_text(json.dumps(results, indent=1))
    results["load_average_end"] = os.getloadavg()

    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(render_markdown(results))
    write_plot(results["runs"], out / "quality-vs-nfe.png",
               f"{args.samples} digits, guidance {args.guidance}, {Path(args.model_dir).name} step {meta.get('step')}")
    print(render_markdown(results))


if __name__ == "__main__":
    main()
