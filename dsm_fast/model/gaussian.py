"""A better-conditioned start for the image energy (``--energy gaussian``; the paper's runs use ``--energy paper``).

    U(y, t) = ‖y − μ‖² / (2 a²) + (d/2) log a² + c(t) · ½ ⟨ỹ, f_θ(ỹ, t)⟩,
    a² = t + s²,   ỹ = (y − μ) / a,   c(t) = s / √(t + δ),

μ and s² the mean and variance of the training pixels (buffers, saved with the weights), f_θ the paper's UNet (the
same presets) with its last convolution zero at initialization. Training therefore starts from the energy of the
Gaussian N(μ, (s² + t) I) — up to the constant (d/2) log 2π, its normalized −log p_t at every t, with the right
space and time scores — instead of a flat energy, and the UNet learns the difference on a unit-variance input.
The scales are EDM's preconditioning written for an energy: with V = ½⟨ỹ, f_θ⟩,

    ∇_y U = (y − μ)/a² + (c/a) ∇_ỹ V,     c/a = s / (√(t + δ) √(t + s²)) ≈ 1/√t for t ≪ s²,

so the denoiser D = y − t ∇_y U is the Gaussian's (Wiener) one plus √t·(an O(1) network output), EDM's c_skip and
c_out; the network need not grow its weights by 1/√t to reach low noise levels. δ keeps c finite at t = 0, where
log p(x) is read (below t ≈ δ the scale stops growing). The released code has a reparametrization in this spirit
("edm-like", unused by the paper's runs); this one is ours. ∂_t U = d/(2a²) − ‖y − μ‖²/(2a⁴) + c ∂_t V −
c ⟨∇_ỹ V, ỹ⟩/(2a²) − c V/(2(t + δ)).
"""
from __future__ import annotations

import torch
from torch import nn

from .energy import UNetEnergy, sum_per_sample

T_FLOOR = 1e-6  # δ: below the quantization variance of 8-bit data, (1/255)²/12 ≈ 1.3e-6


class GaussianStartEnergy(nn.Module):
    """U = Gaussian energy of N(μ, (s² + t) I) + c(t) × a UNet energy of the whitened input; starts at the Gaussian."""

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
        variance = self.data_variance.to(t.dtype)
        a2 = t + variance  # (B,)
        centred = y - self.data_mean.to(y.dtype)
        whitened = centred / torch.sqrt(a2).view(-1, *([1] * (y.dim() - 1))).to(y.dtype)
        gaussian = sum_per_sample(centred.square()) / (2 * a2.to(y.dtype)) + 0.5 * y[0].numel() * torch.log(a2)
        scale = torch.sqrt(variance / (t + T_FLOOR))
        return gaussian.to(y.dtype) + scale.to(y.dtype) * self.inner(whitened, t)
