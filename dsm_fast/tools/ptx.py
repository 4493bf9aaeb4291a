"""Every Triton kernel of dsm_fast.kernels compiled for named NVIDIA GPUs, with no GPU (``dsm-fast profile --ptx``;
docs/method.md §5.5).

1. The step. One fused-route training step (kernels 'triton', the route ``--route auto`` picks on CUDA) of a UNet
   preset is traced on fake tensors (shapes, strides and dtypes; no data): float32, bfloat16 under autocast as
   ``--precision bf16`` runs it (CPU autocast: its bfloat16 list and CUDA's agree on every op of this step —
   convolutions, their transposes, linear/addmm), and float64. Every call of a dsm_fast custom operator is written
   down with its arguments and how often the step makes it.
2. The launches. Each call's launcher (kernels/*.py) runs on meta tensors of those shapes inside kernels/launch.py's
   ``recording()``: the launcher's own choice of grid, block sizes, warps and argument dtypes, nothing launched.
3. The compile. Each distinct launch is specialized as Triton's JIT specializes it on a GPU (its binder: argument
   types, 16-byte divisibility of pointers and integers, constexprs) and compiled by ``triton.compile`` for each
   target, with the ptxas inside the Triton wheel. Triton's CompiledKernel reports registers and spills only once a
   driver loads it (3.6 and 3.9 alike), so they are read from the cubin by the wheel's ``cuobjdump
   --dump-resource-usage`` (REG: registers per thread, STACK: the stack frame, which holds spills and a call's
   frame, SHARED: static shared memory) and from the log of the ptxas run Triton makes (spill stores: the spills
   proper; an fp64 division's slow-path call has a stack frame and no spill); Triton's metadata gives the dynamic
   shared memory it requests.
4. The check. A configuration can launch when its warps' registers fit the SM's register file, its shared memory
   the per-block limit, its threads and grid the launch limits; a kernel launched more than once per step (per
   layer) must not spill. Compiles run in parallel (fork) and Triton's own cache (~/.triton/cache) makes a rerun
   of an unchanged kernel cheap.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

PRECISIONS = ("fp32", "bf16", "fp64")
MP_BLOCK_OPS = ("weight_norms", "weight_norms_backward", "pixel_norm_silu", "pixel_norm_silu_adjoint",
                "pixel_norm_silu_adjoint_backward", "mod_silu", "mod_silu_adjoint", "mod_silu_adjoint_backward", "mp_sum",
                "masked_split")  # kernels/mp_block.py's, each launched by <name>_launch
OPS = ("dsm_fast::norm_act", "dsm_fast::norm_act_statistics", "dsm_fast::norm_act_adjoint",
       "dsm_fast::norm_act_adjoint_backward", "dsm_fast::dual_score_loss", "dsm_fast::dual_score_loss_backward",
       "dsm_fast::cosine_attention", "dsm_fast::cosine_attention_adjoint", "dsm_fast::cosine_attention_adjoint_backward",
       *(f"dsm_fast::{name}" for name in MP_BLOCK_OPS))


@dataclass(frozen=True)
class Target:
    """An NVIDIA GPU architecture and the launch limits a kernel must fit, from the CUDA C++ Programming Guide's
    table "Technical Specifications per Compute Capability" (8.0 and 9.0 columns; the opt-in shared memory per
    block is cudaDevAttrMaxSharedMemoryPerBlockOptin: 163 KB on A100, 227 KB on H100 — the Ampere and Hopper
    tuning guides say the same). Registers are allocated per warp in units of 256 (8 per thread)."""

    name: str
    arch: int
    max_shared_per_block: int
    registers_per_sm: int = 65536  # 64K 32-bit registers per SM, and at most 64K per block
    max_registers_per_thread: int = 255
    max_threads_per_block: int = 1024
    max_grid: tuple[int, int, int] = (2**31 - 1, 65535, 65535)


TARGETS = (Target("sm_80", 80, 163 * 1024), Target("sm_90", 90, 227 * 1024))


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def meta(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")


def launchers() -> dict[str, object]:
    """custom-op name → its launcher (the function its CUDA implementation calls)."""
    from ..kernels import cosine_attention, dual_score_loss, mp_block, norm_act

    return {**{f"dsm_fast::{name}": getattr(mp_block, f"{name}_launch") for name in MP_BLOCK_OPS},
            "dsm_fast::cosine_attention": cosine_attention.attention_forward_launch,
            "dsm_fast::cosine_attention_adjoint": cosine_attention.attention_adjoint_launch,
            "dsm_fast::cosine_attention_adjoint_backward": cosine_attention.attention_adjoint_backward_launch,
            "dsm_fast::norm_act": norm_act.norm_act_forward_launch,
            "dsm_fast::norm_act_statistics": norm_act.norm_act_statistics_launch,
            "dsm_fast::norm_act_adjoint": norm_act.norm_act_adjoint_launch,
            "dsm_fast::norm_act_adjoint_backward": norm_act.norm_act_adjoint_backward_launch,
            "dsm_fast::dual_score_loss": dual_score_loss.dual_loss_forward_launch,
            "dsm_fast::dual_score_loss_backward": dual_score_loss.dual_loss_backward_launch}


def _fake_step(preset: str, batch: int, image_size: int, channels: int, precision: str):
    """Runs one fused-route step (loss and backward) on fake CPU tensors; yields nothing, traced by the caller's
    dispatch mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..model import UNetEnergy
    from ..routes import FusedRoute

    dtype = torch.float64 if precision == "fp64" else torch.float32
    with torch.device("meta"):
        model = UNetEnergy(channels, preset).to(dtype)
    route = FusedRoute(model, kernels="triton")  # resolved on meta; the parameters become fake CPU tensors below
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        x = torch.empty(batch, channels, image_size, image_size, dtype=dtype)
        t, eps = torch.empty(batch, dtype=dtype), torch.empty_like(x)
        with autocast:
            loss = route(x, t, eps)["loss"].mean()
        loss.backward()


def op_calls(preset: str = "paper", batch: int = 128, image_size: int = 64, channels: int = 3,
             precision: str = "fp32") -> collections.Counter:
    """(op name, argument specs) → calls per step, for every dsm_fast custom operator the step calls."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: collections.Counter = collections.Counter()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name()
            if name.startswith("dsm_fast::"):
                calls[name, tuple(TensorSpec(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor)
                                  else a for a in args)] += 1
            return func(*args, **(kwargs or {}))

    with Recorder():
        _fake_step(preset, batch, image_size, channels, precision)
    return calls


def _step_launches(table: dict, preset: str, batch: int, image_size: int, channels: int, precision: str
                   ) -> collections.Counter:
    """(Launch, op) → launches per step, each distinct launch once (tensors by dtype, integers by value)."""
    from ..kernels.launch import recording

    found: dict[tuple, object] = {}
    counts: collections.Counter = collections.Counter()
    for (op, specs), count in op_calls(preset, batch, image_size, channels, precision).items():
        if op not in table:
            raise RuntimeError(f"custom op {op} has no launcher in dsm_fast.tools.ptx.launchers()")
        with recording() as launches:
            table[op](*(s.meta() if isinstance(s, TensorSpec) else s for s in specs))
        for launch in launches:
            key = (launch.kernel, launch.grid, tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in launch.args),
                   tuple(sorted(launch.meta.items())), op)
            counts[found.setdefault(key, (launch, op))] += count
    return counts


@dataclass(frozen=True)
class Config:
    """One compiled configuration: what Triton's JIT would compile for a launch on ``target``."""

    kernel: str  # module:function
    signature: tuple  # (argument name, Triton type) pairs
    constexprs: tuple  # (argument index path, value) pairs
    attrs: tuple  # (argument index path, specialization attributes) pairs
    options: tuple  # (name, value) of num_warps, num_stages, num_ctas
    target: str

    def summary(self) -> dict:
        sig = dict(self.signature)
        names = list(sig)
        return {"kernel": self.kernel.split(":")[1], "target": self.target,
                "dtypes": "/".join(sorted({v[1:] for v in sig.values() if v.startswith("*")})),
                "constexprs": {names[path[0]]: value if isinstance(value, (bool, int, float)) else str(value)
                               for path, value in self.constexprs},  # a dtype constexpr by its name
                **dict(self.options)}


def _specialize(launch, target: Target) -> tuple[Config, dict]:
    """The (Config, full option dict) Triton's JIT would compile for ``launch`` on ``target``: its binder and
    argument packing (triton.runtime.jit, the same in Triton 3.6 and 3.9) run with ``target``'s backend."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", target.arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, dict(launch.meta), bound_args, specialization,
                                                          options)
    option_dict = dict(options.__dict__)
    key_options = tuple((k, option_dict[k]) for k in ("num_warps", "num_stages", "num_ctas"))
    config = Config(f"{fn.fn.__module__}:{fn.fn.__name__}", tuple(signature.items()), tuple(sorted(constexprs.items())),
                    tuple(sorted((k, repr(v)) for k, v in attrs.items())), key_options, target.name)
    return config, {"signature": signature, "constexprs": constexprs, "attrs": attrs, "options": option_dict}


RESOURCE_LINE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
SPILL_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _results_cache() -> str:
    """Where the ptxas spill figures of compiled kernels are kept, by Triton's kernel hash (a cubin that Triton's own
    cache returns comes without its ptxas log)."""
    return os.path.join(os.environ.get("DSM_FAST_CACHE", os.path.expanduser("~/.cache/dsm_fast")), "ptxas")


def _compile(fn, spec: dict, arch: int, force: bool):
    """(CompiledKernel, ptxas's -v log or '' when Triton's cache answered): Triton prints the log of each ptxas it
    runs under TRITON_DUMP_PTXAS_LOG=1 (3.6 and 3.9); TRITON_ALWAYS_COMPILE=1 bypasses its cache."""
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    env = {"TRITON_DUMP_PTXAS_LOG": "1", **({"TRITON_ALWAYS_COMPILE": "1"} if force else {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, spec["signature"], spec["constexprs"], spec["attrs"]),
                                      target=GPUTarget("cuda", arch, 32), options=spec["options"])
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    return compiled, log.getvalue()


def _compile_job(job: tuple) -> dict:
    """Compiles one configuration (in a worker process); its resources or its compile error. Registers, stack and
    shared memory from the cubin (cuobjdump); spill stores and loads from ptxas's own log."""
    import json

    kernel, arch, spec = job
    module, name = kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    try:
        compiled, log = _compile(fn, spec, arch, force=False)
        cached = os.path.join(_results_cache(), f"{compiled.metadata.hash}.json")
        if not SPILL_LINE.search(log) and not os.path.exists(cached):
            compiled, log = _compile(fn, spec, arch, force=True)
    except Exception as error:  # noqa: BLE001 — any compile failure is a row of the report, not its crash
        return {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error) else ''}"}
    if match := SPILL_LINE.search(log):
        spills = {"stack_frame": int(match[1]), "spill_stores": int(match[2]), "spill_loads": int(match[3])}
        os.makedirs(_results_cache(), exist_ok=True)
        with open(cached, "w") as f:
            json.dump(spills, f)
    else:
        with open(cached) as f:
            spills = json.load(f)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    reg, stack, shared, local = (int(v) for v in RESOURCE_LINE.search(usage).groups())
    return {"registers": reg, "spill_bytes": spills["spill_stores"], "stack_bytes": stack, "local_bytes": local,
            "static_shared": shared, "dynamic_shared": int(compiled.metadata.shared),
            "num_warps": int(compiled.metadata.num_warps), "cubin_bytes": len(compiled.asm["cubin"])}


def problems(resources: dict, target: Target, grid: tuple[int, ...], kernel_launches_per_step: int) -> list[str]:
    """Why a compiled configuration fails the check on ``target`` (empty when it passes): a compile error; its
    warps' registers beyond the SM's register file, its threads, shared memory or ``grid`` beyond the launch limits;
    or spills (local memory) in a kernel launched more than once per step (once per layer)."""
    if "error" in resources:
        return [f"compile error: {resources['error']}"]
    threads = 32 * resources["num_warps"]
    per_warp = -(-resources["registers"] * 32 // 256) * 256  # the warp's registers, in allocation units of 256
    shared = resources["static_shared"] + resources["dynamic_shared"]
    found = []
    if per_warp * resources["num_warps"] > target.registers_per_sm:
        found.append(f"{resources['registers']} registers × {threads} threads > {target.registers_per_sm}")
    if threads > target.max_threads_per_block:
        found.append(f"{threads} threads > {target.max_threads_per_block}")
    if shared > target.max_shared_per_block:
        found.append(f"{shared} B shared > {target.max_shared_per_block} B")
    if any(g > m for g, m in zip(grid, target.max_grid)):
        found.append(f"grid {tuple(grid)} exceeds {target.max_grid}")
    if resources["spill_bytes"] and kernel_launches_per_step > 1:
        found.append(f"spills {resources['spill_bytes']} B per thread in a kernel launched "
                     f"{kernel_launches_per_step}× per step")
    return found


def ptx_report(presets: Iterable[str] = ("paper",), batch: int = 128, image_size: int = 64, channels: int = 3,
               precisions: Iterable[str] = PRECISIONS, targets: Iterable[Target] = TARGETS, jobs: int = 2,
               largest_only: bool = False) -> dict:
    """Every configuration the launchers pick in one step of each preset and precision, compiled for each target:
    rows (one per configuration and target) and the failures (compile errors, configurations that cannot launch,
    spills in kernels launched more than once per step). ``largest_only``: per kernel, argument dtypes and target,
    only the configuration of the largest constexprs (product of their integer values: elements per thread and
    loop trips, which registers, shared memory and spills grow with) — the representative check CI runs."""
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 makes @triton.jit kernels interpreted, which compile for no GPU: "
                           "run without it")
    table = launchers()
    configs: dict[Config, dict] = {}
    per_kernel: collections.Counter = collections.Counter()  # launches per step, max over the traced steps
    for preset in presets:
        for precision in precisions:
            step = _step_launches(table, preset, batch, image_size, channels, precision)
            step_config: collections.Counter = collections.Counter()
            step_kernel: collections.Counter = collections.Counter()
            for (launch, op), count in step.items():
                for target in targets:
                    config, spec = _specialize(launch, target)
                    entry = configs.setdefault(config, {"spec": spec, "grid": [1, 1, 1], "uses": set(),
                                                        "per_step": 0})
                    entry["grid"] = [max(g, m) for g, m in zip((*launch.grid, 1, 1)[:3], entry["grid"])]
                    entry["uses"].add(f"{preset} {precision} {op.split('::')[1]}")
                    step_config[config] += count
                step_kernel[launch.kernel.fn.__name__] += count
            for config, count in step_config.items():
                configs[config]["per_step"] = max(configs[config]["per_step"], count)
            for name, count in step_kernel.items():
                per_kernel[name] = max(per_kernel[name], count)
    if largest_only:
        configs = _largest(configs)
    results = _compile_all([(c.kernel, next(t.arch for t in targets if t.name == c.target), e["spec"])
                            for c, e in configs.items()], jobs)
    rows, failures = [], []
    by_name = {t.name: t for t in targets}
    for (config, entry), resources in zip(configs.items(), results):
        summary = config.summary()
        row = {**summary, **resources, "grid": entry["grid"], "launches_per_step": entry["per_step"],
               "kernel_launches_per_step": per_kernel[summary["kernel"]], "uses": sorted(entry["uses"])}
        row["problems"] = problems(resources, by_name[config.target], tuple(entry["grid"]),
                                   row["kernel_launches_per_step"])
        rows.append(row)
        failures += [f"{summary['kernel']} {config.target} {summary['dtypes']} {summary['constexprs']}: {p}"
                     for p in row["problems"]]
    rows.sort(key=lambda r: (r["kernel"], r["dtypes"], sorted(r["constexprs"].items()), r["target"]))
    return {"triton": triton.__version__, "torch": torch.__version__, "presets": list(presets), "batch": batch,
            "image_size": image_size, "precisions": list(precisions), "targets": [asdict(t) for t in targets],
            "rows": rows, "failures": failures}


def _largest(configs: dict) -> dict:
    """Per (kernel, argument types, options, target), the configurations of the largest constexpr product."""
    def size(config: Config) -> int:
        return math.prod(v for _, v in config.constexprs if isinstance(v, int))

    groups: dict[tuple, list[Config]] = collections.defaultdict(list)
    for config in configs:
        groups[config.kernel, config.signature, config.options, config.target].append(config)
    keep = {c for group in groups.values() for c in group if size(c) == max(map(size, group))}
    return {c: e for c, e in configs.items() if c in keep}


def _compile_all(jobs_list: list[tuple], jobs: int) -> list[dict]:
    if jobs <= 1 or len(jobs_list) <= 1:
        return [_compile_job(job) for job in jobs_list]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_job, jobs_list, chunksize=1)


def format_ptx_table(report: dict) -> str:
    head = (f"{'kernel':<28}{'target':<7}{'dtypes':<10}{'warps':>6}{'regs':>6}{'spill B':>8}{'shared B':>9}"
            f"{'per step':>9}  {'launch':<8}constexprs")
    lines = [head, "-" * (len(head) + 30)]
    for r in report["rows"]:
        constexprs = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        if "error" in r:
            lines.append(f"{r['kernel']:<28}{r['target']:<7}{r['dtypes']:<10}  {r['problems'][0]}  {constexprs}")
            continue
        shared = r["static_shared"] + r["dynamic_shared"]
        lines.append(f"{r['kernel']:<28}{r['target']:<7}{r['dtypes']:<10}{r['num_warps']:>6}{r['registers']:>6}"
                     f"{r['spill_bytes']:>8}{shared:>9}{r['launches_per_step']:>9}  "
                     f"{'; '.join(r['problems']) or 'ok':<8}{constexprs}")
    return "\n".join(lines)
