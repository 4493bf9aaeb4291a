"""The kernels Inductor builds for a compiled training step on an H100, counted on the CPU (no GPU, nothing run).

``torch.compile(route)`` runs Inductor's own pipeline on the CPU (Dynamo, AOTAutograd with Inductor's
decompositions, joint-graph and post-grad passes) with :func:`_lower_for_cuda` in place of its code generation:
each forward and backward graph is re-run on fake CUDA tensors (torch.cuda's device queries answered with an H100's
properties, :data:`H100_PROPERTIES`), lowered by Inductor's GraphLowering for device cuda and scheduled by its
Scheduler — whose nodes, after fusion, are the kernels it would generate:

    Triton kernel (a fused or single scheduler node)   1 launch, bytes = Inductor's own count of the buffers it
                                                        reads and writes (get_read_write_buffers_sizes)
    extern kernel (cuDNN convolution, cuBLAS matmul)   1 launch, FLOPs by torch.utils.flop_counter's formulas,
                                                        bytes as above; a convolution also the share φ of the SMs
                                                        its output tiles fill (cost.conv_sm_fraction, §5.4)
    dsm_fast custom op (Triton, kernels/*.py)          its module's LAUNCHES: launches and passes over its first
                                                        input's size

The compiled function returns empty outputs of the right shapes, so a step at batch 128 costs seconds of tracing,
not of arithmetic. The rest of the step is eager: the loss mean and fused Adam (:func:`adam_cost`). The time model
(:func:`compiled_report`) extends docs/method.md §5.2's roofline to these kernels (§5.4).
"""
from __future__ import annotations

import collections
import contextlib
import math
from unittest import mock

import torch

from .cost import OpCost, conv_sm_fraction, custom_op_launches

# torch.cuda.get_device_properties of an H100 SXM as Inductor reads it (SM count, register file, shared memory
# per block opt-in; NVIDIA H100 datasheet and the CUDA programming guide's compute capability 9.0 column).
H100_PROPERTIES = {"name": "NVIDIA H100 80GB HBM3", "major": 9, "minor": 0, "multi_processor_count": 132,
                   "total_memory": 80 * 2**30, "warp_size": 32, "max_threads_per_multi_processor": 2048,
                   "max_threads_per_block": 1024, "regs_per_multiprocessor": 65536,
                   "shared_memory_per_block_optin": 227 * 1024, "shared_memory_per_multiprocessor": 228 * 1024,
                   "L2_cache_size": 50 * 2**20, "gcnArchName": "", "uuid": "0"}
# Fused Adam (torch._fused_adam_, multi_tensor_apply): per parameter element it reads p, g, m, v and writes p, m, v
# in fp32; one launch per 36 tensors (depth-4 lists: depth_to_max_tensors in ATen's MultiTensorApply.cuh).
ADAM_PASSES, ADAM_TENSORS_PER_LAUNCH = 7, 36


def _scatter_into(inp: torch.Tensor, src: torch.Tensor, view_ops) -> torch.Tensor:
    """Inductor's reinplace pass's scatter on fake tensors, its copy by the operator rather than ``Tensor.copy_``,
    whose Python binding takes a CUDA device guard that a CPU-only torch cannot."""
    from torch.utils._pytree import tree_map

    view = inp
    for op in view_ops:
        args, kwargs = tree_map(lambda a: a.meta["val"] if isinstance(a, torch.fx.Node) else a, (op.args, op.kwargs))
        view = op.target(view, *args, **kwargs)
    torch.ops.aten.copy_.default(view, src)
    return inp


@contextlib.contextmanager
def pretend_h100():
    """torch.cuda's and Inductor's device queries answer as one H100 would (Inductor lowers and schedules for it)."""
    props = collections.namedtuple("Properties", H100_PROPERTIES)(**H100_PROPERTIES)
    interface = "torch._dynamo.device_interface.CudaInterface"
    patches = [mock.patch("torch.cuda.is_available", lambda: True), mock.patch("torch.cuda.device_count", lambda: 1),
               mock.patch("torch.cuda.current_device", lambda: 0),
               mock.patch("torch.cuda.get_device_properties", lambda *a, **k: props),
               mock.patch("torch.cuda.get_device_capability", lambda *a, **k: (9, 0)),
               mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True),
               mock.patch(f"{interface}.get_device_properties", staticmethod(lambda *a, **k: props)),
               mock.patch(f"{interface}.get_compute_capability", staticmethod(lambda *a, **k: 90)),
               mock.patch(f"{interface}.Worker.get_device_properties", staticmethod(lambda *a, **k: props)),
               mock.patch(f"{interface}.Worker.current_device", staticmethod(lambda: 0)),
               mock.patch("torch._inductor.scheduler.has_triton", lambda: True),
               mock.patch("torch._inductor.fx_passes.reinplace._inplace_generalized_scatter", _scatter_into)]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def _dtype_key(dtype: torch.dtype, extern: str) -> str:
    """The peak an extern kernel's FLOPs run at (as cost.py: fp32 convolutions as TF32 under cuDNN's default)."""
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if dtype == torch.float64:
        return "fp64"
    return "tf32" if "convolution" in extern and torch.backends.cudnn.allow_tf32 else "fp32"


def _node_cost(node, launches: dict[str, tuple[int, int]]) -> OpCost | None:
    """One scheduler node as an :class:`OpCost` (None for a node that launches nothing)."""
    from torch._inductor.scheduler import ExternKernelSchedulerNode, NopKernelSchedulerNode

    if isinstance(node, NopKernelSchedulerNode):
        return None
    if not isinstance(node, ExternKernelSchedulerNode):
        return OpCost("triton", 1, 0, int(node.get_read_write_buffers_sizes()), "fp32")
    ir_node = node.node
    op = str(getattr(ir_node, "op_overload", "") or getattr(ir_node, "python_kernel_name", "") or "")
    name = op.rsplit(".", 1)[0] if op.count(".") >= 2 else op
    if not op or type(ir_node).__name__ == "MultiOutput":  # a view of another kernel's outputs
        return None
    if name in launches:
        kernels, passes = launches[name]
        first = ir_node.inputs[0]
        numel = math.prod(int(s) for s in first.get_size())
        return OpCost(name, kernels, 0, passes * numel * first.get_dtype().itemsize, "fp32")
    flops = _flops(ir_node)
    dtype = next((x.get_dtype() for x in getattr(ir_node, "inputs", ()) if hasattr(x, "get_dtype")), torch.float32)
    fraction = conv_sm_fraction([int(d) for d in ir_node.get_size()]) if name == "aten.convolution" else 1.0
    return OpCost(name, 1, flops, int(node.get_read_write_buffers_sizes()), _dtype_key(dtype, name), fraction)



def _flops(ir_node) -> int:
    """FLOPs of an extern kernel by torch.utils.flop_counter's formulas over the FX nodes it was lowered from (the
    convolution backward's too, which Inductor's estimate_flops leaves out)."""
    from torch.utils._pytree import tree_map
    from torch.utils.flop_counter import flop_registry

    total = 0
    for fx_node in getattr(ir_node, "origins", ()):
        packet = getattr(fx_node.target, "_overloadpacket", None)
        if packet in flop_registry and "val" in fx_node.meta:
            args, kwargs = tree_map(lambda a: a.meta["val"] if isinstance(a, torch.fx.Node) else a,
                                    (fx_node.args, fx_node.kwargs))
            total += int(flop_registry[packet](*args, **kwargs, out_val=fx_node.meta["val"]))
    return total


def _lower_for_cuda(gm, example_inputs, costs: list, is_backward: bool) -> None:
    """Appends the cost of every kernel Inductor schedules for ``gm`` on an H100 (see the module doc)."""
    from torch._guards import detect_fake_mode
    from torch._inductor.compile_fx import (
        _recursive_post_grad_passes,
        _recursive_record_original_output_strides,
        fake_tensor_prop,
        view_to_reshape,
    )
    from torch._inductor.debug import DebugContext
    from torch._inductor.graph import GraphLowering
    from torch._inductor.scheduler import Scheduler
    from torch._inductor.virtualized import V

    cuda = torch.device("cuda", 0)
    for node in gm.graph.nodes:
        if node.kwargs.get("device") == torch.device("cpu"):
            node.kwargs = {**node.kwargs, "device": cuda}
    gm.recompile()
    with detect_fake_mode(example_inputs):
        inputs = [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=cuda)
                  if isinstance(x, torch.Tensor) else x for x in example_inputs]
    launches = custom_op_launches()
    with pretend_h100(), DebugContext():
        view_to_reshape(gm)
        with torch.no_grad():
            fake_mode = fake_tensor_prop(gm, inputs)
        _recursive_record_original_output_strides(gm)
        with V.set_fake_mode(fake_mode):
            _recursive_post_grad_passes(gm, is_inference=False)
            graph = GraphLowering(gm, example_inputs=inputs, is_backward=is_backward, is_inference=False)
            with V.set_graph_handler(graph):
                graph.run(*inputs)
                costs += [c for c in (_node_cost(n, launches) for n in Scheduler(graph.operations).nodes) if c]


def _counting_backend(costs: dict[str, list]):
    """A torch.compile backend: Inductor's pipeline up to its inner compile, which counts (``costs['forward']``,
    ``costs['backward']``) and returns a function producing empty outputs of the graph's shapes."""
    from torch._inductor.compile_fx import compile_fx

    def inner(gm, example_inputs, **kwargs):
        is_backward = bool(kwargs.get("is_backward", False))
        output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        values = [getattr(o, "meta", {}).get("val") if o is not None else None for o in output]
        _lower_for_cuda(gm, example_inputs, costs["backward" if is_backward else "forward"], is_backward)

        def run(args):
            args.clear()
            return [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype) if isinstance(v, torch.Tensor) else v
                    for v in values]

        run._boxed_call = True
        return run

    return lambda gm, example_inputs: compile_fx(gm, example_inputs, inner_compile=inner)


def compiled_step_costs(route: str, preset: str = "paper", batch: int = 128, image_size: int = 64,
                        channels: int = 3, precision: str = "fp32") -> dict[str, list[OpCost]]:
    """{'forward', 'backward'}: the kernels of ``route``'s compiled terms function ('score', 'functional' or
    'fused' with the Triton kernels) as Inductor builds them for an H100; ``precision`` 'bf16' traces under
    autocast (CPU autocast: its bfloat16 list and CUDA's agree on every op of these steps)."""
    from ..model import UNetEnergy
    from ..routes import FusedRoute, ScoreRoute, make_route

    torch._dynamo.reset()
    with torch.device("meta"):
        model = UNetEnergy(channels, preset)
    step = (ScoreRoute(model.unet) if route == "score" else FusedRoute(model, kernels="triton") if route == "fused"
            else make_route(route, model))
    model.to_empty(device="cpu")  # uninitialized: nothing is computed
    x = torch.zeros(batch, channels, image_size, image_size)
    t, eps = torch.ones(batch), torch.zeros_like(x)
    costs: dict[str, list] = {"forward": [], "backward": []}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with autocast:
        loss = torch.compile(step, backend=_counting_backend(costs))(x, t, eps)["loss"].mean()
    loss.backward()
    torch._dynamo.reset()
    return costs


def adam_cost(preset: str = "paper", channels: int = 3) -> OpCost:
    """Fused Adam over the model's fp32 parameters (:data:`ADAM_PASSES`, :data:`ADAM_TENSORS_PER_LAUNCH`)."""
    from ..model import UNetEnergy

    with torch.device("meta"):
        params = list(UNetEnergy(channels, preset).parameters())
    numel = sum(p.numel() for p in params)
    return OpCost("adam (fused)", -(-len(params) // ADAM_TENSORS_PER_LAUNCH), 0, ADAM_PASSES * 4 * numel, "fp32")


# docs/method.md §6.2, one H100 80GB, PyTorch 2.11, paper preset, batch 128, Adam, median of 20 steps (ms).
COMPILED_ANCHORS = {("score", "fp32"): 26.9, ("score", "bf16"): 16.2, ("functional", "fp32"): 169.0}
# Per kernel of a replayed CUDA graph: NVIDIA's "Getting Started with CUDA Graphs" (technical blog, 2019) measured
# 3.4 µs per kernel replayed from a graph against 3.8 µs launched in a stream, for kernels of ≈ 2.9 µs — under
# 1 µs of launch gap per kernel node; we take 1 µs.
GRAPH_LAUNCH_S = 1.0e-6
LOSS_EAGER_LAUNCHES = 2  # the loss mean outside the compiled function and its backward's fill


def step_ops(route: str, preset: str, batch: int, image_size: int, channels: int, precision: str) -> list[OpCost]:
    """Every kernel of one compiled step: the compiled forward and backward, the eager loss mean, fused Adam."""
    costs = compiled_step_costs(route, preset, batch, image_size, channels, precision)
    return [*costs["forward"], *costs["backward"], OpCost("loss mean", LOSS_EAGER_LAUNCHES, 0, 0, "fp32"),
            adam_cost(preset, channels)]


def step_parts(ops: list[OpCost], device) -> tuple[float, float, int]:
    """(seconds of the FLOP-carrying extern kernels by cost.py's roofline, bytes of the memory-bound kernels, kernels):
    a step's time is then ``extern + bytes / (η_mem · BW) + kernels · τ``."""
    from .cost import BANDWIDTH_EFFICIENCY, FLOP_EFFICIENCY

    extern = sum(max(o.flops / (FLOP_EFFICIENCY * o.sm_fraction * device.peak_flops[o.dtype]),
                     o.bytes / (BANDWIDTH_EFFICIENCY * device.hbm_bytes_per_s)) for o in ops if o.flops)
    return extern, sum(o.bytes for o in ops if not o.flops), sum(o.kernels for o in ops)


def step_ms(parts: tuple[float, float, int], device, tau: float, eta: float) -> float:
    extern, memory, kernels = parts
    return 1e3 * (extern + memory / (eta * device.hbm_bytes_per_s) + kernels * tau)


def breakdown(ops: list[OpCost], device, tau: float, eta: float) -> list[dict]:
    """Where a step's predicted time goes: per op name (Inductor's Triton kernels together), its kernels, bytes and
    predicted ms, largest first — what to remove first."""
    names: dict[str, list[OpCost]] = collections.defaultdict(list)
    for op in ops:
        names[op.name].append(op)
    rows = [{"op": name, "kernels": sum(o.kernels for o in group), "bytes": sum(o.bytes for o in group),
             "ms": step_ms(step_parts(group, device), device, tau, eta)} for name, group in names.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def fit_compiled(parts: dict, measured_ms: dict, device) -> tuple[float, float]:
    """(τ, η_mem) minimizing Σ_a (log predicted − log measured)² over the anchors, τ ≥ :data:`GRAPH_LAUNCH_S`
    (a launch costs at least a graph replay's), 0.05 ≤ η_mem ≤ 0.8 (a grid of 0.5 µs × 0.005)."""
    def loss(tau: float, eta: float) -> float:
        return sum(math.log(step_ms(p, device, tau, eta) / measured_ms[a]) ** 2 for a, p in parts.items())

    grid = [(GRAPH_LAUNCH_S + 0.5e-6 * i, 0.05 + 0.005 * j) for i in range(120) for j in range(151)]
    return min(grid, key=lambda point: loss(*point))


def compiled_report(preset: str = "paper", batch: int = 128, image_size: int = 64, channels: int = 3,
                    routes: tuple[str, ...] = ("score", "fused"), precisions: tuple[str, ...] = ("fp32", "bf16"),
                    progress=print) -> dict:
    """Predicted ms of each compiled step, with and without a CUDA graph, on each device of cost.py: the extern
    kernels (cuDNN, cuBLAS) by cost.py's roofline, the memory-bound kernels (Inductor's Triton kernels, our custom
    ops, Adam) at a fraction η_mem of HBM bandwidth, plus τ per launch — τ and η_mem fitted on
    :data:`COMPILED_ANCHORS` (always traced at the paper preset, batch 128); replayed from a graph, τ is
    :data:`GRAPH_LAUNCH_S`."""
    from .cost import DEVICES, H100

    traced: dict[tuple, list[OpCost]] = {}

    def ops(route: str, precision: str, shape: tuple) -> list[OpCost]:
        key = (route, precision, *shape)
        if key not in traced:
            progress(f"  tracing {route} + compile, {precision}, preset {shape[0]}, batch {shape[1]} …")
            traced[key] = step_ops(route, *shape, precision)
        return traced[key]

    paper = ("paper", 128, 64, 3)
    anchor_parts = {a: step_parts(ops(*a, paper), H100) for a in COMPILED_ANCHORS}
    tau, eta = fit_compiled(anchor_parts, COMPILED_ANCHORS, H100)
    anchors = [{"anchor": f"{r} + compile, {p}", "kernels": parts[2],
                "roofline_ms": step_ms(parts, H100, 0.0, 1.0), "predicted_ms": step_ms(parts, H100, tau, eta),
                "measured_ms": COMPILED_ANCHORS[r, p]} for (r, p), parts in anchor_parts.items()]
    rows = []
    for route in routes:
        for precision in precisions:
            step = ops(route, precision, (preset, batch, image_size, channels))
            for graph in (False, True):
                row = {"route": f"{route} + compile{' + graph' if graph else ''}", "precision": precision,
                       "kernels": sum(o.kernels for o in step), "triton_kernels": sum(o.name == "triton" for o in step),
                       "flops": sum(o.flops for o in step), "bytes": sum(o.bytes for o in step),
                       "predicted_ms": {d.name: step_ms(step_parts(step, d), d, GRAPH_LAUNCH_S if graph else tau, eta)
                                        for d in DEVICES},
                       "by_op": breakdown(step, H100, GRAPH_LAUNCH_S if graph else tau, eta)}
                rows.append(row)
    by = {(r["route"], r["precision"]): r["predicted_ms"][H100.name] for r in rows}
    ratio = {p: by.get(("fused + compile + graph", p), math.nan) / by.get(("score + compile + graph", p), math.nan)
             for p in precisions}
    return {"rows": rows, "anchors": anchors, "launch_overhead_compiled_us": 1e6 * tau,
            "launch_overhead_graph_us": 1e6 * GRAPH_LAUNCH_S, "memory_efficiency": eta,
            "fused_over_score_graph_h100": ratio}


def format_compiled_report(report: dict) -> str:
    from .cost import DEVICES, format_anchors

    names = [d.name for d in DEVICES]
    head = f"{'compiled step':<26}{'dtype':<6}{'kernels':>8}{'Triton':>7}{'TFLOP':>7}{'GB moved':>10}" + "".join(
        f"{n + ' ms':>14}" for n in names)
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        lines.append(f"{r['route']:<26}{r['precision']:<6}{r['kernels']:>8}{r['triton_kernels']:>7}"
                     f"{r['flops'] / 1e12:>7.2f}{r['bytes'] / 1e9:>10.1f}"
                     + "".join(f"{r['predicted_ms'][n]:>14.1f}" for n in names))
    lines += ["", "fused / score, compiled + CUDA graph, H100: " + ", ".join(
        f"{p} {v:.2f}" for p, v in report["fused_over_score_graph_h100"].items())]
    for r in report["rows"]:
        if r["route"] == "fused + compile + graph":
            lines.append(f"where the {r['precision']} fused step's predicted H100 time goes: " + ", ".join(
                f"{b['op'].removeprefix('dsm_fast.').removeprefix('aten.')} {b['ms']:.1f} ms" for b in r["by_op"][:6]))
    lines += ["", (f"calibration on the compiled H100 anchors (docs/method.md §6.2, paper preset, batch 128), fitted: "
                   f"memory-bound kernels at η_mem = {report['memory_efficiency']:.3f} of HBM bandwidth, launch cost "
                   f"τ = {report['launch_overhead_compiled_us']:.1f} µs per kernel (at least a graph replay's "
                   f"{report['launch_overhead_graph_us']:.1f} µs, GRAPH_LAUNCH_S); extern kernels by cost.py's "
                   f"roofline")]
    return "\n".join([*lines, format_anchors(report["anchors"], 26)])
