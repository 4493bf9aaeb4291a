"""Matplotlib (Agg, no display) helpers shared by the analyses: image grids with a label per row."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def pyplot():
    """matplotlib.pyplot on the Agg backend (PNG files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tile(images: torch.Tensor, columns: int) -> np.ndarray:
    """(N, C, H, W) in [0, 1] → one (rows·(H+1) − 1, columns·(W+1) − 1, 3) array, 1-pixel white gaps."""
    images = images.detach().double().clamp(0, 1).cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, _, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.ones((rows * (h + 1) - 1, columns * (w + 1) - 1, 3))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = image.permute(1, 2, 0).numpy()
    return canvas


def save_image_rows(path: str | Path, rows: dict[str, torch.Tensor], columns: int, title: str = "") -> None:
    """One tiled block per labelled row (each (N, C, H, W) in [0, 1]) stacked vertically into a PNG."""
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(4.0, 0.9 * columns), 1.1 * sum(
        -(-len(v) // columns) for v in rows.values()) + 0.4 * len(rows) + 0.3), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows.items()):
        ax.imshow(tile(images, columns), interpolation="nearest")
        ax.set_title(label, fontsize=8, loc="left")
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
