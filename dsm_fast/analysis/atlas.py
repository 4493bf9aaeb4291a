"""Log-probability against image content (docs/method.md §3.5): the distribution of test log p with a Gumbel fit, the
images ranked by log p, and log p under contrast and offset changes,

    contrast α:  x ↦ m + α (x − m)   (m the image's mean),        offset β:  x ↦ x + β,

each reported as the mean of log p(x')/d over the images (nats per dimension), log p(x) = −U(x, t) − C.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..evaluate import energies

CONTRASTS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
OFFSETS = (-0.2, -0.1, 0.0, 0.1, 0.2)


def gumbel_fit(values: np.ndarray) -> dict[str, float | str]:
    """Maximum-likelihood Gumbel fit, of maxima ('gumbel_r') or minima ('gumbel_l'), whichever fits better."""
    from scipy import stats

    best = None
    for name in ("gumbel_r", "gumbel_l"):
        family = getattr(stats, name)
        loc, scale = family.fit(values)
        log_likelihood = float(family.logpdf(values, loc, scale).sum())
        if best is None or log_likelihood > best["log_likelihood"]:
            best = {"family": name, "loc": float(loc), "scale": float(scale), "log_likelihood": log_likelihood}
    return best


def transformed(x: torch.Tensor, contrast: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """m + α (x − m) + β, m each sample's mean."""
    mean = x.reshape(len(x), -1).mean(1).view(-1, *([1] * (x.dim() - 1)))
    return mean + contrast * (x - mean) + offset


def log_p_under_changes(model: nn.Module, x: torch.Tensor, t: float, constant: float, contrasts=CONTRASTS,
                        offsets=OFFSETS) -> dict[str, list[dict[str, float]]]:
    """Mean log p/d (nats) of the images after each contrast α and each offset β."""
    d = x[0].numel()

    def mean_log_p(images):
        return float((-(energies(model, images, t) + constant)).mean() / d)

    return {"contrast": [{"contrast": a, "log_p_per_dim": mean_log_p(transformed(x, contrast=a))} for a in contrasts],
            "offset": [{"offset": b, "log_p_per_dim": mean_log_p(transformed(x, offset=b))} for b in offsets]}


def ranked(log_p: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """Indices of the ``count`` highest and lowest log p (most probable first / least probable first) and of
    ``count`` evenly spaced ranks from highest to lowest."""
    order = np.argsort(-log_p)
    return {"highest": order[:count], "lowest": order[::-1][:count].copy(),
            "evenly spaced": order[np.linspace(0, len(order) - 1, count).round().astype(int)]}


def plot_histogram(log_p_per_dim: np.ndarray, fit: dict, changes: dict, path) -> None:
    """Left: histogram of log p/d with the Gumbel density; right: mean log p/d against contrast and offset."""
    from scipy import stats

    from .plots import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.hist(log_p_per_dim, bins=min(40, max(5, len(log_p_per_dim) // 5)), density=True, color="C0", alpha=0.7)
    grid = np.linspace(log_p_per_dim.min(), log_p_per_dim.max(), 200)
    left.plot(grid, getattr(stats, fit["family"]).pdf(grid, fit["loc"], fit["scale"]), color="k",
              label=f"{fit['family']} loc {fit['loc']:.3f}, scale {fit['scale']:.3f}")
    left.set(xlabel="log p(x) / d  (nats)", ylabel="density", title=f"test log p ({len(log_p_per_dim)} samples)")
    left.legend(fontsize=8)
    right.plot([r["contrast"] for r in changes["contrast"]], [r["log_p_per_dim"] for r in changes["contrast"]], "o-",
               label="contrast α (x ↦ m + α(x − m))")
    twin = right.twiny()
    twin.plot([r["offset"] for r in changes["offset"]], [r["log_p_per_dim"] for r in changes["offset"]], "s--",
              color="C1", label="offset β (x ↦ x + β), top axis")
    right.set(xlabel="contrast α", ylabel="mean log p / d  (nats)")
    twin.set_xlabel("offset β")
    right.legend(fontsize=7, loc="lower left")
    twin.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
