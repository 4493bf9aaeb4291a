"""Kernel-level and step-level profiling of the fused route (``dsm-fast profile``; docs/method.md §5.3).

Per op (NormAct forward, NormAct adjoint, dual-score loss terms), side by side: the plain-PyTorch reference, the
Triton kernel and the CUDA C++ kernel where built — median time, achieved bandwidth (the op's ideal traffic, each
input read once and each output written once, over the median time) and relative error ‖a − e‖/‖e‖ against the
float64 reference. Then a whole-step breakdown of the fused route (scores, loss terms, backward, optimizer) beside
the reference route's step, and optionally a torch.profiler trace. On the CPU, Triton runs only interpreted (not a
timing) and the CUDA extension cannot run: those rows say so.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .. import cuda_ext
from ..losses import objective_terms, sample_noise_levels
from ..model import UNetEnergy, adjoint
from ..routes import ReferenceRoute, noisy
from .testing import relative_error


def median_ms(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(times)


def kernel_inputs(batch: int, channels: int, size: int, device: torch.device, dtype: torch.dtype,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A NormAct input of the given shape (conv-output-like) and dual-loss inputs of the image shape."""
    h = torch.randn(batch, channels, size, size, generator=generator, device=device, dtype=torch.float64) * 2 + 0.5
    t = sample_noise_levels(batch, 1e-9, 1e3, generator, device, torch.float64)
    eps = torch.randn(batch, 3, size, size, generator=generator, device=device, dtype=torch.float64)
    d = eps[0].numel()
    return {"h": h, "gain": 1 + 0.2 * torch.randn(channels, generator=generator, device=device, dtype=torch.float64),
            "modulation": 0.2 * torch.randn(batch, channels, generator=generator, device=device, dtype=torch.float64),
            "grad_out": torch.randn_like(h), "eps": eps, "t": t,
            "grad_y": eps / t.sqrt()[:, None, None, None] + torch.randn_like(eps),
            "grad_t": d / (2 * t)}


def implementations(device: torch.device, use_triton: bool, use_cuda: bool) -> dict[str, dict[str, Callable]]:
    """op → implementation name → fn(inputs) → output tensor(s); every fn takes the same input dict."""
    from ..kernels import dual_score_loss as loss_op
    from ..kernels import norm_act as na

    def k_of(x):  # k = g (1 + m) in the statistics dtype, as the kernels take it
        return na.modulated_gain(x["h"], x["gain"], x["modulation"])

    ops = {
        "norm_act forward": {"torch (ref)": lambda x: na.norm_act_ref(x["h"], x["gain"], x["modulation"])},
        "norm_act adjoint": {"torch (ref)": lambda x: na.norm_act_adjoint_ref(x["h"], x["gain"], x["modulation"],
                                                                             x["grad_out"])},
        "dual loss terms": {"torch (ref)": lambda x: loss_op.dual_score_loss_ref(x["grad_y"], x["grad_t"], x["eps"],
                                                                                 x["t"])},
    }
    def cuda_adjoint(x):  # (h̄, m̄ = g k̄)
        grad_h, grad_k = cuda_ext.norm_act_adjoint(x["h"], k_of(x), x["grad_out"])
        return grad_h, x["gain"].to(grad_k.dtype) * grad_k

    if use_triton:
        ops["norm_act forward"]["triton"] = lambda x: na.norm_act_forward_launch(x["h"], k_of(x))[0]
        ops["norm_act adjoint"]["triton"] = lambda x: na.norm_act_adjoint(x["h"], x["gain"], x["modulation"],
                                                                           x["grad_out"])
        ops["dual loss terms"]["triton"] = lambda x: loss_op.dual_score_loss(x["grad_y"], x["grad_t"], x["eps"],
                                                                              x["t"])
    if use_cuda:
        ops["norm_act forward"]["cuda c++"] = lambda x: cuda_ext.norm_act_forward(x["h"], k_of(x))
        ops["norm_act adjoint"]["cuda c++"] = cuda_adjoint
    return ops


def ideal_bytes(op: str, x: dict[str, torch.Tensor]) -> int:
    """Each large input read once, each large output written once."""
    if op == "norm_act forward":
        return 2 * x["h"].numel() * x["h"].element_size()
    if op == "norm_act adjoint":
        return 3 * x["h"].numel() * x["h"].element_size()
    return 2 * x["eps"].numel() * x["eps"].element_size()


def profile_kernels(batch: int, channels: int, size: int, device: torch.device, dtype: torch.dtype, repeat: int,
                    use_triton: bool, use_cuda: bool, seed: int = 0) -> list[dict]:
    """One row per (op, implementation): median ms, GB/s, relative error to the float64 reference."""
    exact_inputs = kernel_inputs(batch, channels, size, device, torch.float64, torch.Generator(device).manual_seed(seed))
    inputs = {k: v.to(dtype) for k, v in exact_inputs.items()}
    rows = []
    for op, impls in implementations(device, use_triton, use_cuda).items():
        exact = impls[next(iter(impls))](exact_inputs)
        for name, fn in impls.items():
            with torch.no_grad():
                out = fn(inputs)
                ms = median_ms(lambda fn=fn: fn(inputs), device, repeat)
            error = relative_error(list(out) if isinstance(out, tuple) else out,
                                   list(exact) if isinstance(exact, tuple) else exact)
            rows.append({"op": op, "impl": name, "ms": ms, "gb_per_s": ideal_bytes(op, inputs) / ms / 1e6,
                         "rel_error": error})
    return rows


def profile_step(preset: str, batch: int, size: int, channels: int, device: torch.device, dtype: torch.dtype,
                 repeat: int, kernels: str, seed: int = 0) -> list[dict]:
    """Median ms of each phase of one fused-route training step, and the reference route's whole step."""
    torch.manual_seed(seed)
    model = UNetEnergy(channels, preset).to(device, dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator(device).manual_seed(seed)
    x = torch.rand(batch, channels, size, size, generator=g, device=device, dtype=dtype)
    t = sample_noise_levels(batch, 1e-9, 1e3, g, device, dtype)
    eps = torch.randn(x.shape, generator=g, device=device, dtype=dtype)
    state = {}

    def scores():
        state["scores"] = adjoint.energy_and_scores(model, noisy(x, t, eps), t, kernels)

    def terms():
        _, grad_y, grad_t = state["scores"]
        state["loss"] = objective_terms("dual", grad_y, grad_t, eps, t)["loss"].mean()

    def backward():
        scores()
        terms()
        optimizer.zero_grad(set_to_none=True)
        state["loss"].backward()

    reference = ReferenceRoute(model)

    def reference_step():
        optimizer.zero_grad(set_to_none=True)
        reference(x, t, eps)["loss"].mean().backward()
        optimizer.step()

    def fused_step():
        backward()
        optimizer.step()

    rows = [("fused: U, ∇_y U, ∂_t U (forward + adjoint)", scores), ("fused: + loss terms", lambda: (scores(), terms())),
            ("fused: + backward", backward), ("fused: whole step (+ Adam)", fused_step),
            ("reference: whole step", reference_step)]
    return [{"phase": name, "ms": median_ms(fn, device, repeat)} for name, fn in rows]


def trace_steps(path: str, preset: str, batch: int, size: int, channels: int, device: torch.device,
                dtype: torch.dtype, kernels: str, steps: int = 3) -> None:
    """A torch.profiler Chrome trace of a few fused-route steps (open in chrome://tracing or Perfetto)."""
    from torch.profiler import ProfilerActivity, profile

    from ..routes import FusedRoute

    model = UNetEnergy(channels, preset).to(device, dtype)
    route = FusedRoute(model, kernels=kernels)
    x = torch.rand(batch, channels, size, size, device=device, dtype=dtype)
    t = sample_noise_levels(batch, 1e-9, 1e3, device=device, dtype=dtype)
    eps = torch.randn_like(x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            route(x, t, eps)["loss"].mean().backward()
    prof.export_chrome_trace(path)


def format_kernel_table(rows: list[dict]) -> str:
    head = f"{'op':<20}{'implementation':<18}{'median ms':>11}{'GB/s':>10}{'rel error':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['op']:<20}{r['impl']:<18}{r['ms']:>11.4f}{r['gb_per_s']:>10.2f}{r['rel_error']:>12.2e}")
    return "\n".join(lines)


def format_step_table(rows: list[dict]) -> str:
    head = f"{'phase':<46}{'median ms':>11}"
    return "\n".join([head, "-" * len(head)] + [f"{r['phase']:<46}{r['ms']:>11.2f}" for r in rows])
