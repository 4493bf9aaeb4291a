"""A better-conditioned start for the image energy (``--energy gaussian``, docs/method.md §1.6; the paper's runs use
``--energy paper``).

    U(y, t) = ‖y − μ‖² / (2 a²) + (d/2) log a² + ½ ⟨ỹ, f_θ(ỹ, τ)⟩,
    a² = t + s²,   ỹ = (y − μ) / a,   τ = log(1 + t/δ),

μ and s² the mean and variance of the training pixels (buffers, saved with the weights), f_θ the paper's UNet (the
same presets) with its last convolution zero at initialization. Training therefore starts from the energy of the
Gaussian N(μ, (s² + t) I) — up to the constant (d/2) log 2π its normalized −log p_t at every t, with the right
space and time scores — instead of a flat energy, and the UNet learns the difference:

- on a unit-variance input ỹ (EDM's c_in), beside the Gaussian's own denoiser (the Wiener one; EDM's c_skip);
- with τ = log(1 + t/δ) as its noise input instead of the raw t (EDM's c_noise is ¼ log σ): the paper's embedding
  cos(t f_k), sin(t f_k), f_k ∈ [0.01, 1], cannot tell t = 1e-6 from t = 1e-3, while τ ∈ [0, 21] over t ∈ [0, 1e3]
  spreads the decades where images are denoised over its frequencies. ∂_t U flows through τ: dτ/dt = 1/(t + δ).

There is no output scale depending on t (EDM's c_out): an explicit factor c(t) on the UNet's energy would add
c′(t)·(its value) to ∂_t U and fight the time score. The released code has a reparametrization in this spirit
("edm-like", unused by the paper's runs); this one is ours.
"""
from __future__ import annotations

import torch
from torch import nn

from .energy import UNetEnergy, sum_per_sample

T_FLOOR = 1e-6  # δ: below about the quantization variance of 8-bit data, (1/255)²/12 ≈ 1.3e-6, τ stays near 0


def noise_input(t: torch.Tensor) -> torch.Tensor:
    """τ = log(1 + t/δ): the UNet's noise input, 0 at t = 0."""
    return torch.log1p(t / T_FLOOR)


class GaussianStartEnergy(nn.Module):
    """U = the Gaussian energy of N(μ, (s² + t) I) + a UNet energy of the whitened input at noise input τ(t)."""

    def __init__(self, channels: int = 3, preset: str = "paper"):
        super().__init__()
        self.inner = UNetEnergy(channels, preset)
        self.inner.unet.zero_output()  # f_θ = 0: U starts at the Gaussian energy
        self.register_buffer("data_mean", torch.tensor(0.5))
        self.register_buffer("data_variance", torch.tensor(1.0 / 12))  # the uniform's, until set from the data

    @property
    def unet(self):
        """f_θ, the UNet inside (its presets' constraints, e.g. the image size's divisibility, are this model's)."""
        return self.inner.unet

    def set_data_statistics(self, mean: float, variance: float) -> None:
        self.data_mean.fill_(mean)
        self.data_variance.fill_(variance)

    def whiten(self, y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a² = t + s² of shape (B,), c = y − μ, ỹ = c / a)."""
        a2 = t + self.data_variance.to(t.dtype)
        centred = y - self.data_mean.to(y.dtype)
        return a2, centred, centred / torch.sqrt(a2).view(-1, *([1] * (y.dim() - 1))).to(y.dtype)

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a2, centred, whitened = self.whiten(y, t)
        gaussian = sum_per_sample(centred.square()) / (2 * a2.to(y.dtype)) + 0.5 * y[0].numel() * torch.log(a2)
        return gaussian.to(y.dtype) + self.inner(whitened, noise_input(t))
