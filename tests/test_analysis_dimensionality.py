"""d_eff and E[log p_t | x] against the closed forms of a Gaussian N(0, s² I)."""
import math

import numpy as np
import torch
from test_evaluate import ExactMixtureEnergy

from dsm_fast.analysis.dimensionality import dimensionality_curves, noise_levels, plot_dimensionality
from dsm_fast.data import GaussianScaleMixture


def test_effective_dimensionality_of_a_gaussian_is_d_s2_over_s2_plus_t(tmp_path, seed):
    s2, d, n = 0.04, 2000, 8
    mixture = GaussianScaleMixture(dim=d, sigmas=(math.sqrt(s2),))
    model = ExactMixtureEnergy(mixture, 0.0)  # U = ‖y‖²/(2(s² + t)) + d/2 log(2π(s² + t))
    generator = torch.Generator().manual_seed(seed)
    x = mixture.sample(n, generator, dtype=torch.float64)
    levels = noise_levels(1e-12, 1e3, 16)
    result = dimensionality_curves(model, x, levels, 0.0, generator, noise_draws=2, progress=False)
    expected = d * s2 / (s2 + levels)
    # per image, E_ε = ‖x‖² t/(s²+t)² + d s⁴/(s²+t)²: averaged over x it is d s²/(s²+t); ‖x‖²/d ≈ s² (1 ± √(2/d))
    assert np.allclose(result["d_eff"].mean(0), expected, rtol=0.05), (result["d_eff"].mean(0), expected)
    sq = x.square().sum(1).numpy()[:, None]
    exact_log_p = -0.5 * d * np.log(2 * np.pi * (s2 + levels)) - (sq + d * levels) / (2 * (s2 + levels))
    assert np.allclose(result["log_p"], exact_log_p, atol=5 * math.sqrt(d / 4))  # a mean of 2 draws: sd ≤ √(d/4)
    plot_dimensionality(result, tmp_path / "d.png", ["a", "b"])
    assert (tmp_path / "d.png").stat().st_size > 10_000
