"""A cost report that needs no GPU (``dsm-fast profile --cost``): one training step of each route traced on the
meta device, every operator counted, and a roofline estimate of its time on an H100 and an H200.

Per route, from one steady-state step (the optimizer's state already exists; views are not counted):

    kernels      operators dispatched (a custom op of dsm_fast.kernels counts as the kernels it launches)
    flops        by torch.utils.flop_counter's formulas (convolutions, matmuls; elementwise work is not counted)
    bytes        Σ over operators of the bytes of its tensor inputs and outputs (each operator reads its inputs
                 from and writes its outputs to memory: what an unfused eager step moves); a custom op moves the
                 passes its kernels make over a tensor of its first input's size (the modules' ``LAUNCHES``)
    saved_bytes  bytes of the tensors autograd keeps for the backward (each storage once)
    peak_bytes   an estimate of the step's peak memory: weights, gradients and Adam's two moments (4 × the
                 parameters' bytes) plus saved_bytes — it leaves out the transient tensors of the backward itself
                 and the allocator's slack, so it is a lower bound to compare with the device's memory

Roofline, per operator i on device D, then summed over the step:

    t_i = max(F_i / (η_F · φ_i · P_D(dtype_i)),  B_i / (η_B · BW_D)) + n_i · τ

P the peak dense FLOP/s of the dtype's tensor-core path (fp32 convolutions run as TF32 under cuDNN's default,
fp32 matmuls as plain fp32), φ_i the share of the SMs a convolution's output tiles fill (:func:`conv_sm_fraction`),
BW the HBM bandwidth, η the achieved fractions, n_i the kernels operator i launches and τ the per-launch cost:
fitted (least squares in log time) to the three eager H100 anchors of docs/method.md §6.2 (the model:
docs/method.md §5). What it cannot see: caching, fusion by a compiler, overlap of launches with work, kernels below
peak for a reason other than bytes and small convolution grids (poor tiling, cuDNN's algorithm choice), and the
host; the compiled step has its own model (tools/inductor_cost.py).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from ..model import UNetEnergy
from ..routes import ScoreRoute, make_route


@dataclass(frozen=True)
class Device:
    """Peak dense FLOP/s per compute dtype, HBM bytes/s, and where the figures come from."""

    name: str
    peak_flops: dict[str, float]
    hbm_bytes_per_s: float
    source: str


H100 = Device("H100 SXM", {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp64": 66.9e12}, 3.35e12,
              "NVIDIA H100 Tensor Core GPU datasheet (SXM5: FP32 67, TF32 495, BF16 989 TFLOP/s dense; 3.35 TB/s)")
H200 = Device("H200 SXM", dict(H100.peak_flops), 4.8e12,
              "NVIDIA H200 Tensor Core GPU datasheet (same Hopper SMs and clocks as H100 SXM; HBM3e 4.8 TB/s)")
DEVICES = (H100, H200)
FLOP_EFFICIENCY = 0.5  # η_F: cuDNN/cuBLAS reach about half the dense peak on this UNet's conv shapes (assumed)
BANDWIDTH_EFFICIENCY = 0.8  # η_B: elementwise/reduction kernels reach ~80 % of HBM peak (STREAM-like copy)

# The output tile of one thread block of cuDNN's Hopper implicit-GEMM convolutions (kernel names
# sm90_xmma_fprop_implicit_gemm_…_tilesize128x128x64_…_segment_k_off: 128 × 128 outputs, reduction not split).
CONV_TILE = 128
SMS = 132  # streaming multiprocessors of an H100 SXM and of an H200 SXM (datasheets)

# docs/method.md §6.2, one H100 80GB, PyTorch 2.11, paper preset, batch 128, fp32, eager (ms).
ANCHORS = {"forward": 17.2, "score": 58.3, "reference": 265.0}
NOT_KERNELS = ("aten._local_scalar_dense", "aten.empty", "aten.empty_strided", "aten.empty_like", "aten.lift_fresh",
               "profiler._record_function_enter_new", "profiler._record_function_exit",
               "prim.device")  # no device work (prim.device: a fake tensor's device query)


def custom_op_launches() -> dict[str, tuple[int, float]]:
    """custom-op name → (kernels it launches per call, full passes over its first input's size), from the kernel
    modules that register them (none without Triton)."""
    if importlib.util.find_spec("triton") is None:
        return {}
    from ..kernels import cosine_attention, dual_score_loss, mp_block, norm_act

    return {**norm_act.LAUNCHES, **dual_score_loss.LAUNCHES, **cosine_attention.LAUNCHES, **mp_block.LAUNCHES}


def conv_sm_fraction(out_shape: list[int], sms: int = SMS) -> float:
    """The fraction of the SMs a convolution's output tiles can keep busy, min(1, tiles / SMs): as an implicit GEMM,
    a convolution's output (N, C, H, W) is an (N·H·W) × C matrix cut into :data:`CONV_TILE`² tiles, one per thread
    block, and its reduction (C_in × kernel area) is not split. Below one tile per SM the convolution runs at that
    fraction of the device's rate — the weight gradients that ATen's convolution double backward computes as
    forward convolutions with batch and channels swapped (a 64×64 'kernel', a 3×3 output) have 1 to 144 tiles."""
    n, c, spatial = out_shape[0], out_shape[1], math.prod(out_shape[2:])
    return min(1.0, math.ceil(n * spatial / CONV_TILE) * math.ceil(c / CONV_TILE) / sms)


@dataclass
class OpCost:
    """One dispatched operator: its name, kernels launched, FLOPs, bytes moved, its FLOPs' dtype and the fraction of
    the device's SMs its grid keeps busy (1 unless the compiled-step model says otherwise, docs/method.md §5.4)."""

    name: str
    kernels: int
    flops: int
    bytes: int
    dtype: str
    sm_fraction: float = 1.0


def _dtype_key(func_name: str, tensors: list[torch.Tensor]) -> str:
    """The peak that an operator's FLOPs run at: fp32 convolutions as TF32 (cuDNN's default), the rest by dtype."""
    dtype = tensors[0].dtype if tensors else torch.float32
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if dtype == torch.float64:
        return "fp64"
    return "tf32" if "convolution" in func_name and torch.backends.cudnn.allow_tf32 else "fp32"


class CostMode(TorchDispatchMode):
    """Records an :class:`OpCost` for every non-view operator dispatched inside it."""

    def __init__(self, launches: dict[str, tuple[int, int]] | None = None):
        super().__init__()
        self.ops: list[OpCost] = []
        self.launches = custom_op_launches() if launches is None else launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func._overloadpacket)
        if func.is_view or name in NOT_KERNELS:
            return out
        tensors = [x for x in tree_flatten((args, kwargs, out))[0] if isinstance(x, torch.Tensor)]
        packet = func._overloadpacket
        flops = int(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0
        if name in self.launches:  # a fused op: the passes its kernels make over its first input's size
            kernels, passes = self.launches[name]
            moved = int(passes * tensors[0].numel() * tensors[0].element_size())
        else:
            kernels, moved = 1, sum(x.numel() * x.element_size() for x in tensors)
        fraction = conv_sm_fraction(list(out.shape)) if name == "aten.convolution" else 1.0
        self.ops.append(OpCost(name, kernels, flops, moved, _dtype_key(name, tensors), fraction))
        return out


def saved_bytes(loss: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for ``loss``'s backward: every node's saved tensors, each storage once."""
    storages: dict[int, int] = {}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        values = list(getattr(node, "saved_tensors", ()))
        values += [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        for value in tree_flatten(values)[0]:
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage._cdata] = storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def saved_bytes_by_hooks(loss_fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(loss_fn(), bytes autograd saved while it ran, each storage once), counted by a saved-tensor pack hook: a
    checkpointed region's own hooks take its tensors, so only what survives to the backward is counted (the node
    walk of :func:`saved_bytes` would unpack, i.e. recompute, them). torch.func refuses such hooks: not for the
    functional route."""
    storages: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = loss_fn()
    return loss, sum(storages.values())


def tracing(precision: str) -> tuple[torch.device, contextlib.AbstractContextManager]:
    """(device, context) a step is traced on: the meta device, or for 'bf16' fake CPU tensors, because autocast has
    no meta device (docs/method.md §5.1: CPU autocast's bf16 rules stand in for CUDA's)."""
    if precision == "bf16":
        return torch.device("cpu"), FakeTensorMode()
    return torch.device("meta"), contextlib.nullcontext()


def step_closure(route: str, preset: str, batch: int, image_size: int, channels: int, kernels: str,
                 dtype: torch.dtype, checkpoint: str = "none", precision: str = "fp32"
                 ) -> tuple[Callable[[], torch.Tensor], Callable[[], None], int]:
    """(loss(), update(), bytes of weights + gradients + Adam's moments) of one training step of ``route``, traced
    where :func:`tracing` says (call it inside that context): 'forward' is the energy's forward alone (no
    gradient), 'score' the plain score-network step, else a route of dsm_fast.routes; Adam as on CUDA (foreach).
    ``kernels`` applies to the fused route, ``checkpoint`` ('none', 'block') to its EDM2 presets; ``precision``
    'bf16' runs loss() under bfloat16 autocast over ``dtype`` weights, as the trainer does (train.py)."""
    device, _ = tracing(precision)
    with device:
        model = UNetEnergy(channels, preset)
    if dtype != torch.float32:  # (a fake tensor's .to swaps parameters, which fake mode's memo forbids)
        model = model.to(dtype)
    if checkpoint != "none":
        model.unet.checkpoint = checkpoint
    x = torch.rand(batch, channels, image_size, image_size, device=device, dtype=dtype)
    t, eps = torch.rand(batch, device=device, dtype=dtype), torch.randn_like(x)
    state = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    if route == "forward":
        return (lambda: model(x, t).detach()), (lambda: None), state
    # Fake tensors run the custom ops' fake implementations: nothing is interpreted, though the route asks for it.
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"} if precision == "bf16" else {}):
        step = ScoreRoute(model.unet) if route == "score" else make_route(route, model, kernels=kernels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return step(x, t, eps)["loss"].mean()

    def update() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return loss, update, state


def trace_step(route: str, preset: str = "paper", batch: int = 128, image_size: int = 64, channels: int = 3,
               kernels: str = "torch", dtype: torch.dtype = torch.float32, checkpoint: str = "none",
               precision: str = "fp32") -> dict:
    """Counts of one steady-state step of ``route`` (a first step outside the count creates Adam's state)."""
    with tracing(precision)[1]:
        return _trace_step(route, preset, batch, image_size, channels, kernels, dtype, checkpoint, precision)


def _trace_step(route: str, preset: str, batch: int, image_size: int, channels: int, kernels: str,
                dtype: torch.dtype, checkpoint: str, precision: str) -> dict:
    loss_fn, update, state = step_closure(route, preset, batch, image_size, channels, kernels, dtype, checkpoint,
                                          precision)
    if route != "forward":
        loss_fn().backward()
        update()
    saved = 0
    with CostMode() as mode:
        if route == "forward":
            with torch.no_grad():
                loss_fn()
        elif checkpoint != "none":
            loss, saved = saved_bytes_by_hooks(loss_fn)
            loss.backward()
        else:
            loss = loss_fn()
            saved = saved_bytes(loss)
            loss.backward()
            update()
    return {"route": route, "kernels": sum(op.kernels for op in mode.ops), "flops": sum(op.flops for op in mode.ops),
            "bytes": sum(op.bytes for op in mode.ops), "saved_bytes": saved, "peak_bytes": state + saved,
            "ops": mode.ops}


def roofline_parts(ops: list[OpCost], device: Device) -> tuple[float, int]:
    """(Σ_i max(compute, memory) seconds, Σ_i kernels): the launch-free time and the launch count."""
    seconds = sum(max(op.flops / (FLOP_EFFICIENCY * op.sm_fraction * device.peak_flops[op.dtype]),
                      op.bytes / (BANDWIDTH_EFFICIENCY * device.hbm_bytes_per_s)) for op in ops)
    return seconds, sum(op.kernels for op in ops)


def fit_launch_overhead(anchors: dict[str, tuple[float, int]], measured_ms: dict[str, float]) -> float:
    """τ ≥ 0 minimizing Σ_a (log(T_a + N_a τ) − log M_a)² over the anchors (golden-section search in log τ)."""
    def loss(log_tau: float) -> float:
        tau = math.exp(log_tau)
        return sum((math.log(1e3 * (seconds + n * tau)) - math.log(measured_ms[a])) ** 2
                   for a, (seconds, n) in anchors.items())

    lo, hi = math.log(1e-8), math.log(1e-3)
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        lo, hi = (lo, b) if loss(a) < loss(b) else (a, hi)
    return math.exp((lo + hi) / 2)


def traceable_kernels() -> tuple[str, ...]:
    """Kernel sets of the fused route that run on the meta device: torch, and triton (custom ops with fake
    implementations) where Triton is installed."""
    return ("torch", "triton") if custom_op_launches() else ("torch",)


def cost_report(routes: tuple[str, ...] = ("score", "reference", "functional", "fused"), preset: str = "paper",
                batch: int = 128, image_size: int = 64, channels: int = 3, kernels: tuple[str, ...] = ("torch",),
                dtype: torch.dtype = torch.float32, checkpoint: str = "none", precision: str = "fp32") -> dict:
    """Counts and predicted ms per route and device; τ fitted on the anchors (always traced at the paper preset,
    batch 128, fp32, as measured); 'fused' is reported once per entry of ``kernels``, and once more per entry with
    activation ``checkpoint`` ('block', the EDM2 presets) when it is not 'none'; ``precision`` 'bf16': the routes'
    steps under bfloat16 autocast (:func:`step_closure`)."""
    anchor_traces = {a: trace_step(a) for a in ANCHORS}
    tau = fit_launch_overhead({a: roofline_parts(tr["ops"], H100) for a, tr in anchor_traces.items()}, ANCHORS)
    same = (preset, batch, image_size, channels, dtype, precision) == ("paper", 128, 64, 3, torch.float32, "fp32")
    rows = []
    checkpoints = ("none",) if checkpoint == "none" else ("none", checkpoint)
    for route in routes:
        for k, ckpt in ([(k, c) for c in checkpoints for k in kernels] if route == "fused" else [("torch", "none")]):
            trace = anchor_traces[route] if same and route in ANCHORS else trace_step(
                route, preset, batch, image_size, channels, k, dtype, ckpt, precision)
            row = {key: trace[key] for key in ("kernels", "flops", "bytes", "saved_bytes", "peak_bytes")}
            row["route"] = route if route != "fused" else f"fused ({k})" if ckpt == "none" else f"fused ({k}, ckpt)"
            row["predicted_ms"] = {}
            for device in DEVICES:
                seconds, n = roofline_parts(trace["ops"], device)
                row["predicted_ms"][device.name] = 1e3 * (seconds + n * tau)
            rows.append(row)
    anchors = []
    for a, trace in anchor_traces.items():
        seconds, n = roofline_parts(trace["ops"], H100)
        anchors.append({"anchor": a, "kernels": n, "roofline_ms": 1e3 * seconds, "predicted_ms": 1e3 * (seconds + n * tau),
                        "measured_ms": ANCHORS[a]})
    return {"rows": rows, "anchors": anchors, "launch_overhead_us": 1e6 * tau,
            "constants": {"flop_efficiency": FLOP_EFFICIENCY, "bandwidth_efficiency": BANDWIDTH_EFFICIENCY,
                          "devices": {d.name: {"peak_flops": d.peak_flops, "hbm_bytes_per_s": d.hbm_bytes_per_s,
                                               "source": d.source} for d in DEVICES}}}


def format_cost_report(report: dict) -> str:
    names = [d.name for d in DEVICES]
    head = f"{'route':<20}{'kernels':>9}{'TFLOP':>8}{'GB moved':>10}{'GB saved':>10}{'GB peak':>9}" + "".join(
        f"{n + ' ms':>14}" for n in names)
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        lines.append(f"{r['route']:<20}{r['kernels']:>9}{r['flops'] / 1e12:>8.2f}{r['bytes'] / 1e9:>10.1f}"
                     f"{r['saved_bytes'] / 1e9:>10.2f}{r['peak_bytes'] / 1e9:>9.2f}"
                     + "".join(f"{r['predicted_ms'][n]:>14.1f}" for n in names))
    lines += ["", (f"calibration on the H100 anchors (docs/method.md §6.2, eager fp32, paper preset, batch 128): "
                   f"launch overhead τ = {report['launch_overhead_us']:.2f} µs, η_F = {FLOP_EFFICIENCY}, "
                   f"η_B = {BANDWIDTH_EFFICIENCY}")]
    return "\n".join([*lines, format_anchors(report["anchors"])])


def format_anchors(anchors: list[dict], width: int = 20) -> str:
    """Predicted beside measured, per anchor."""
    head = f"{'anchor':<{width}}{'kernels':>9}{'roofline ms':>13}{'predicted ms':>14}{'measured ms':>13}{'error':>8}"
    lines = [head, "-" * len(head)]
    for a in anchors:
        error = a["predicted_ms"] / a["measured_ms"] - 1
        lines.append(f"{a['anchor']:<{width}}{a['kernels']:>9}{a['roofline_ms']:>13.1f}{a['predicted_ms']:>14.1f}"
                     f"{a['measured_ms']:>13.1f}{error:>+8.0%}")
    return "\n".join(lines)
