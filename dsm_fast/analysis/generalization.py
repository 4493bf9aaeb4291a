"""Strong generalization (docs/method.md §3.5): two models trained on disjoint subsets (``--subset first:N`` and
``--subset last:N``) evaluated on the same images.

Units. A log-probability per dimension in decibels is  dB/dim = (10 / ln 10) · log p(x) / d  (log p in nats), i.e.
10 log₁₀ of the density per dimension; since 1 bit = 10 log₁₀ 2 ≈ 3.0103 dB, 1 dB/dim = 0.3322 bits/dim.
Reported for Δ = log p_A(x) − log p_B(x): mean, mean |Δ| and RMS, in dB/dim and bits/dim (the paper, at N = 100,000:
0.029, 0.11 and 0.19 dB/dim).
"""
from __future__ import annotations

import math

import numpy as np

DB_PER_NAT = 10 / math.log(10)
BITS_PER_DB = 1 / (10 * math.log10(2))  # ≈ 0.3322


def to_db_per_dim(log_p: np.ndarray, d: int) -> np.ndarray:
    """log p (nats) → (10 / ln 10) log p / d, dB per dimension."""
    return DB_PER_NAT * np.asarray(log_p, dtype=float) / d


def compare_log_p(log_p_a: np.ndarray, log_p_b: np.ndarray, d: int) -> dict[str, float]:
    """Mean, mean |·| and RMS of log p_A − log p_B in dB/dim and bits/dim, and their correlation."""
    delta = to_db_per_dim(log_p_a, d) - to_db_per_dim(log_p_b, d)
    out = {"mean_db": float(delta.mean()), "mean_abs_db": float(np.abs(delta).mean()),
           "rms_db": float(np.sqrt(np.square(delta).mean())),
           "correlation": float(np.corrcoef(log_p_a, log_p_b)[0, 1]) if len(delta) > 1 else float("nan")}
    out.update({key.replace("_db", "_bits"): value * BITS_PER_DB for key, value in list(out.items())
                if key.endswith("_db")})
    return out


def plot_scatter(log_p_a: np.ndarray, log_p_b: np.ndarray, d: int, stats: dict, labels: tuple[str, str], path) -> None:
    """log p_B against log p_A in dB/dim with the diagonal."""
    from .plots import pyplot

    plt = pyplot()
    a, b = to_db_per_dim(log_p_a, d), to_db_per_dim(log_p_b, d)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(a, b, s=6, alpha=0.6)
    low, high = min(a.min(), b.min()), max(a.max(), b.max())
    ax.plot([low, high], [low, high], color="k", lw=0.8)
    ax.set(xlabel=f"log p_A  (dB/dim)  {labels[0]}", ylabel=f"log p_B  (dB/dim)  {labels[1]}",
           title=f"mean {stats['mean_db']:.3f}, mean|·| {stats['mean_abs_db']:.3f}, RMS {stats['rms_db']:.3f} dB/dim")
    ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
