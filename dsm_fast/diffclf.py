"""DiffCLF (docs/method.md §2.4): a diffusive classification loss beside the space term.

Grid: N noise levels log-spaced over [t_min, t_max],  t_j = t_min (t_max / t_min)^(j / (N − 1)),  j = 0 … N − 1.
For each sample the trainer's log-uniform t picks a level uniformly, k = ⌊N u⌋ with u = log(t/t_min)/log(t_max/t_min);
the classifier sees y_k = x + √t_k ε and its logits are

    ℓ_j(y_k) = −U(y_k, t_j) + F_j,     j = 0 … N − 1,

F_j learned free energies. The classifier's optimum makes −U(·, t_j) + F_j = log p_{t_j} + c, one constant c
shared by every level: U alone is normalized only up to a constant per level, which F_j absorbs. The normalized
energy is therefore U(y, t) − (F(t) − F_{N−1}), F(t) linear in log t between grid levels (held outside the grid),
and the t_max protocol of evaluate.py fixes c. The cross-entropy of ℓ against k is added to the space term (at
the trainer's continuous t, so the score is learned at every t) with weight λ.

F lives in the model (``DiffCLFEnergy``), so the optimizer, the EMA and the checkpoints handle it; the grid is a
non-persistent buffer rebuilt from the run's config.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def noise_grid(n: int, t_min: float, t_max: float) -> torch.Tensor:
    """t_j = t_min (t_max / t_min)^(j / (n − 1)), float64, shape (n,)."""
    return torch.exp(torch.linspace(math.log(t_min), math.log(t_max), n, dtype=torch.float64))


def grid_level(t: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """k = ⌊N u⌋ (clamped to N − 1), u = log(t / t_0) / log(t_{N−1} / t_0): a log-uniform t gives uniform classes."""
    log_t, log_levels = torch.log(t.double()), torch.log(levels.double())
    u = (log_t - log_levels[0]) / (log_levels[-1] - log_levels[0])
    return torch.floor(u * len(levels)).long().clamp(0, len(levels) - 1)


class DiffCLFEnergy(nn.Module):
    """U(y, t) of ``energy`` (unchanged) plus the free energies F_j of the classifier at the grid levels t_j."""

    def __init__(self, energy: nn.Module, levels: torch.Tensor):
        super().__init__()
        self.energy = energy
        self.register_buffer("levels", levels, persistent=False)
        self.free_energies = nn.Parameter(torch.zeros(len(levels), dtype=levels.dtype))

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The normalized energy U(y, t) − (F(t) − F_{N−1}); the same ∇_y U as ``energy``."""
        return self.energy(y, t) - self.relative_free_energy(t).to(y.dtype)

    def relative_free_energy(self, t: torch.Tensor) -> torch.Tensor:
        """F(t) − F_{N−1}: F_j interpolated linearly in log t, u = (N − 1) log(t / t_0) / log(t_{N−1} / t_0)
        clamped to [0, N − 1] (t = 0 reads F_0)."""
        log_levels = torch.log(self.levels)
        u = (torch.log(t.double()) - log_levels[0]) / (log_levels[-1] - log_levels[0]) * (len(self.levels) - 1)
        u = u.clamp(0, len(self.levels) - 1)
        below = torch.floor(u).long().clamp(max=len(self.levels) - 2)
        weight = (u - below).to(self.free_energies.dtype)
        relative = self.free_energies - self.free_energies[-1]
        return (1 - weight) * relative[below] + weight * relative[below + 1]

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """ℓ_j(y) = −U(y, t_j) + F_j for every sample and level: (B, …) → (B, N)."""
        n = len(self.levels)
        y_all = y.repeat_interleave(n, dim=0)
        t_all = self.levels.to(y.dtype).repeat(len(y))
        return -self.energy(y_all, t_all).view(len(y), n) + self.free_energies.to(y.dtype)


def with_free_energies(model: nn.Module, cfg) -> nn.Module:
    """The model a run of ``cfg`` trains: wrapped in DiffCLFEnergy for objective 'diffclf', else unchanged."""
    if cfg.objective != "diffclf":
        return model
    return DiffCLFEnergy(model, noise_grid(cfg.diffclf_levels, cfg.t_min, cfg.t_max))
