"""Side-by-side step timing of the training routes (``dsm-fast bench``).

Every route trains the same network (same initial weights) with Adam on the same batches of uniform
[0, 1] images and log-uniform t; 'score' is the plain DSM step of the UNet used as a score network, what
a diffusion trainer pays. Median ms/step over timed steps after warm-up (CUDA events on a GPU),
images/s, peak memory, the first step's seconds (compilation, capture) apart, and each route's ratio to the
reference.

A row is a spec ``route[+compile][+graph][+channels-last]`` (route, compilation, CUDA graph and memory format
chosen independently): ``+compile`` wraps the route in torch.compile, ``+reduce-overhead`` in torch.compile's
reduce-overhead mode (its own CUDA graphs), ``+graph`` captures the whole step (terms, backward, Adam) in one
explicit CUDA graph, ``+channels-last`` keeps the convolution weights and the batches in torch.channels_last (what
cuDNN's tensor-core convolutions prefer; the Triton NormAct reads NCHW rows, so the fused route copies around it).
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time

import torch

from ..config import resolve_kernels
from ..graphs import GraphedStep
from ..losses import sample_noise_levels
from ..model import UNetEnergy
from ..routes import Compiled, ScoreRoute, make_route
from ..subnormals import flushed_subnormals

MODIFIERS = ("compile", "reduce-overhead", "graph", "channels-last")


def parse_spec(spec: str) -> tuple[str, set[str]]:
    """'fused+compile+graph' → ('fused', {'compile', 'graph'}); ValueError naming an unknown modifier."""
    route, *modifiers = spec.split("+")
    unknown = set(modifiers) - set(MODIFIERS)
    if unknown:
        raise ValueError(f"unknown modifier(s) {', '.join(sorted(unknown))} in {spec!r}; choose from "
                         f"{', '.join(MODIFIERS)}")
    return route, set(modifiers)


def step_function(spec: str, model: UNetEnergy, precision: str, kernels: str = "auto"):
    """A closure doing one full training step (terms → mean loss → backward → Adam) of the route ``spec``."""
    name, modifiers = parse_spec(spec)
    device = next(model.parameters()).device
    graph = "graph" in modifiers
    route = ScoreRoute(model.unet) if name == "score" else make_route(name, model, kernels=kernels)
    if modifiers & {"compile", "reduce-overhead"}:
        route = Compiled(route, "reduce-overhead" if "reduce-overhead" in modifiers else None)
    lr = torch.tensor(1e-4, device=device) if graph else 1e-4
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=graph)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not graph)) \
        if precision == "bf16" else contextlib.nullcontext

    def step(x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast():
            loss = route(x, t, eps)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    graphed = GraphedStep(step) if graph else step
    return (lambda x, t, eps: graphed(x, t, eps)["loss"]), route


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


def bench_routes(routes=("score", "reference", "fused"), preset: str = "paper", batch_size: int = 128,
                 image_size: int = 64, channels: int = 3, steps: int = 20, warmup: int = 3,
                 device: str | torch.device = "cuda", precision: str = "fp32", seed: int = 0,
                 progress: bool = False, kernels: str = "auto", on_row=None) -> list[dict]:
    """One row per route spec: median ms/step, img/s, peak GiB (CUDA), first step's seconds, ratio to
    'reference', final loss. ``on_row(rows)``, if given, is called with the rows so far after each route (so a run
    stopped by a time limit keeps the routes it finished)."""
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
    with flushed_subnormals(device, dtype) as flushed:  # CPU float32, as train does (dsm_fast/subnormals.py)
        for spec in routes:
            layout = torch.channels_last if "channels-last" in parse_spec(spec)[1] else torch.contiguous_format
            model = copy.deepcopy(template).to(memory_format=layout)
            batches = [(x.contiguous(memory_format=layout), t, e.contiguous(memory_format=layout)) for x, t, e in data]
            step, route = step_function(spec, model, precision, kernels)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            first = time_steps(step, batches[:1], device)[0] / 1e3  # compilation and capture happen here
            time_steps(step, [batches[i % len(batches)] for i in range(1, warmup + 1)], device)
            ms = time_steps(step, [batches[i % len(batches)] for i in range(steps)], device)
            median = statistics.median(ms)
            route_name = parse_spec(spec)[0]
            fell_back = getattr(route, "fallback", None)  # routes.Compiled: why torch.compile fell back to eager
            rows.append({"route": f"{spec} (fell back)" if fell_back else spec, "compile_fell_back": fell_back,
                         "kernels": resolve_kernels(kernels, device) if route_name == "fused" else "torch",
                         "ms_per_step": median, "img_per_s": 1e3 * batch_size / median, "first_step_s": first,
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                         "final_loss": float(step(*batches[0])), "flush_denormal": flushed})
            if progress:
                print(f"  {rows[-1]['route']}: {median:.2f} ms/step (first step {first:.1f} s)", flush=True)
            if on_row is not None:
                on_row(rows)
            del model, step, route
    reference = next((r["ms_per_step"] for r in rows if r["route"] == "reference"), None)
    for row in rows:
        row["speedup_vs_reference"] = reference / row["ms_per_step"] if reference else None
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'route':<32}{'kernels':>8}{'ms/step':>10}{'img/s':>10}{'peak GiB':>10}{'1st step s':>11}{'× ref':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        ratio = f"{r['speedup_vs_reference']:.2f}" if r["speedup_vs_reference"] else "n/a"
        lines.append(f"{r['route']:<32}{r['kernels']:>8}{r['ms_per_step']:>10.2f}{r['img_per_s']:>10.1f}{peak:>10}"
                     f"{r['first_step_s']:>11.1f}{ratio:>8}")
    lines += [f"{r['route']}: torch.compile failed ({r['compile_fell_back']}); timed eagerly"
              for r in rows if r.get("compile_fell_back")]
    if any(r.get("flush_denormal") for r in rows):
        lines.append("float32 subnormals flushed to zero on the CPU, as train does (dsm_fast/subnormals.py)")
    return "\n".join(lines)
