"""A better-conditioned start for the image energy (``--energy gaussian``; the paper's runs use ``--energy paper``).

    U(y, t) = ‖y − μ‖² / (2 a²) + (d/2) log a² + ½ ⟨ỹ, f_θ(ỹ, t)⟩,   a² = t + s²,   ỹ = (y − μ) / a,

μ and s² the mean and variance of the training pixels (buffers, saved with the weights), f_θ the paper's UNet
(the same presets) with its last convolution zero at initialization. So training starts from the energy of the
Gaussian N(μ, (s² + t) I) — up to the constant (d/2) log 2π, its normalized log p_t at every t, with the right
space and time scores — instead of a flat energy, and the UNet learns the difference on a unit-variance input.
The idea follows the "edm-like" reparametrization of the released code, which its paper runs did not use.

Derived (what the explicit adjoint would need): ∇_y U = (y − μ)/a² + (1/a) ∇_ỹ V,
∂_t U = −‖y − μ‖²/(2a⁴) + d/(2a²) + ∂_t V − ⟨∇_ỹ V, ỹ⟩/(2a²), with V = ½⟨ỹ, f_θ(ỹ, t)⟩.
"""
from __future__ import annotations

import torch
from torch import nn

from .energy import UNetEnergy, sum_per_sample


class GaussianStartEnergy(nn.Module):
    """U = Gaussian energy of N(μ, (s² + t) I) + a UNet energy of the whitened input, starting at the Gaussian."""

    def __init__(self, channels: int = 3, preset: str = "paper"):
        super().__init__()
        self.inner = UNetEnergy(channels, preset)
        nn.init.zeros_(self.inner.unet.decoder[-1][-1].conv.weight)  # f_θ = 0: U starts at the Gaussian energy
        self.register_buffer("data_mean", torch.tensor(0.5))
        self.register_buffer("data_variance", torch.tensor(1.0 / 12))  # the uniform's, until set from the data

    @property
    def unet(self):
        """f_θ, the UNet inside (its presets' constraints, e.g. the image size's divisibility, are this model's)."""
        return self.inner.unet

    def set_data_statistics(self, mean: float, variance: float) -> None:
        self.data_mean.fill_(mean)
        self.data_variance.fill_(variance)

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a2 = t + self.data_variance.to(t.dtype)  # (B,)
        centred = y - self.data_mean.to(y.dtype)
        a2_full = a2.view(-1, *([1] * (y.dim() - 1))).to(y.dtype)
        gaussian = sum_per_sample(centred.square()) / (2 * a2.to(y.dtype)) + 0.5 * y[0].numel() * torch.log(a2)
        return gaussian.to(y.dtype) + self.inner(centred / torch.sqrt(a2_full), t)
