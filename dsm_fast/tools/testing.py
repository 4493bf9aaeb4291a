"""Comparison helpers shared by the tests and the benchmarks (which check correctness as they time)."""
from __future__ import annotations

import torch

# Relative-error bounds for a fast path against the float64/eager reference, per compute dtype.
TOLERANCES = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 1e-2}


def flat(tensors) -> torch.Tensor:
    """Concatenate tensors (or a dict's values, in key order) into one float64 vector."""
    if isinstance(tensors, dict):
        tensors = [tensors[k] for k in sorted(tensors)]
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in tensors])


def relative_error(actual, expected) -> float:
    """‖a − e‖ / ‖e‖ over the flattened tensors; NaN or inf anywhere gives inf."""
    a, e = flat(actual if isinstance(actual, (list, tuple, dict)) else [actual]), flat(
        expected if isinstance(expected, (list, tuple, dict)) else [expected])
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return float("inf")
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def assert_rel_close(actual, expected, tol: float, what: str = "value", seed: int | None = None) -> None:
    """Fail unless both are finite and ‖a − e‖/‖e‖ < tol; the message gives max abs/rel error, the first
    mismatching positions and the seed that replays the draw."""
    err = relative_error(actual, expected)
    if err < tol:
        return
    a, e = flat(actual if isinstance(actual, (list, tuple, dict)) else [actual]), flat(
        expected if isinstance(expected, (list, tuple, dict)) else [expected])
    diff = (a - e).abs()
    worst = torch.argsort(diff.nan_to_num(float("inf")), descending=True)[:5].tolist()
    rows = ", ".join(f"[{i}] {a[i].item():.6g} vs {e[i].item():.6g}" for i in worst)
    replay = f" (seed {seed}; replay with DSM_FAST_TEST_SEED={seed})" if seed is not None else ""
    raise AssertionError(
        f"{what}: relative error {err:.3g} ≥ {tol:.1g}{replay}; max abs {diff.nan_to_num(float('inf')).max():.3g}, "
        f"NaN in actual: {bool(torch.isnan(a).any())}; worst: {rows}")
