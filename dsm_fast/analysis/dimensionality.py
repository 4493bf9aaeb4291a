"""Effective dimensionality and expected log-probability across noise levels (docs/method.md §3.5):

    d_eff(x, t) = E_ε ‖x − D(x + √t ε, t)‖² / t,      D(y, t) = y − t ∇_y U(y, t),
    E[log p_t(y) | x] = −E_ε U(x + √t ε, t) − C,

over t log-spaced (default 1e-12 … 1e3), each expectation a mean over ``noise_draws`` draws of ε.
For a Gaussian N(0, s² I), d_eff = d s²/(s² + t) on average over x: all d dimensions count while t ≪ s², none
once t ≫ s²; an image density has a few effective dimensions at low noise, where the data are nearly a manifold.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..evaluate import batched
from ..model.energy import energy_and_scores


def noise_levels(t_min: float = 1e-12, t_max: float = 1e3, count: int = 31) -> np.ndarray:
    """t log-spaced over [t_min, t_max]."""
    return np.geomspace(t_min, t_max, count)


def dimensionality_curves(model: nn.Module, x: torch.Tensor, levels, constant: float, generator: torch.Generator,
                          noise_draws: int = 4, batch_size: int = 64, progress: bool = True) -> dict[str, np.ndarray]:
    """Per sample and level: 'd_eff' (n, T) and 'log_p' = E[log p_t(y) | x] (n, T) in nats; 'levels' (T,)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    d = x[0].numel()
    d_eff = np.zeros((len(x), len(levels)))
    log_p = np.zeros((len(x), len(levels)))
    for j, t in enumerate(tqdm(levels, desc="noise levels", disable=not progress, leave=False)):
        for rows in batched(len(x), batch_size):
            xb = x[rows].to(device, dtype)
            t_b = torch.full((len(xb),), float(t), device=device, dtype=dtype)
            for _ in range(noise_draws):
                eps = torch.randn(xb.shape, generator=generator, dtype=torch.float64).to(device, dtype)
                energy, grad_y, _ = energy_and_scores(model, xb + math.sqrt(t) * eps, t_b)
                residual = float(t) * grad_y - math.sqrt(t) * eps  # x − D(y, t), without cancelling x
                d_eff[rows, j] += residual.reshape(len(xb), -1).double().square().sum(1).cpu().numpy() / t
                log_p[rows, j] -= energy.double().cpu().numpy() + constant
    d_eff /= noise_draws
    log_p /= noise_draws
    return {"levels": np.asarray(levels, dtype=float), "d_eff": d_eff, "log_p": log_p, "dim": d}


def plot_dimensionality(result: dict, path, labels: list[str]) -> None:
    """Two panels against t (log scale): d_eff and E[log p_t | x]/d, one line per chosen sample, the average in black."""
    from .plots import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    levels, d = result["levels"], result["dim"]
    for i, label in enumerate(labels):
        left.plot(levels, result["d_eff"][i], lw=0.8, alpha=0.7, label=label)
        right.plot(levels, result["log_p"][i] / d, lw=0.8, alpha=0.7)
    left.plot(levels, result["d_eff"].mean(0), color="k", lw=2, label="dataset average")
    right.plot(levels, result["log_p"].mean(0) / d, color="k", lw=2)
    left.axhline(d, color="0.6", ls="--", lw=0.8)
    left.set(xscale="log", yscale="log", xlabel="noise variance t", ylabel="d_eff = E‖x − D(y, t)‖² / t",
             title=f"effective dimensionality (d = {d})")
    right.set(xscale="log", xlabel="noise variance t", ylabel="E[log p_t(y) | x] / d  (nats)",
              title="expected log-probability per dimension")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
