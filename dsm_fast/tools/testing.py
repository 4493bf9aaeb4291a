"""Comparison helpers and small fixtures shared by the tests and the benchmarks (which check correctness as they
time): the tolerances per dtype, relative errors that refuse NaN, a route's parameter gradients, perturbed weights,
batches spanning the noise levels, and a tiny training configuration."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

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
    if isinstance(actual, dict) and isinstance(expected, dict) and actual.keys() != expected.keys():
        raise AssertionError(f"different keys: {sorted(actual.keys() ^ expected.keys())}")
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


def parameter_gradients(model: torch.nn.Module, route, x: torch.Tensor, t: torch.Tensor,
                        eps: torch.Tensor) -> list[torch.Tensor]:
    """∂/∂θ of the batch-mean loss that ``route`` (a route object of dsm_fast.routes) computes at (x, t, ε), one
    tensor per parameter of ``model``, in ``model.parameters()`` order."""
    model.zero_grad(set_to_none=True)
    route(x, t, eps)["loss"].mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def assert_scores_equal_autograd(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                                 tol: float, seed: int | None = None, kernels: str = "torch") -> None:
    """(U, ∇_y U, ∂_t U) of the explicit adjoint (dsm_fast.model.adjoint) equal autograd's at y = x + √t ε, each
    within ``tol`` relative (none of the reference values zero: a vanishing reference would prove nothing)."""
    from ..model import adjoint, energy_and_scores
    from ..routes import noisy

    y = noisy(x, t, eps)
    expected = energy_and_scores(model, y, t)
    actual = adjoint.energy_and_scores(model, y, t, kernels)
    for name, a, e in zip(("U", "∇_y U", "∂_t U"), actual, expected):
        assert_rel_close(a, e, tol, f"{name} ({kernels})", seed)
        assert e.abs().min() > 0, f"{name}: the reference has zeros"


def perturbed(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """``model`` with every parameter moved off its initial value by scale·N(0, 1) (gains off 1, the last layer off
    zero), in place, so that every path of the network carries weight in a gradient comparison."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def draw_batch(n: int, channels: int, size: int = 16, dtype: torch.dtype = torch.float64):
    """(x, t, ε): images in [0, 1], t at both ends of [1e-9, 1e3] with n − 2 log-uniform draws between, noise."""
    x = torch.rand(n, channels, size, size, dtype=dtype)
    middle = torch.exp(math.log(1e-9) + torch.rand(n - 2, dtype=torch.float64) * math.log(1e12))
    t = torch.cat([torch.tensor([1e-9], dtype=torch.float64), middle, torch.tensor([1e3], dtype=torch.float64)])
    return x, t.to(dtype), torch.randn_like(x)


def tiny_config(out, **changes):
    """A validated TrainConfig of the tiny preset on 16×16 images that trains in seconds on the CPU (batch 4, 6 steps,
    EMA, no progress bar, no held-out evaluation), with ``changes`` applied."""
    from ..config import TrainConfig

    base = TrainConfig(model="tiny", image_size=16, batch_size=4, steps=6, out=str(out), progress=False,
                       log_every=2, checkpoint_every=100, ema_decay=0.9, eval_images=0, device="cpu")
    return dataclasses.replace(base, **changes).validate()


def read_json(path: Path):
    """The JSON a command wrote (``--json``)."""
    return json.loads(Path(path).read_text())


def state_bytes(engine) -> int:
    """Bytes this rank holds of parameters, gradients and optimizer state, each storage once. Under DeepSpeed ZeRO-3
    (an optimizer with ``fp32_partitioned_groups_flat``) that is its partitions: each weight's ``ds_tensor``, the
    fp32 master flats (DeepSpeed 0.19 copies them apart from fp32 weights' own partitions), the flat gradient
    partition buffer and the inner Adam's state; else the parameters, their ``.grad`` and the optimizer's state."""
    optimizer = engine.optimizer
    params = list(engine.module.parameters())
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        tensors = [p.ds_tensor for p in params] + list(optimizer.fp32_partitioned_groups_flat)
        tensors.append(optimizer.grad_partitions_flat_buffer)
        optimizer = optimizer.optimizer  # ZeRO wraps torch's Adam over the fp32 flats
    else:
        tensors = params + [p.grad for p in params if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())
