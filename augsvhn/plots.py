"""Image grids and line plots written as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_image_grid(
    images: np.ndarray,
    path: str | Path,
    nrow: int,
    row_labels: Sequence[str] | None = None,
    titles: Sequence[str] | None = None,
    suptitle: str | None = None,
) -> Path:
    """Write uint8 images (N, 32, 32, 3) as a grid of `nrow` rows to a PNG file.

    `row_labels` (one per row) are written left of each row; `titles` (one per image, such as digit labels)
    above each image. Returns the path written.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
    n = images.shape[0]
    ncol = max(1, -(-n // nrow))
    fig, axes = plt.subplots(nrow, ncol, figsize=(0.75 * ncol + 1.2, 0.95 * nrow + 0.6), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if index < n:
            ax.imshow(images[index], interpolation="nearest")
            if titles is not None:
                ax.set_title(str(titles[index]), fontsize=7, pad=1.5)
    if row_labels is not None:
        for row, label in enumerate(row_labels):
            axes[row, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    # Leave the top 0.35 inch to the title, so that it does not cover the first row's titles.
    top = 1 - 0.35 / fig.get_figheight() if suptitle else 1
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    logy: bool = False,
) -> Path:
    """Write one line per entry of `series` ({name: (x, y)}) to a PNG file. Returns the path written."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, (x, y) in series.items():
        x, y = list(x), list(y)
        # A marker keeps a curve of very few points visible (a single point draws no line).
        ax.plot(x, y, label=name, linewidth=1.2, marker="o" if len(x) < 20 else None, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
