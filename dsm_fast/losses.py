"""Training objectives as per-sample terms (docs/method.md §2).

With y = x + √t ε, d the number of dimensions of one sample, and the scores of U:
    space = ‖D(y, t) − x‖² / (d t)                      = ‖√t ∇_y U − ε‖² / d
    time  = (t ∂_t U / d − ½ + ‖y − x‖² / (2 d t))²       = (t ∂_t U / d − ½ + ‖ε‖² / (2 d))²
    dual  = space + λ · time;   single = space;
    diffclf = space + λ · CE(ℓ(y_k), k),  ℓ_j = −U(y_k, t_j) + F_j over a grid of noise levels (dsm_fast/diffclf.py).
The right-hand forms never divide by t, so they stay finite down to t = 1e-9 in float32.
"""
from __future__ import annotations

import math

import torch

from .config import OBJECTIVES
from .model.energy import sum_per_sample


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, …, 1) broadcastable against x."""
    return t.view(-1, *([1] * (x.dim() - 1)))


def sample_noise_levels(n: int, t_min: float, t_max: float, generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """t log-uniform on [t_min, t_max]: log t ~ U(log t_min, log t_max), density p(t) ∝ 1/t."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    log_t = math.log(t_min) + u * (math.log(t_max) - math.log(t_min))
    return torch.exp(log_t).to(dtype)


def space_term(grad_y: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """‖√t ∇_y U − ε‖² / d per sample; equals ‖D − x‖²/(d t). Also the plain score-network DSM loss
    when a network output f stands in for ∇_y U (D = y − t f)."""
    d = eps[0].numel()
    residual = torch.sqrt(expand_like(t, eps)) * grad_y.to(eps.dtype) - eps
    return sum_per_sample(residual.square()) / d


def time_term(grad_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(t ∂_t U / d − ½ + ‖ε‖²/(2d))² per sample."""
    d = eps[0].numel()
    residual = t * grad_t.to(eps.dtype) / d - 0.5 + sum_per_sample(eps.square()) / (2 * d)
    return residual.square()


def classification_term(logits: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """−log softmax(ℓ)_k per sample: the cross-entropy of the noise-level logits (B, N) against the level k (B,)."""
    return torch.nn.functional.cross_entropy(logits, level, reduction="none")


def objective_terms(objective: str, grad_y: torch.Tensor, grad_t: torch.Tensor, eps: torch.Tensor,
                    t: torch.Tensor, time_weight: float = 1.0, logits: torch.Tensor | None = None,
                    level: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-sample terms of ``objective`` from the scores (:func:`combine_terms`); the key 'loss' is what training
    averages over the batch. 'diffclf' also needs the noise-level ``logits`` (B, N) and each sample's true ``level``
    (B,)."""
    if objective == "diffclf" and (logits is None or level is None):
        raise ValueError("objective 'diffclf' needs the noise-level logits and levels")
    return combine_terms(objective, space_term(grad_y, eps, t),
                         time=time_term(grad_t, eps, t) if objective == "dual" else None,
                         classification=classification_term(logits, level) if objective == "diffclf" else None,
                         time_weight=time_weight)


def combine_terms(objective: str, space: torch.Tensor, time: torch.Tensor | None = None,
                  classification: torch.Tensor | None = None, time_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The objective from its per-sample terms (docs/method.md §2): loss = space (single), space + λ·time
    (dual) or space + λ·classification (diffclf), returned beside the terms it combines."""
    if objective == "single":
        return {"loss": space, "space": space}
    if objective == "dual":
        return {"loss": space + time_weight * time, "space": space, "time": time}
    if objective == "diffclf":
        return {"loss": space + time_weight * classification, "space": space, "classification": classification}
    raise ValueError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
