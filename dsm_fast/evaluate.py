"""Normalized log-probabilities, NLL in bits/dim and denoising quality (method.md §3, §4).

1. C = (d/2) log(2πe (t_max + v)) − mean_x U(x + √t_max ε, t_max)   (v = 0 is the paper's protocol; v, the
   data's variance per dimension, corrects the Gaussian approximation of p_{t_max} when t_max is not ≫ v)
2. log p(x) = −(U(x, 0) + C)
3. NLL = −log p(x) / (d ln 2) [+ 8 for 8-bit images, moving from [0, 1] to the 0–255 scale] bits/dim.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .model.energy import denoise

INPUT_PSNRS = tuple(range(90, -31, -15))  # dB; input PSNR p ↔ noise variance t = 10^(−p/10) for peak 1


def clean_noise_level(cfg) -> float:
    """The t at which a run's 'clean' log p is read: 0 for images; t_min for the analytic data, whose radial
    model takes log t (p_{t_min} is known exactly there)."""
    return cfg.t_min if cfg.data == "gsm" else 0.0


def batched(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def energies(model: nn.Module, y: torch.Tensor, t: float, batch_size: int = 64) -> torch.Tensor:
    """U(y, t) for every sample, in float64 on the CPU."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    out = []
    for rows in batched(len(y), batch_size):
        yb = y[rows].to(device, dtype)
        out.append(model(yb, torch.full((len(yb),), t, device=device, dtype=dtype)).double().cpu())
    return torch.cat(out)


def normalizing_constant(model: nn.Module, x: torch.Tensor, t_max: float, generator: torch.Generator,
                         data_variance: float = 0.0, batch_size: int = 64) -> float:
    """C = (d/2) log(2πe (t_max + v)) − mean U(x + √t_max ε, t_max), one noise draw per sample."""
    d = x[0].numel()
    y = x.double() + math.sqrt(t_max) * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return 0.5 * d * math.log(2 * math.pi * math.e * (t_max + data_variance)) - energies(
        model, y, t_max, batch_size).mean().item()


def uniform_dequantize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x = k/255 → (k + u)/256 with u ~ U[0, 1): a density on [0, 1]^d whose bits/dim add exactly 8."""
    return (torch.round(x * 255) + torch.rand(x.shape, generator=generator, dtype=x.dtype)) / 256


def nll_bits_per_dim(log_p: torch.Tensor, d: int, quantized: bool) -> torch.Tensor:
    """−log p / (d ln 2), plus 8 for 8-bit images."""
    return -log_p / (d * math.log(2)) + (8.0 if quantized else 0.0)


def bootstrap_interval(values: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def denoising_psnr(model: nn.Module, x: torch.Tensor, generator: torch.Generator,
                   input_psnrs=INPUT_PSNRS, batch_size: int = 64) -> list[dict[str, float]]:
    """Mean output PSNR of D(y, t) = y − t ∇_y U at each input PSNR (t = 10^(−PSNR/10), peak 1)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    rows = []
    for psnr in input_psnrs:
        t = 10.0 ** (-psnr / 10)
        out_psnr = []
        for sl in batched(len(x), batch_size):
            xb = x[sl].to(device, dtype)
            y = xb + math.sqrt(t) * torch.randn(xb.shape, generator=generator, dtype=torch.float64).to(device, dtype)
            mse = (denoise(model, y, torch.full((len(y),), t, device=device, dtype=dtype)) - xb).square()
            out_psnr.append(-10 * torch.log10(mse.reshape(len(y), -1).mean(dim=1).double().clamp_min(1e-30)).cpu())
        rows.append({"input_psnr": float(psnr), "t": t, "output_psnr": torch.cat(out_psnr).mean().item()})
    return rows


def evaluate_nll(model: nn.Module, x: torch.Tensor, quantized: bool, t_max: float, dequantize: bool = False,
                 data_variance: float = 0.0, seed: int = 0, batch_size: int = 64,
                 exact_log_p: torch.Tensor | None = None, t_eval: float = 0.0) -> dict:
    """NLL in bits/dim by the protocol above, with its bootstrap 95% interval and per-sample log p(x).

    ``t_eval`` > 0 evaluates log p_t(x) = −(U(x, t) + C) instead of log p(x) (for models trained on
    t ≥ t_min > 0 only); ``exact_log_p`` (analytic data) adds the exact NLL of the same samples beside the model's.
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    d = x[0].numel()
    if dequantize:
        x = uniform_dequantize(x.double(), generator)
    constant = normalizing_constant(model, x, t_max, generator, data_variance, batch_size)
    log_p = -(energies(model, x, t_eval, batch_size) + constant)
    per_sample = nll_bits_per_dim(log_p, d, quantized).numpy()
    low, high = bootstrap_interval(per_sample, seed=seed)
    result = {"nll_bits_per_dim": float(per_sample.mean()), "ci95": [low, high], "n": len(x), "dim": d,
              "log_normalizer": constant, "t_max": t_max, "t_eval": t_eval, "dequantized": dequantize, "quantized_data": quantized,
              "log_p": log_p.numpy()}
    if exact_log_p is not None:
        result["exact_nll_bits_per_dim"] = float(nll_bits_per_dim(exact_log_p.double(), d, quantized).mean())
    return result
