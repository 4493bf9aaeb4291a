"""The analytic data set: a Gaussian scale mixture in R^d (docs/method.md §3.4),

    p(x) = Σ_k w_k N(x; 0, σ_k² I),   p_t(y) = Σ_k w_k N(y; 0, (σ_k² + t) I),

so log p_t(y) = logsumexp_k [log w_k − (d/2) log(2π(σ_k² + t)) − ‖y‖² / (2(σ_k² + t))] in closed form.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class GaussianScaleMixture:
    def __init__(self, dim: int = 1000, sigmas: tuple[float, ...] = (1.0, 4.0),
                 weights: tuple[float, ...] | None = None):
        if dim <= 0 or not sigmas or any(s <= 0 for s in sigmas):
            raise ValueError("a Gaussian scale mixture needs dim > 0 and positive standard deviations")
        weights = weights or tuple(1.0 / len(sigmas) for _ in sigmas)
        if len(weights) != len(sigmas) or abs(sum(weights) - 1.0) > 1e-9:
            raise ValueError("mixture weights must match the standard deviations and sum to 1")
        self.dim, self.sigmas, self.weights = dim, tuple(sigmas), tuple(weights)

    @property
    def variance_per_dim(self) -> float:
        """E[x_i²] = Σ_k w_k σ_k² (the mixture has mean 0)."""
        return sum(w * s * s for w, s in zip(self.weights, self.sigmas))

    def sample(self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n draws x = σ_k z with k ~ w, z ~ N(0, I); shape (n, dim)."""
        component = torch.multinomial(torch.tensor(self.weights), n, replacement=True, generator=generator)
        scale = torch.tensor(self.sigmas, dtype=torch.float64)[component]
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (scale[:, None] * z).to(device=device, dtype=dtype)

    def component_log_probs(self, y: torch.Tensor, t: torch.Tensor | float = 0.0) -> torch.Tensor:
        """log w_k + log N(y; 0, (σ_k² + t) I) per sample and component, float64; y (B, dim), t scalar or (B,)."""
        y = y.double().reshape(y.shape[0], -1)
        t = torch.as_tensor(t, dtype=torch.float64, device=y.device).expand(y.shape[0])
        sq_norm = y.square().sum(dim=1)
        return torch.stack([math.log(w) - 0.5 * self.dim * torch.log(2 * math.pi * (s * s + t))
                            - sq_norm / (2 * (s * s + t)) for w, s in zip(self.weights, self.sigmas)], dim=1)

    def log_prob(self, y: torch.Tensor, t: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Exact log p_t(y) per sample, computed in float64; y (B, dim), t scalar or (B,)."""
        return torch.logsumexp(self.component_log_probs(y, t), dim=1)

    def responsibilities(self, y: torch.Tensor, t: float = 0.0) -> torch.Tensor:
        """p(k | y) under p_t, (B, K). Averaged over draws of a posterior p(x | m), it is that posterior's weight of
        component k (k and m are independent given x)."""
        return torch.softmax(self.component_log_probs(y, t), dim=1)


class ExactEnergy(nn.Module):
    """The mixture's own energy, U(y, t) = c − log p_t(y) (c an arbitrary constant, which the normalizing
    protocol must remove): the exact model that the analyses are checked against. Its one (unused) float64
    parameter gives the device and dtype that callers read from ``model.parameters()``."""

    def __init__(self, mixture: GaussianScaleMixture, offset: float = 0.0):
        super().__init__()
        self.mixture, self.offset = mixture, offset
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.offset - self.mixture.log_prob(y, t) + 0 * self.dummy


class MixtureBatches:
    """An endless stream of GSM draws; the generator state is the whole state (exact resume)."""

    quantized = False  # continuous data: NLL in bits/dim without the 8-bit offset

    def __init__(self, mixture: GaussianScaleMixture, seed: int = 0):
        self.mixture = mixture
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.mixture.dim,)

    def next_batch(self, batch_size: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.mixture.sample(batch_size, self.generator, device, dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
