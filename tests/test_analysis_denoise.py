"""The denoising examples are the Tweedie denoiser: for N(0, s² I), D(y, t) = s²/(s² + t) · y exactly."""
import math

import torch
from test_evaluate import ExactMixtureEnergy

from dsm_fast.analysis.denoising import denoise_examples, plot_psnr
from dsm_fast.data import GaussianScaleMixture


def test_denoised_examples_are_the_exact_gaussian_denoiser(tmp_path, seed):
    s2 = 0.04
    mixture = GaussianScaleMixture(dim=256, sigmas=(math.sqrt(s2),))
    x = mixture.sample(4, torch.Generator().manual_seed(seed), dtype=torch.float64)
    examples = denoise_examples(ExactMixtureEnergy(mixture, 0.0), x, (30, 0), torch.Generator().manual_seed(seed))
    for example in examples:
        t = example["t"]
        assert math.isclose(t, 10 ** (-example["input_psnr"] / 10))
        assert torch.allclose(example["denoised"], s2 / (s2 + t) * example["noisy"], atol=1e-12)
        assert abs((example["noisy"] - x).square().mean().item() / t - 1) < 0.2
    plot_psnr([{"input_psnr": 30.0, "output_psnr": 31.0}, {"input_psnr": 0.0, "output_psnr": 14.0}],
              tmp_path / "psnr.png")
    assert (tmp_path / "psnr.png").stat().st_size > 10_000
