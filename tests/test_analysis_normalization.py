"""The test that matters most: dual score matching learns a normalized energy, single does not.

Gaussian scale mixture ½N(0, I) + ½N(0, 16 I) in d = 1000, t ∈ [1e-2, 1e2], radial energy model started
mis-normalized by −0.02·log t nats/dim (0.18 at t = 0.01): the learned log p_t(y) = −U(y, t) − C must come within
0.02 nats/dim of the exact one at every tested t under dual score matching. Single score matching cannot see any
function of t added to U: its learned log p_t moves with its start, exactly.
"""
import math

import numpy as np
import torch

from dsm_fast.analysis.normalization import TESTED_T, plot_comparison, run_comparison
from dsm_fast.data.gsm import GaussianScaleMixture
from dsm_fast.losses import sample_noise_levels
from dsm_fast.model import RadialEnergy
from dsm_fast.routes import ReferenceRoute


def test_dual_recovers_exact_log_p(tmp_path, seed):
    """The worst error over t after 1,500 steps measured 0.0031–0.0120 nats/dim over 15 seeds (0–14 and 943);
    3,000 steps do not tighten it reliably (0.0038–0.0105 over 11 seeds), hence a bound of 0.02."""
    results = run_comparison(("dual",), steps=1500, seed=seed % 1000, out=str(tmp_path / "run"))
    dual = [row["error_nats_per_dim"] for row in results["dual"]["rows"]]
    assert [row["t"] for row in results["dual"]["rows"]] == list(TESTED_T)
    assert max(dual) < 0.02, f"dual score matching errors per t (nats/dim): {dual}"
    plot_comparison(results, tmp_path / "gsm.png")
    assert (tmp_path / "gsm.png").stat().st_size > 10_000


def test_single_keeps_whatever_constant_it_starts_with(seed):
    """Two single score matching runs from starts whose log p_t differ by δ·log t nats/dim (the radial model's fixed
    time offset) train the same network, so after the t_max protocol their learned log p_t still differ by
    δ·log(t_max / t) per dimension, exactly: nothing in the loss pulls either towards the exact constant. (Where its
    constant ends is left to chance: its error at t = 0.01 after 1,500 steps ranged 0.047–0.83 nats/dim over 15
    seeds, from a start 0.18 off.)"""
    delta = 2.0**-5  # exact in the float32 buffer that holds the offset
    learned = {}
    for offset in (0.0, delta):
        rows = run_comparison(("single",), steps=100, seed=seed % 1000, radial_offset=offset)["single"]["rows"]
        learned[offset] = [row["learned"] for row in rows]
    for t, start, moved in zip(TESTED_T, learned[0.0], learned[delta]):
        np.testing.assert_allclose(moved - start, delta * math.log(TESTED_T[-1] / t), rtol=1e-9, atol=1e-12)


def test_single_loss_is_blind_to_a_function_of_t_and_dual_is_not(seed):
    """U → U + d·a·log t leaves ∇_y U, hence the single loss, unchanged; it moves ∂_t U, hence the dual loss."""
    mixture = GaussianScaleMixture(dim=50)
    model = RadialEnergy(50).double()
    x = mixture.sample(64, dtype=torch.float64)
    t = sample_noise_levels(64, 1e-2, 1e2, dtype=torch.float64)
    eps = torch.randn_like(x)
    losses = {}
    for offset in (0.0, 0.3):
        model.time_offset.fill_(offset)
        losses[offset] = {o: ReferenceRoute(model, o)(x, t, eps)["loss"].mean().item() for o in ("single", "dual")}
    assert math.isfinite(losses[0.0]["single"])
    assert abs(losses[0.3]["single"] - losses[0.0]["single"]) <= 1e-12 * losses[0.0]["single"]
    assert abs(losses[0.3]["dual"] - losses[0.0]["dual"]) > 1e-3 * losses[0.0]["dual"]
