"""The NLL protocol, checked on an energy whose normalization is known exactly."""
import math

import numpy as np
import torch
from torch import nn

from dsm_fast.data import GaussianScaleMixture
from dsm_fast.evaluate import bootstrap_interval, denoising_psnr, evaluate_nll, uniform_dequantize


class ExactMixtureEnergy(nn.Module):
    """U(y, t) = −log p_t(y) + c for a Gaussian scale mixture (c an arbitrary constant the protocol must remove)."""

    def __init__(self, mixture: GaussianScaleMixture, offset: float):
        super().__init__()
        self.mixture, self.offset = mixture, offset
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, y, t):
        y = y.reshape(len(y), -1)
        sq = y.square().sum(1)
        terms = [math.log(w) - 0.5 * y.shape[1] * torch.log(2 * math.pi * (s * s + t)) - sq / (2 * (s * s + t))
                 for w, s in zip(self.mixture.weights, self.mixture.sigmas)]
        return self.offset - torch.logsumexp(torch.stack(terms, 1), 1) + 0 * self.dummy


def test_protocol_recovers_the_exact_nll_whatever_the_offset(seed):
    mixture = GaussianScaleMixture(dim=200, sigmas=(0.5, 1.0))
    n, d = 400, 200
    x = mixture.sample(n, torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = mixture.log_prob(x)
    # C is a mean of U(y, t_max) over n draws, whose spread is ≈ √(d/2) nats: allow five standard errors
    tolerance_bits = 5 * math.sqrt(d / 2) / math.sqrt(n) / (d * math.log(2))
    for offset in (0.0, 1234.5):  # 1234.5 nats = 8.9 bits/dim that the protocol must remove
        model = ExactMixtureEnergy(mixture, offset)
        result = evaluate_nll(model, x, quantized=False, t_max=1e3, data_variance=mixture.variance_per_dim,
                              seed=seed, exact_log_p=exact)
        assert abs(result["nll_bits_per_dim"] - result["exact_nll_bits_per_dim"]) < tolerance_bits
        shift = result["log_p"] - exact.numpy()
        assert shift.std() < 1e-9  # the learned log p differs from the exact one by the constant only
        low, high = result["ci95"]
        assert low < result["nll_bits_per_dim"] < high


def test_quantized_offset_dequantization_and_bootstrap():
    values = np.random.default_rng(0).normal(3.0, 1.0, 5000)
    low, high = bootstrap_interval(values)
    assert low < 3.0 < high and high - low < 0.1
    x = torch.randint(0, 256, (10, 3, 4, 4)).double() / 255
    deq = uniform_dequantize(x, torch.Generator().manual_seed(0))
    assert torch.equal(torch.floor(deq * 256), torch.round(x * 255))


def test_denoising_psnr_of_the_exact_gaussian_denoiser():
    """For x ~ N(0, s² I), D = s²/(s² + t)·y and the output MSE is s² t/(s² + t) per dimension."""
    s2 = 0.04
    mixture = GaussianScaleMixture(dim=4096, sigmas=(math.sqrt(s2),))
    model = ExactMixtureEnergy(mixture, 0.0)
    x = mixture.sample(8, torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = denoising_psnr(model, x, torch.Generator().manual_seed(2), input_psnrs=(30, 10, -10))
    for row in rows:
        expected = -10 * math.log10(s2 * row["t"] / (s2 + row["t"]))
        assert abs(row["output_psnr"] - expected) < 0.2
