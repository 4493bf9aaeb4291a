"""Side-by-side step timing of the training routes (``dsm-fast bench``).

Every route trains the same network (same initial weights) with Adam on the same batches of uniform
[0, 1] images and log-uniform t; 'score' is the plain DSM step of the UNet used as a score network, what
a diffusion trainer pays. Median ms/step over timed steps after warm-up (CUDA events on a GPU),
images/s, peak memory, and each route's ratio to the reference.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time

import torch

from .losses import sample_noise_levels
from .model import UNetEnergy
from .routes import ScoreRoute, make_route


def step_function(route_name: str, model: UNetEnergy, precision: str):
    """A closure doing one full training step (terms → mean loss → backward → Adam) of ``route_name``."""
    route = ScoreRoute(model.unet) if route_name == "score" else make_route(route_name, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=next(model.parameters()).is_cuda)
    device_type = next(model.parameters()).device.type
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext

    def step(x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        with autocast():
            loss = route(x, t, eps)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step, route


def time_steps(step, batches, device: torch.device) -> list[float]:
    """Milliseconds of each call of ``step`` on each batch (CUDA events on a GPU, wall clock on the CPU)."""
    times = []
    for batch in batches:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(*batch)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step(*batch)
            times.append(1e3 * (time.perf_counter() - begin))
    return times


def bench_routes(routes=("score", "reference", "compiled"), preset: str = "paper", batch_size: int = 128,
                 image_size: int = 64, channels: int = 3, steps: int = 20, warmup: int = 3,
                 device: str | torch.device = "cuda", precision: str = "fp32", seed: int = 0,
                 progress: bool = False) -> list[dict]:
    """One row per route: median ms/step, img/s, peak GiB (CUDA), ratio to 'reference', final loss."""
    device = torch.device(device)
    dtype = torch.float64 if precision == "fp64" else torch.float32
    torch.manual_seed(seed)
    template = UNetEnergy(channels, preset).to(device, dtype)
    g = torch.Generator(device).manual_seed(seed)

    def batch():
        x = torch.rand(batch_size, channels, image_size, image_size, generator=g, device=device, dtype=dtype)
        t = sample_noise_levels(batch_size, 1e-9, 1e3, g, device, dtype)
        return x, t, torch.randn(x.shape, generator=g, device=device, dtype=dtype)

    data = [batch() for _ in range(min(steps, 4))]
    rows = []
    for name in routes:
        model = copy.deepcopy(template)
        step, route = step_function(name, model, precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        time_steps(step, [data[i % len(data)] for i in range(warmup)], device)
        ms = time_steps(step, [data[i % len(data)] for i in range(steps)], device)
        median = statistics.median(ms)
        rows.append({"route": name if not getattr(route, "fell_back", False) else f"{name} (fell back)",
                     "ms_per_step": median, "img_per_s": 1e3 * batch_size / median,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                     "final_loss": float(step(*data[0]))})
        if progress:
            print(f"  {rows[-1]['route']}: {median:.2f} ms/step", flush=True)
        del model, step, route
    reference = next((r["ms_per_step"] for r in rows if r["route"] == "reference"), None)
    for row in rows:
        row["speedup_vs_reference"] = reference / row["ms_per_step"] if reference else None
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'route':<24}{'ms/step':>10}{'img/s':>10}{'peak GiB':>10}{'× ref':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        ratio = f"{r['speedup_vs_reference']:.2f}" if r["speedup_vs_reference"] else "n/a"
        lines.append(f"{r['route']:<24}{r['ms_per_step']:>10.2f}{r['img_per_s']:>10.1f}{peak:>10}{ratio:>8}")
    return "\n".join(lines)
