"""Normalized log-probabilities, NLL in bits/dim and denoising quality (docs/method.md §3).

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


def float_rows(x, rows: slice) -> torch.Tensor:
    """Rows of the samples as float64: a float tensor as it is, a uint8 image array (N, C, H, W) — e.g. a memory
    map of the whole split, read batch by batch — as k/255."""
    if isinstance(x, torch.Tensor):
        return x[rows].double()
    return torch.from_numpy(np.array(x[rows])).double() / 255.0


def float_batches(x, batch_size: int, dequantize_seed: int | None = None):
    """x batch by batch in float64; with ``dequantize_seed``, dequantized (:func:`uniform_dequantize`) by a
    generator seeded afresh on each pass, so that every pass over x sees the same dequantized samples."""
    generator = None if dequantize_seed is None else torch.Generator().manual_seed(dequantize_seed)
    for rows in batched(len(x), batch_size):
        xb = float_rows(x, rows)
        yield xb if generator is None else uniform_dequantize(xb, generator)


def sample_dim(x) -> int:
    """d, the numbers per sample of a (N, ...) tensor or array."""
    return int(np.prod(x.shape[1:]))


@torch.no_grad()
def batch_energies(model: nn.Module, batches, t: float) -> torch.Tensor:
    """U(y, t) for every sample of an iterable of float batches, in float64 on the CPU. Kept as Python floats
    until the end: small tensors kept between the batches' large temporaries pin glibc's heap, which then grew
    with the number of batches (3.2 GB instead of 1.1 GB peak for 50,000 colour images)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    out: list[float] = []
    for yb in batches:
        yb = yb.to(device, dtype)
        out += model(yb, torch.full((len(yb),), t, device=device, dtype=dtype)).double().cpu().tolist()
    return torch.tensor(out, dtype=torch.float64)


def energies(model: nn.Module, y, t: float, batch_size: int = 64) -> torch.Tensor:
    """U(y, t) for every sample of y (a float tensor or a uint8 image array), in float64 on the CPU."""
    return batch_energies(model, float_batches(y, batch_size), t)


def normalizing_constant(model: nn.Module, x, t_max: float, generator: torch.Generator,
                         data_variance: float = 0.0, batch_size: int = 64, dequantize_seed: int | None = None) -> float:
    """C = (d/2) log(2πe (t_max + v)) − mean U(x + √t_max ε, t_max), one noise draw per sample (ε drawn batch by
    batch from ``generator``: for batches of a multiple of 16 numbers, the same ε as one draw for all of x)."""
    d = sample_dim(x)
    noisy = (xb + math.sqrt(t_max) * torch.randn(xb.shape, generator=generator, dtype=torch.float64)
             for xb in float_batches(x, batch_size, dequantize_seed))
    return 0.5 * d * math.log(2 * math.pi * math.e * (t_max + data_variance)) - batch_energies(
        model, noisy, t_max).mean().item()


def uniform_dequantize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x = k/255 → (k + u)/256 with u ~ U[0, 1): a density on [0, 1]^d whose bits/dim add exactly 8."""
    return (torch.round(x * 255) + torch.rand(x.shape, generator=generator, dtype=x.dtype)) / 256


def variance_per_dim(x, batch_size: int = 1024) -> float:
    """The samples' variance per dimension, averaged over the dimensions (unbiased; x read batch by batch)."""
    total = squares = 0.0
    for xb in float_batches(x, batch_size):
        total, squares = total + xb.sum(dim=0), squares + xb.square().sum(dim=0)
    n = len(x)
    return float(((squares - total * total / n) / (n - 1)).mean())


def nll_bits_per_dim(log_p: torch.Tensor, d: int, quantized: bool) -> torch.Tensor:
    """−log p / (d ln 2), plus 8 for 8-bit images."""
    return -log_p / (d * math.log(2)) + (8.0 if quantized else 0.0)


def bootstrap_interval(values: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean (resamples drawn in blocks of about 10⁷ indices, the same
    draws as all at once, so a million samples need no 2000 × 10⁶ index array)."""
    rng = np.random.default_rng(seed)
    block = max(1, 10_000_000 // len(values))
    means = np.concatenate([values[rng.integers(0, len(values), size=(min(block, n_resamples - start), len(values)))]
                            .mean(axis=1) for start in range(0, n_resamples, block)])
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def denoising_psnr(model: nn.Module, x, generator: torch.Generator,
                   input_psnrs=INPUT_PSNRS, batch_size: int = 64) -> list[dict[str, float]]:
    """Mean output PSNR of D(y, t) = y − t ∇_y U at each input PSNR (t = 10^(−PSNR/10), peak 1)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    rows = []
    for psnr in input_psnrs:
        t = 10.0 ** (-psnr / 10)
        out_psnr = []
        for sl in batched(len(x), batch_size):
            xb = float_rows(x, sl).to(device, dtype)
            y = xb + math.sqrt(t) * torch.randn(xb.shape, generator=generator, dtype=torch.float64).to(device, dtype)
            mse = (denoise(model, y, torch.full((len(y),), t, device=device, dtype=dtype)) - xb).square()
            out_psnr.append(-10 * torch.log10(mse.reshape(len(y), -1).mean(dim=1).double().clamp_min(1e-30)).cpu())
        rows.append({"input_psnr": float(psnr), "t": t, "output_psnr": torch.cat(out_psnr).mean().item()})
    return rows


def nll_summary(log_p: torch.Tensor, d: int, quantized: bool, seed: int) -> dict:
    """Mean NLL in bits/dim of per-sample log p, its bootstrap 95% interval and the count."""
    per_sample = nll_bits_per_dim(log_p, d, quantized).numpy()
    low, high = bootstrap_interval(per_sample, seed=seed)
    return {"nll_bits_per_dim": float(per_sample.mean()), "ci95": [low, high], "n": len(per_sample)}


def evaluate_nll(model: nn.Module, x, quantized: bool, t_max: float, dequantize: bool = False,
                 data_variance: float = 0.0, seed: int = 0, batch_size: int = 64,
                 exact_log_p: torch.Tensor | None = None, t_eval: float = 0.0, train_x=None) -> dict:
    """NLL in bits/dim by the protocol above, with its bootstrap 95% interval and per-sample log p(x).

    x (and ``train_x``) are float tensors or uint8 image arrays (N, C, H, W), read batch by batch. ``train_x``
    adds the NLL of training samples with the C of x (the paper's train / test figures: one constant, that of the
    test images). ``t_eval`` > 0 evaluates log p_t(x) = −(U(x, t) + C) instead of log p(x) (for models trained
    on t ≥ t_min > 0 only); ``exact_log_p`` (analytic data) adds the exact NLL of the same samples beside the
    model's. Dequantization noise comes from its own generators (seed + 1 for x, seed + 2 for train_x).
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    d = sample_dim(x)
    dequantize_seeds = (seed + 1, seed + 2) if dequantize else (None, None)
    constant = normalizing_constant(model, x, t_max, generator, data_variance, batch_size, dequantize_seeds[0])
    log_p = -(batch_energies(model, float_batches(x, batch_size, dequantize_seeds[0]), t_eval) + constant)
    result = {**nll_summary(log_p, d, quantized, seed), "dim": d, "log_normalizer": constant, "t_max": t_max,
              "t_eval": t_eval, "dequantized": dequantize, "quantized_data": quantized, "log_p": log_p.numpy()}
    if train_x is not None:
        train = float_batches(train_x, batch_size, dequantize_seeds[1])
        result["train"] = nll_summary(-(batch_energies(model, train, t_eval) + constant), d, quantized, seed)
    if exact_log_p is not None:
        result["exact_nll_bits_per_dim"] = float(nll_bits_per_dim(exact_log_p.double(), d, quantized).mean())
    return result
