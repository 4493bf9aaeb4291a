"""What ``dsm-fast restore`` reports about restorations: PSNR and SSIM against the truth, the Gaussian baseline
(the Wiener solution under the Gaussian N(μ, v I) of the training pixels, which an ``--energy gaussian`` run
starts from), and, on the Gaussian scale mixture, the distance to the exact posterior (measurements.py)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .measurements import LinearMeasurement, gaussian_posterior_mean, mixture_posterior


def psnr(estimate: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """Per image, 10 log₁₀(1 / MSE) dB (peak 1)."""
    mse = (estimate.double() - truth.double()).square().reshape(len(truth), -1).mean(1)
    return (-10 * torch.log10(mse.clamp_min(1e-30))).cpu().numpy()


def ssim(estimate: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """Per image, the structural similarity of scikit-image (7 × 7 windows, data range 1, channels averaged)."""
    from skimage.metrics import structural_similarity

    return np.array([structural_similarity(t.numpy(), e.clip(0, 1).numpy(), data_range=1.0, channel_axis=0)
                     for e, t in zip(estimate.double().cpu(), truth.double().cpu())])


def gaussian_start_statistics(model: nn.Module, train_images) -> tuple[float, float]:
    """(μ, v) of the Gaussian prior an image energy starts from: the buffers of an ``--energy gaussian`` model,
    else the training pixels' mean and variance (what those buffers are set to)."""
    from ..data.images import pixel_statistics

    for module in model.modules():
        if hasattr(module, "data_mean") and hasattr(module, "data_variance"):
            return float(module.data_mean), float(module.data_variance)
    return pixel_statistics(train_images)


def wiener(op: LinearMeasurement, m: torch.Tensor, mean: float, variance: float, noise: float) -> torch.Tensor:
    """The exact posterior mean under x ~ N(μ, v I) (measurements.gaussian_posterior_mean), float64."""
    m = m.double().cpu()
    return gaussian_posterior_mean(op, m, torch.full((1, *op.sample_shape), mean, dtype=torch.float64), variance,
                                   noise)


def image_rows(truth: torch.Tensor, restored: torch.Tensor, baseline: torch.Tensor) -> dict:
    """PSNR and SSIM of the restorations and of the Wiener baseline, per image and on average."""
    rows = {"psnr": psnr(restored, truth), "ssim": ssim(restored, truth),
            "wiener_psnr": psnr(baseline, truth), "wiener_ssim": ssim(baseline, truth)}
    return {"per_image": {key: value.tolist() for key, value in rows.items()},
            "mean": {key: float(value.mean()) for key, value in rows.items()}}


def mixture_rows(op: LinearMeasurement, m: torch.Tensor, noise: float, mixture, t: float,
                 restored: torch.Tensor, samples: torch.Tensor | None) -> dict:
    """Against the exact GSM posterior of p_t: per measurement the exact component weights, the RMS per coordinate
    of (restoration − exact posterior mean) and of the measurement's misfit A x̂ − m, and with samples (B, S, d)
    their component weights (mean responsibility)."""
    exact = mixture_posterior(op, m.double().cpu(), mixture.sigmas, mixture.weights, noise, t)
    restored = restored.double().cpu()
    out = {"exact_weights": exact["weights"].tolist(),
           "rms_from_exact_mean": ((restored - exact["mean"]).square().mean(1).sqrt()).tolist(),
           "measurement_misfit": ((op.apply(restored) - m.double().cpu()).square().mean(1).sqrt()).tolist()}
    if samples is not None:
        weights = mixture.responsibilities(samples.cpu().reshape(-1, mixture.dim), t)
        out["sample_weights"] = weights.reshape(*samples.shape[:2], -1).mean(1).tolist()
    return out
