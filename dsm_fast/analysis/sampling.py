"""Sampling by reverse diffusion with the energy's score, optionally Metropolis-adjusted at every level.

Levels t_0 = t_max > t_1 > … > t_K = t_min, log-spaced; y_0 ~ N(0, t_max I). The probability-flow ODE of the
variance-exploding diffusion (noise variance t), dy/dt = ½ ∇_y U(y, t), integrated from t_k down to t_{k+1}
(Δ = t_k − t_{k+1}) by Heun's method:

    k₁ = ½ ∇U(y, t_k),   k₂ = ½ ∇U(y − Δ k₁, t_{k+1}),   y ← y − Δ (k₁ + k₂) / 2.

(The stochastic Euler–Maruyama or ancestral steps bias ‖y‖² by O(Δ/t) overall — about 10–20% at 80 levels over
seven decades, enough to pick the wrong mixture component in high dimension; the second-order ODE step does not.)

MALA at level t_{k+1} (only an energy allows it: the accept/reject needs U itself, not only its gradient):
proposal y' = y − h ∇U(y) + √(2h) z with h = r · t_{k+1}, accepted with probability

    min(1, exp(−U(y') + U(y) + log q(y | y') − log q(y' | y))),   log q(a | b) = −‖a − b + h ∇U(b)‖² / (4h),

r adapted between steps towards the acceptance rate 0.574 (optimal for MALA in high dimension).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.energy import energy_and_scores, sum_per_sample

TARGET_ACCEPTANCE = 0.574


def adapted_ratio(ratio: float, rate: float) -> float:
    """r ← r · exp((acceptance − 0.574) / 2): larger steps while accepting more often than the target."""
    return ratio * math.exp(0.5 * (rate - TARGET_ACCEPTANCE))


def energy_potential(model: nn.Module, t: torch.Tensor):
    """y ↦ (U(y, t), ∇_y U(y, t)): the potential of MALA targeting p_t."""
    return lambda y: energy_and_scores(model, y, t)[:2]


def mala_step(potential, y: torch.Tensor, h: float, generator: torch.Generator, current=None, project=None
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One Metropolis-adjusted Langevin step targeting ∝ exp(−V): ``potential(y)`` → (V per sample, ∇_y V).
    ``current``, (V, ∇V) at y if known, saves one evaluation; ``project`` (a linear projector Π) keeps the chain
    in y + range(Π): the drift Π∇V and the noise Π z are projected. Returns (y, accepted per sample, (V, ∇V) at
    the returned y)."""
    project = project or (lambda v: v)
    energy, grad = current if current is not None else potential(y)
    drift = project(grad)
    z = project(torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.device, y.dtype))
    proposal = y - h * drift + math.sqrt(2 * h) * z
    energy_new, grad_new = potential(proposal)
    log_q_forward = -sum_per_sample((proposal - y + h * drift).double().square()) / (4 * h)
    log_q_backward = -sum_per_sample((y - proposal + h * project(grad_new)).double().square()) / (4 * h)
    log_ratio = energy.double() - energy_new.double() + log_q_backward - log_q_forward
    u = torch.rand(len(y), generator=generator, dtype=torch.float64).to(y.device)
    accepted = torch.log(u) < log_ratio
    keep = accepted.view(-1, *([1] * (y.dim() - 1)))
    return (torch.where(keep, proposal, y), accepted,
            (torch.where(accepted, energy_new, energy), torch.where(keep, grad_new, grad)))


def annealed_langevin(model: nn.Module, y: torch.Tensor, levels, generator: torch.Generator, mala_steps: int,
                      mala_ratio: float = 0.05, potential_at=None, step_scale=None, project=None, desc: str = "levels",
                      progress: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """From y at levels[0], for each next level t: one Heun step of the probability-flow ODE (moves projected by
    ``project``), then ``mala_steps`` MALA steps targeting exp(−V_t), V_t = ``potential_at(t)`` (default U(·, t)),
    with h = r · ``step_scale(t)`` (default t). Returns y and the acceptance rate and ratio r per level."""
    device, dtype = y.device, y.dtype
    potential_at = potential_at or (lambda t: energy_potential(model, t))
    step_scale, project = step_scale or (lambda t: t), project or (lambda v: v)
    ratio, acceptance = mala_ratio, []
    for t_now, t_next in tqdm(list(itertools.pairwise(levels)), desc=desc, disable=not progress, leave=False):
        delta = float(t_now - t_next)
        t_level = torch.full((len(y),), float(t_next), device=device, dtype=dtype)
        _, grad, _ = energy_and_scores(model, y, torch.full((len(y),), float(t_now), device=device, dtype=dtype))
        _, grad_next, _ = energy_and_scores(model, y - 0.5 * delta * project(grad), t_level)
        y = y - 0.25 * delta * project(grad + grad_next)
        accepted_here, current, potential = [], None, potential_at(t_level)
        for _ in range(mala_steps):
            y, accepted, current = mala_step(potential, y, ratio * step_scale(float(t_next)), generator, current,
                                             project)
            rate = accepted.double().mean().item()
            ratio = adapted_ratio(ratio, rate)
            accepted_here.append(rate)
        if mala_steps:
            acceptance.append({"t": float(t_next), "acceptance": float(np.mean(accepted_here)), "ratio": ratio})
    return y, acceptance


@torch.no_grad()
def reverse_diffusion(model: nn.Module, shape: tuple[int, ...], t_min: float, t_max: float, steps: int,
                      generator: torch.Generator, mala_steps: int = 0, mala_ratio: float = 0.05,
                      progress: bool = True) -> dict:
    """Samples of p_{t_min} (shape (n, …)) and, with MALA, the acceptance rate and step ratio r per level."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    levels = np.geomspace(t_max, t_min, steps + 1)
    y = (math.sqrt(t_max) * torch.randn(shape, generator=generator, dtype=torch.float64)).to(device, dtype)
    y, acceptance = annealed_langevin(model, y, levels, generator, mala_steps, mala_ratio, desc="reverse diffusion",
                                      progress=progress)
    return {"samples": y.detach(), "levels": levels, "mala": acceptance}


def plot_radial(samples: torch.Tensor, path, reference: tuple[float, ...] = ()) -> None:
    """Histogram of ‖x‖²/d of vector samples (GSM runs), with the components' variances σ_k² marked."""
    from .plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    radius = samples.reshape(len(samples), -1).double().square().mean(1).cpu().numpy()
    ax.hist(radius, bins=np.geomspace(max(radius.min(), 1e-6), radius.max(), 60), color="C0")
    for value in reference:
        ax.axvline(value, color="k", ls="--", lw=1)
    ax.set(xscale="log", xlabel="‖x‖² / d", ylabel="samples", title="radial distribution of the samples "
           "(dashed: σ_k² of the data)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
