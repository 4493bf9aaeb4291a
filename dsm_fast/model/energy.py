"""Energy models U_θ(y, t) — one scalar per sample — and the quantities derived from them (docs/method.md §1.2).

    space score  −∇_y U,   time score  ∂_t U,   denoiser (Tweedie)  D(y, t) = y − t ∇_y U.
"""
from __future__ import annotations

import torch
from torch import nn

from .edm2 import PRESETS as EDM2_PRESETS
from .edm2 import EDM2Preset, EDM2UNet
from .unet import EnergyUNet, UNetPreset


def sum_per_sample(x: torch.Tensor) -> torch.Tensor:
    """Σ over every dimension but the first: (B, ...) → (B,)."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def build_unet(channels: int, preset: UNetPreset | EDM2Preset | str) -> EnergyUNet | EDM2UNet:
    """f_θ by preset: the paper's UNet (model/unet.py) or the EDM2-style attention UNet (model/edm2.py)."""
    if isinstance(preset, EDM2Preset) or preset in EDM2_PRESETS:
        return EDM2UNet(channels, preset)
    return EnergyUNet(channels, preset)


class UNetEnergy(nn.Module):
    """U(y, t) = ½ ⟨y, f_θ(y, t)⟩, the inner product over C, H, W (no offset, no learned constant); f_θ the
    preset's UNet (:func:`build_unet`)."""

    def __init__(self, channels: int = 3, preset: UNetPreset | EDM2Preset | str = "paper"):
        super().__init__()
        self.unet = build_unet(channels, preset)

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        f = self.unet(y, t)
        return 0.5 * sum_per_sample(y * f.to(y.dtype))


class RadialEnergy(nn.Module):
    """A small radial energy for vectors y ∈ R^d (the analytic Gaussian-scale-mixture data):

        U(y, t) = d · [ g_θ(log r, log t) + ½ log r + a log t ],   r = ‖y‖² / d,

    g_θ a small MLP. The ½ log r term starts the score at y / r (the score of a Gaussian of variance r); for
    nearly Gaussian data it also happens to carry the t-dependence of the log-normalizer. The fixed term
    a·log t (``time_offset``, a buffer saved with the weights) moves every log p_t by −a·log t nats/dim
    without touching ∇_y U: a start mis-normalized by a known amount, which g_θ must learn to cancel. Only an
    objective that sees the constant (dual, DiffCLF) does; single score matching cannot, its loss being blind
    to any function of t added to U.
    """

    def __init__(self, dim: int, hidden: int = 64, time_offset: float = 0.0):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.register_buffer("time_offset", torch.tensor(float(time_offset)))

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        log_r = torch.log(sum_per_sample(y.square()) / self.dim)
        log_t = torch.log(t)
        features = torch.stack([log_r, log_t], dim=1) / 5.0
        return self.dim * (self.mlp(features).squeeze(1) + 0.5 * log_r + self.time_offset * log_t)


def energy_and_scores(
    model: nn.Module, y: torch.Tensor, t: torch.Tensor, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, ∇_y U, ∂_t U) by autograd; with ``create_graph`` they stay differentiable in θ."""
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        t = t.detach().requires_grad_(True)
        energy = model(y, t)
        grad_y, grad_t = torch.autograd.grad(energy.sum(), (y, t), create_graph=create_graph)
    if not create_graph:
        energy = energy.detach()
    return energy, grad_y, grad_t


def denoise(model: nn.Module, y: torch.Tensor, t: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Tweedie's denoiser D(y, t) = y − t ∇_y U(y, t); t has shape (B,)."""
    _, grad_y, _ = energy_and_scores(model, y, t, create_graph=create_graph)
    return y - t.view(-1, *([1] * (y.dim() - 1))) * grad_y
