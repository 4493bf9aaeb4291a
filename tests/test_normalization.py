"""The test that matters most: dual score matching learns a normalized energy, single does not.

Gaussian scale mixture ½N(0, I) + ½N(0, 16 I) in d = 1000, t ∈ [1e-2, 1e2], radial energy model:
the learned log p_t(y) = −U(y, t) − C must be within 0.01 nats/dim of the exact one at every tested t.
"""
from dsm_fast.normalization import TESTED_T, plot_comparison, run_comparison


def test_dual_recovers_exact_log_p_and_single_does_not(tmp_path, seed):
    results = run_comparison(("dual", "single"), steps=1500, seed=seed % 1000, out=str(tmp_path / "run"))
    dual = [row["error_nats_per_dim"] for row in results["dual"]["rows"]]
    single = [row["error_nats_per_dim"] for row in results["single"]["rows"]]
    assert [row["t"] for row in results["dual"]["rows"]] == list(TESTED_T)
    assert max(dual) < 0.01, f"dual score matching errors per t (nats/dim): {dual}"
    assert max(single) > 0.03, f"single score matching recovered the constant unexpectedly: {single}"
    plot_comparison(results, tmp_path / "gsm.png")
    assert (tmp_path / "gsm.png").stat().st_size > 10_000
