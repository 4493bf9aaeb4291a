"""Atlas: log p under contrast/offset against the exact mixture density, ranking and the Gumbel fit."""
import numpy as np
import torch
from test_evaluate import ExactMixtureEnergy

from dsm_fast.analysis.atlas import gumbel_fit, log_p_under_changes, ranked, transformed
from dsm_fast.data import GaussianScaleMixture


def test_log_p_under_contrast_and_offset_matches_the_exact_density(seed):
    mixture = GaussianScaleMixture(dim=64, sigmas=(0.5, 2.0))
    x = mixture.sample(20, torch.Generator().manual_seed(seed), dtype=torch.float64)
    constant = 3.5  # log p = −U − C: a constant C shifts every entry by −C/d
    changes = log_p_under_changes(ExactMixtureEnergy(mixture, 0.0), x, 0.0, constant)
    for row in changes["contrast"]:
        exact = mixture.log_prob(transformed(x, contrast=row["contrast"])).mean().item() / 64
        assert abs(row["log_p_per_dim"] - (exact - constant / 64)) < 1e-9
    for row in changes["offset"]:
        exact = mixture.log_prob(x + row["offset"]).mean().item() / 64
        assert abs(row["log_p_per_dim"] - (exact - constant / 64)) < 1e-9
    assert torch.allclose(transformed(x, contrast=0.0).std(dim=1), torch.zeros(20, dtype=torch.float64), atol=1e-12)


def test_ranking_and_gumbel_fit(seed):
    rng = np.random.default_rng(seed)
    log_p = rng.permutation(10).astype(float)
    ranks = ranked(log_p, 3)
    assert log_p[ranks["highest"]].tolist() == [9, 8, 7] and log_p[ranks["lowest"]].tolist() == [0, 1, 2]
    assert log_p[ranks["evenly spaced"]].tolist() == [9, 5, 0]  # ranks 0, round(4.5) = 4, 9
    draws = rng.gumbel(loc=-3.0, scale=0.2, size=4000)  # maxima: gumbel_r
    fit = gumbel_fit(draws)
    assert fit["family"] == "gumbel_r" and abs(fit["loc"] + 3.0) < 0.03 and abs(fit["scale"] - 0.2) < 0.02
    assert gumbel_fit(-draws)["family"] == "gumbel_l"
