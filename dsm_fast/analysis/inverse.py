"""Restoring samples from a linear measurement m = A x + s n with the energy as the prior (docs/method.md §1, §3).

Two methods, both batched over the measurements (one row of ``m`` per image):

- :func:`constrained_ascent`, the stochastic coarse-to-fine ascent of Kadkhodaie & Simoncelli ("Solving linear
  inverse problems using the prior implicit in a denoiser", 2021) with the energy's denoiser D(y, t) = y − t ∇_y U.
  Their denoiser is blind; ours takes the noise level: by default ('final') the residual's σ² below, as the paper
  estimates it, and for the last denoising the level a normalized energy finds for y, its likeliest one
  t̂(y) = argmax_t log p_t(y) (:func:`likeliest_noise_level`); 'tracked' tells D t̂ at every step (tracked from
  step to step). With x̂(y) = W(D(y, σ²)), W the measurement's correction of the denoised image (the Gaussian
  posterior mean given m of N(D, σ² I); for s = 0, W(D) = (I − P) D + A⁺ m, the paper's constraint),

      d = x̂(y) − y,   σ² = ‖d‖² / N,   h_k = h₀ k / (1 + h₀ (k − 1)),   γ_k² = ((1 − β h_k)² − (1 − h_k)²) σ²,
      y ← y + h_k d + γ_k z,

  from y ~ N(W(c), σ₀² I) (c the data's centre) until σ ≤ σ_end ('tracked': or until t̂ stops falling, where the
  prior takes what is left for texture). The restoration is W(D(y, t̂)), which for s = 0 keeps the measured part
  A⁺ m exactly. The paper's defaults: σ₀ = 1, σ_end = 0.01, h₀ = 0.01, β = 0.01. For an energy not normalized
  across t (or a scale mixture, where t̂ mistakes a wide component for a narrow one plus noise) D is told the
  residual's σ² to the end ('residual').
- :func:`posterior_sampling`, annealed Metropolis-adjusted Langevin sampling of

      π_t(y) ∝ exp(−U(y, t)) N(m; A y, s² I)

  at log-spaced levels t from t_start down to t_end (π_{t_end} is the posterior under the prior p_{t_end}): between
  levels one Heun step of the prior's probability-flow ODE, then MALA steps whose accept/reject needs U itself
  (sampling.annealed_langevin), with h = r · t s² / (s² + c t) (c the largest eigenvalue of AAᵀ: the likelihood's
  curvature caps the step). For s = 0 the chain stays on {A y = m}: it starts there and every move is projected by
  I − P.

Told the residual's σ², a denoiser that is not blind runs the ascent down too fast where the prior cannot tell noise
from texture: it removes only the part of the noise it recognizes (on the demo run ‖D(y, σ²) − y‖/√N is 0.003 for
σ = 0.01 and 0.015 for σ = 0.03, README), so each σ² under-reads the last and the ascent stops at "σ = σ_end" with
noise left, which the last denoising at t̂ removes. Told t̂ at every step ('tracked') the feedback turns the other
way: where t̂ over-reads, D removes signal with the noise, the residual and with it the injected noise grow, and the
ascent can stall at a large level (measured on a 4,000-step demo run, README) — hence not the default.

t̂ = argmax_t log p_t(y) = argmin_t U(y, t) is the maximum-likelihood noise level of y in the energy's own family of
noisy densities — only a normalized energy gives it (docs/method.md §3): U(·, t) must be comparable across t. For
the Gaussian N(μ, (v + t) I) it is ‖y − μ‖²/N − v, the unbiased estimate of the noise variance.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.energy import denoise, energy_and_scores, sum_per_sample
from .measurements import LinearMeasurement, gaussian_posterior_mean
from .sampling import annealed_langevin

TRACKING_REFINEMENTS = 6  # golden-section steps per iteration for t̂: a bracket of e³ narrowed to ±9 % in t
# A sample whose t̂ has not fallen below PLATEAU_FACTOR × its last such level for PLATEAU_PATIENCE iterations stops:
# the prior takes what is left for texture (nominally t̂ falls by 2 β h per iteration, 0.8 within ~100 iterations
# from the start at the paper's β)
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.8, 200
ASCENT_LEVELS = ("residual", "final", "tracked")


def model_device(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped to broadcast against a (B, ...) tensor."""
    return values.view(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def constrained_ascent(model: nn.Module, op: LinearMeasurement, m: torch.Tensor, noise: float,
                       generator: torch.Generator, h0: float = 0.01, beta: float = 0.01, sigma_start: float = 1.0,
                       sigma_end: float = 0.01, centre: float = 0.0, t_range: tuple[float, float] = (0.0, math.inf),
                       max_iterations: int = 3000, level: str = "final", progress: bool = True) -> dict:
    """The restorations x̂ = W(D(y, t̂)) (B, ...) of the measurements m (B, ...) by the ascent above; also the
    iterations run and, per sample, the last residual σ and the final denoising level √t̂ (t̂ searched in
    [10⁻⁴ σ_end², σ₀²] ∩ ``t_range``, to 4 σ₀² when tracked). ``level`` (ASCENT_LEVELS) is what D is told:
    'residual' the residual's σ² (clamped to ``t_range``) throughout, 'final' the same but t̂ for the last
    denoising, 'tracked' t̂ at every step."""
    if level not in ASCENT_LEVELS:
        raise ValueError(f"level must be one of {ASCENT_LEVELS}")
    device, dtype = model_device(model)
    m = m.to(device, dtype)
    n, size = len(m), op.dim
    centre_image = torch.full((1, *op.sample_shape), float(centre), device=device, dtype=dtype)
    y = gaussian_posterior_mean(op, m, centre_image, sigma_start**2, noise)
    y = y + sigma_start * torch.randn(y.shape, generator=generator, dtype=torch.float64).to(device, dtype)
    sigma2 = torch.full((n,), sigma_start**2, device=device, dtype=dtype)
    running = torch.ones(n, dtype=torch.bool, device=device)

    def restoration(y: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return gaussian_posterior_mean(op, m, denoise(model, y, level), level, noise)

    bar = tqdm(total=100, desc="ascent (% of log σ₀/σ_end)", disable=not progress, leave=False)
    k, decades = 0, math.log(sigma_start / sigma_end)
    t_low, t_high = max(t_range[0], 1e-4 * sigma_end**2), min(t_range[1], 4 * sigma_start**2)
    likeliest = likeliest_noise_level(model, y, t_low, t_high) if level == "tracked" else None
    plateau_level, stalled = likeliest, torch.zeros(n, dtype=torch.long, device=device)
    while running.any() and k < max_iterations:
        k += 1
        h = h0 * k / (1 + h0 * (k - 1))
        d = restoration(y, sigma2.clamp(*t_range) if likeliest is None else likeliest) - y
        sigma2 = torch.where(running, sum_per_sample(d.square()) / size, sigma2)
        gamma = torch.sqrt(((1 - beta * h) ** 2 - (1 - h) ** 2) * sigma2)
        z = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(device, dtype)
        y = torch.where(per_sample(running, y), y + h * d + per_sample(gamma, y) * z, y)
        running = running & (sigma2.sqrt() > sigma_end)
        if likeliest is not None:  # track t̂ within [t̂ e⁻², t̂ e]: the noise only shrinks a little per step
            likeliest = likeliest_noise_level(model, y, (likeliest * math.exp(-2)).clamp_min(t_low),
                                              (likeliest * math.e).clamp_max(t_high), points=2,
                                              refinements=TRACKING_REFINEMENTS)
            falling = likeliest < PLATEAU_FACTOR * plateau_level
            plateau_level = torch.where(falling, likeliest, plateau_level)
            stalled = torch.where(falling, 0, stalled + 1)
            running = running & (stalled < PLATEAU_PATIENCE)
        sigma_max = sigma2.sqrt().max().item()
        bar.n = int(100 * min(1.0, max(0.0, math.log(sigma_start / sigma_max) / decades)))
        bar.set_postfix(iteration=k, sigma=f"{sigma_max:.4f}")
    bar.close()
    t_last = t_high if level == "tracked" else min(t_range[1], sigma_start**2)  # tracking may end above σ₀²
    last = sigma2.clamp(*t_range) if level == "residual" else likeliest_noise_level(model, y, t_low, t_last)
    return {"restored": restoration(y, last), "iterations": k, "sigma": sigma2.sqrt().cpu(),
            "final_sigma": last.sqrt().cpu(), "converged": not running.any().item()}


@torch.no_grad()
def likeliest_noise_level(model: nn.Module, y: torch.Tensor, t_low, t_high, points: int = 37,
                          refinements: int = 20) -> torch.Tensor:
    """Per sample (B,) t̂ = argmin_t U(y, t) over [t_low, t_high] (floats, or (B,) tensors): the best of ``points``
    log-spaced levels, then a golden-section search in log t between its two neighbours (U evaluated only, no
    gradients). ``points`` = 2 searches the whole bracket, for U unimodal in it."""
    device, dtype = model_device(model)
    y = y.to(device, dtype)

    def energy(log_t: torch.Tensor) -> torch.Tensor:
        return model(y, log_t.exp().to(dtype)).double()

    def log_level(t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64, device=device).log().expand(len(y))

    fractions = torch.linspace(0, 1, points, dtype=torch.float64, device=device)
    grid = log_level(t_low)[:, None] + fractions * (log_level(t_high) - log_level(t_low))[:, None]  # (B, points)
    best = torch.stack([energy(grid[:, i]) for i in range(points)], 1).argmin(1) if points > 2 else None
    low = grid[:, 0] if best is None else grid.gather(1, (best - 1).clamp_min(0)[:, None])[:, 0]
    high = grid[:, -1] if best is None else grid.gather(1, (best + 1).clamp_max(points - 1)[:, None])[:, 0]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    energy_a, energy_b = energy(a), energy(b)
    for _ in range(refinements):  # one new level per step: the bracket keeps the other interior level
        left = energy_a < energy_b  # the minimum lies in [low, b], else in [a, high]
        low, high = torch.where(left, low, a), torch.where(left, b, high)
        a, b = torch.where(left, high - ratio * (high - low), b), torch.where(left, a, low + ratio * (high - low))
        probe = energy(torch.where(left, a, b))
        energy_a, energy_b = torch.where(left, probe, energy_b), torch.where(left, energy_a, probe)
    return ((low + high) / 2).exp().to(dtype)


def posterior_potential(model: nn.Module, op: LinearMeasurement, m: torch.Tensor, noise: float, t: torch.Tensor):
    """y ↦ (V, ∇_y V) with V(y) = U(y, t) + ‖A y − m‖² / (2 s²) (just U(y, t) for s = 0)."""
    def potential(y: torch.Tensor):
        energy, grad, _ = energy_and_scores(model, y, t)
        if noise == 0:
            return energy, grad
        residual = op.apply(y) - m
        return energy + sum_per_sample(residual.square()) / (2 * noise**2), grad + op.adjoint(residual) / noise**2
    return potential


@torch.no_grad()
def posterior_sampling(model: nn.Module, op: LinearMeasurement, m: torch.Tensor, noise: float, samples: int,
                       generator: torch.Generator, t_start: float, t_end: float, levels: int = 100,
                       mala_steps: int = 4, centre: float = 0.0, ratio: float = 0.05, progress: bool = True) -> dict:
    """``samples`` draws of π_{t_end} per measurement by annealed MALA: 'samples' (B, S, ...), their 'mean' and
    per-coordinate 'std' (B, ...), and the acceptance rate and step ratio per level."""
    device, dtype = model_device(model)
    m = m.to(device, dtype).repeat_interleave(samples, 0)
    centre_image = torch.full((1, *op.sample_shape), float(centre), device=device, dtype=dtype)
    project = (lambda v: v - op.project(v)) if noise == 0 else None
    z = torch.randn((len(m), *op.sample_shape), generator=generator, dtype=torch.float64).to(device, dtype)
    y = gaussian_posterior_mean(op, m, centre_image, t_start, noise) + math.sqrt(t_start) * (project or (
        lambda v: v))(z)
    levels = np.geomspace(t_start, t_end, levels)
    y, acceptance = annealed_langevin(
        model, y, levels, generator, mala_steps, ratio, lambda t: posterior_potential(model, op, m, noise, t),
        lambda t: t if noise == 0 else t * noise**2 / (noise**2 + op.gain * t), project, "posterior", progress)
    draws = y.reshape(-1, samples, *op.sample_shape)
    return {"samples": draws, "mean": draws.mean(1), "std": draws.std(1) if samples > 1 else torch.zeros_like(
        draws[:, 0]), "mala": acceptance}
