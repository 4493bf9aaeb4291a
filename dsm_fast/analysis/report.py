"""Pictures of a training run, written into RUN/plots/ at the end of ``train`` and by ``dsm-fast plots RUN``:

- ``loss.png``: the logged loss and its space and time terms against the step (log-scaled), from stats.jsonl;
- ``loss_per_noise_level.png``: the held-out mean of each term at t log-spaced over the run's [t_min, t_max],
  space(t) = E‖√t ∇_y U − ε‖²/d and time(t) = E(t ∂_t U/d − ½ + ‖ε‖²/(2d))² (the terms of dsm_fast/losses.py);
- ``denoise.png`` (images only): noisy / denoised rows at a few input PSNRs above the clean row,
  D(y, t) = y − t ∇_y U (analysis/denoising.py);
- ``plots.json``: the numbers behind the three.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..evaluate import batched
from ..losses import objective_terms
from ..model.energy import energy_and_scores

PSNRS = (30.0, 20.0, 10.0, 0.0)  # dB, the grid's rows
TERMS = ("loss", "space", "time", "classification")


def read_stats(run_dir: str | Path) -> dict[str, list[float]]:
    """The logged rows of RUN/stats.jsonl as columns: 'step' and whichever loss terms were logged."""
    path = Path(run_dir) / "stats.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return {key: [row[key] for row in rows] for key in ("step", *TERMS) if rows and key in rows[0]}


def loss_per_noise_level(model: nn.Module, x: torch.Tensor, levels, generator: torch.Generator,
                         with_time: bool = True, batch_size: int = 64) -> dict[str, list[float]]:
    """Mean space (and, ``with_time``, time) term of held-out samples x at each t of ``levels``, one noise draw
    per sample."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    out: dict[str, list[float]] = {"t": [float(t) for t in levels], "space": [], "time": []}
    for t in levels:
        sums = {"space": 0.0, "time": 0.0}
        for rows in batched(len(x), batch_size):
            xb = x[rows].to(device, dtype)
            t_b = torch.full((len(xb),), float(t), device=device, dtype=dtype)
            eps = torch.randn(xb.shape, generator=generator, dtype=torch.float64).to(device, dtype)
            _, grad_y, grad_t = energy_and_scores(model, xb + math.sqrt(t) * eps, t_b)
            terms = objective_terms("dual", grad_y, grad_t, eps, t_b)
            for key in sums:
                sums[key] += float(terms[key].double().sum())
        for key, total in sums.items():
            out[key].append(total / len(x))
    if not with_time:
        out.pop("time")
    return out


def plot_loss_curve(stats: dict[str, list[float]], path: Path) -> None:
    from .plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in zip(TERMS, ("k-", "C0-", "C1-", "C2-")):
        if key in stats:
            ax.plot(stats["step"], stats[key], style, lw=1.5 if key == "loss" else 1, label=key)
    ax.set(xscale="log", yscale="log", xlabel="step", ylabel="batch mean", title="training loss (logged rows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_per_noise_level(curve: dict[str, list[float]], path: Path, t_range: tuple[float, float]) -> None:
    from .plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("space", "C0o-"), ("time", "C1o-")):
        if key in curve:
            ax.plot(curve["t"], curve[key], style, ms=3, label=f"{key} term")
    ax.axhline(1.0, color="0.6", ls="--", lw=1, label="space term of D(y) = y (no denoising)")
    ax.axvspan(*t_range, color="0.93", zorder=0, label="trained noise levels")
    ax.set(xscale="log", yscale="log", xlabel="noise variance t", ylabel="held-out mean",
           title="loss per noise level")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evenly_spaced(x: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` rows of x spread over it (held-out patches come photo by photo: the first ones look alike)."""
    return x[torch.linspace(0, len(x) - 1, min(count, len(x))).round().long().unique()]


def write_run_plots(run_dir: str | Path, model: nn.Module, cfg, x: torch.Tensor, seed: int = 0,
                    images: int = 32, levels: int = 25, show: int = 8) -> Path:
    """Write the three pictures and plots.json into RUN/plots/ for ``model`` trained as ``cfg``, evaluated on
    ``images`` (and ``show`` in the grid) of the held-out samples ``x`` (images in [0, 1], or GSM vectors), spread
    over x; returns the folder."""
    from ..evaluate import denoising_psnr
    from .denoising import denoise_grid
    from .plots import save_image_rows

    folder = Path(run_dir) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    x = evenly_spaced(x, images)
    stats = read_stats(run_dir)
    if stats:
        plot_loss_curve(stats, folder / "loss.png")
    low, high = math.log10(cfg.t_min), math.log10(cfg.t_max)
    grid = np.logspace(low - 1, high, levels)  # a decade below t_min too: what the run was not trained on
    curve = loss_per_noise_level(model, x, grid, torch.Generator().manual_seed(seed), cfg.objective == "dual")
    plot_loss_per_noise_level(curve, folder / "loss_per_noise_level.png", (cfg.t_min, cfg.t_max))
    payload = {"loss_curve": stats, "loss_per_noise_level": curve}
    if x.dim() == 4:
        shown = evenly_spaced(x, show)
        rows = denoise_grid(model, shown, PSNRS, torch.Generator().manual_seed(seed + 1))
        save_image_rows(folder / "denoise.png", rows, columns=len(shown))
        payload["denoising"] = denoising_psnr(model, x, torch.Generator().manual_seed(seed + 2), PSNRS)
    (folder / "plots.json").write_text(json.dumps(payload, indent=2) + "\n")
    return folder


def pictures_line(folder: Path) -> str:
    """'pictures: RUN/plots/a.png, … (numbers in RUN/plots/plots.json)'."""
    return f"pictures: {', '.join(str(p) for p in sorted(folder.glob('*.png')))} (numbers in {folder / 'plots.json'})"
