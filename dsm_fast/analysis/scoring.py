"""Scoring sets of images by the normalized log p (docs/method.md §3): per-image NLL in bits/dim with one
normalizing constant C for every set (that of the training images), and how well log p — or the typicality
|log p − mean training log p| — tells two sets apart (AUROC)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..evaluate import energies, nll_bits_per_dim, normalizing_constant


def log_p_with_constant(model: nn.Module, sets: dict[str, torch.Tensor], reference: torch.Tensor, t_max: float,
                        t_eval: float, seed: int, data_variance: float = 0.0, batch_size: int = 64
                        ) -> tuple[dict[str, np.ndarray], float]:
    """({name: log p(x) = −U(x, t_eval) − C per sample}, C), C by the t_max protocol on the ``reference`` samples
    (the training images), the same constant for every set."""
    constant = normalizing_constant(model, reference, t_max, torch.Generator().manual_seed(seed), data_variance,
                                    batch_size)
    return {name: -(energies(model, x, t_eval, batch_size) + constant).numpy() for name, x in sets.items()}, constant


def nll_per_image(log_p: np.ndarray, dim: int, quantized: bool) -> np.ndarray:
    return nll_bits_per_dim(torch.from_numpy(log_p), dim, quantized).numpy()


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative) + ½ P(tie): the Mann–Whitney U / (n₊ n₋) from average ranks."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([positive, negative]))
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def separation(log_p_a: np.ndarray, log_p_b: np.ndarray, training_mean: float) -> dict[str, float]:
    """AUROC of calling A 'in distribution' over B, by log p (higher is in) and by typicality (smaller
    |log p − mean training log p| is in; it also flags sets that are *more* likely than the training data)."""
    return {"auroc_log_p": auroc(log_p_a, log_p_b),
            "auroc_typicality": auroc(-np.abs(log_p_a - training_mean), -np.abs(log_p_b - training_mean))}


def plot_histograms(nll: dict[str, np.ndarray], path, training_mean: float | None = None) -> None:
    """Histograms of per-image NLL (bits/dim) of each set on shared bins, the training mean dashed."""
    from .plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    values = np.concatenate(list(nll.values()))
    bins = np.linspace(values.min(), values.max() + 1e-9, 40)
    for name, v in nll.items():
        ax.hist(v, bins=bins, alpha=0.55, label=f"{name} (mean {v.mean():.3f})")
    if training_mean is not None:
        ax.axvline(training_mean, color="k", ls="--", lw=1, label=f"training mean {training_mean:.3f}")
    ax.set(xlabel="NLL (bits/dim)", ylabel="images", title="per-image NLL under the normalized energy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
