"""Denoising with the energy's Tweedie denoiser D(y, t) = y − t ∇_y U(y, t) at given input PSNRs
(t = 10^(−PSNR/10) for peak 1): examples (noisy / denoised / clean) and the PSNR table of evaluate.denoising_psnr."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..model.energy import denoise


def denoise_examples(model: nn.Module, x: torch.Tensor, input_psnrs, generator: torch.Generator
                     ) -> list[dict[str, torch.Tensor | float]]:
    """Per input PSNR: y = x + √t ε and D(y, t) for the samples x (float64 on the CPU)."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    out = []
    for psnr in input_psnrs:
        t = 10.0 ** (-psnr / 10)
        y = x.double() + math.sqrt(t) * torch.randn(x.shape, generator=generator, dtype=torch.float64)
        denoised = denoise(model, y.to(device, dtype), torch.full((len(x),), t, device=device, dtype=dtype))
        out.append({"input_psnr": float(psnr), "t": t, "noisy": y, "denoised": denoised.detach().double().cpu()})
    return out


def plot_psnr(rows: list[dict[str, float]], path) -> None:
    """Output PSNR against input PSNR, with the identity (no denoising) for reference."""
    from .plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    inputs = [r["input_psnr"] for r in rows]
    ax.plot(inputs, [r["output_psnr"] for r in rows], "o-", label="D(y, t) = y − t ∇U")
    ax.plot(inputs, inputs, color="0.6", ls="--", label="identity (noisy input)")
    ax.set(xlabel="input PSNR (dB)", ylabel="output PSNR (dB)", title="denoising by the energy's score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def denoise_grid(model: nn.Module, x: torch.Tensor, input_psnrs, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The rows of a denoising picture: 'noisy, P dB' and 'denoised, P dB' per input PSNR P, then 'clean'."""
    rows = {}
    for example in denoise_examples(model, x, input_psnrs, generator):
        rows[f"noisy, {example['input_psnr']:g} dB"] = example["noisy"]
        rows[f"denoised, {example['input_psnr']:g} dB"] = example["denoised"]
    rows["clean"] = x
    return rows
