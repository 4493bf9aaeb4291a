"""``dsm-fast profile``: per-kernel rows (PyTorch, Triton, CUDA C++) and the fused step by phase."""
from __future__ import annotations

from ..config import SWITCH, ConfigError, choices
from .common import Formatter, add_step_shape, check_step_shape, examples, write_json


def add_profile(sub) -> None:
    p = sub.add_parser("profile", help="per-kernel and per-phase timings of the fused route on this device",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast profile --preset paper --batch-size 128",
                           "dsm-fast profile --preset tiny --batch-size 4 --image-size 16 --device cpu",
                           "dsm-fast profile --cuda on --trace fused.json --json profile.json",
                           "dsm-fast profile --cost --json cost.json   # no GPU needed",
                           "dsm-fast profile --cost --compiled        # + the compiled steps as Inductor builds them",
                           "dsm-fast profile --ptx --json ptx.json     # every Triton kernel for sm_80/sm_90, no GPU",
                           "dsm-fast profile --ptx --preset all --largest-only",
                           "dsm-fast profile --cost --preset edm2-s --batch-size 64 --checkpoint-activations block",
                           "dsm-fast profile --cost --preset edm2-s --batch-size 64 --precision bf16"),
                       description="Per op (NormAct forward, NormAct adjoint, dual-score loss terms), side by side: the "
                                   "PyTorch reference, the Triton kernel and the CUDA C++ kernel where built — median "
                                   "ms, achieved GB/s (ideal traffic over time) and relative error to float64. Then the "
                                   "fused route's step by phase beside the reference route's step. On the CPU only the "
                                   "PyTorch rows and the step run; the report says what needs a GPU. --cost instead "
                                   "traces one step of each route on the meta device (no GPU, seconds) and prints "
                                   "kernels, FLOPs, bytes moved and saved, and a roofline estimate for H100 and H200. "
                                   "--ptx compiles every Triton kernel configuration the launchers pick in one fused "
                                   "step (fp32, bf16 autocast, fp64) for sm_80 and sm_90 with Triton's own compiler "
                                   "(no GPU) and prints registers, spills, shared memory and whether each can launch; "
                                   "it exits 1 if one cannot.")
    add_step_shape(p, "UNet preset of the step breakdown and the cost report")
    p.add_argument("--width", type=int, default=64, help="channels of the NormAct input timed per kernel")
    p.add_argument("--repeat", type=int, default=20, help="timed calls per row")
    p.add_argument("--precision", default="fp32", choices=choices("precision"),
                   help="storage dtype of the kernel rows and of the step (bf16: kernel rows only); --cost: the "
                        "traced step's (bf16: autocast over fp32 weights, as train --precision bf16)")
    p.add_argument("--cuda", default="auto", choices=SWITCH,
                   help="the CUDA C++ extension: auto (if built and on a GPU), on (fail if not), off")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-step", dest="step", action="store_false", help="kernel rows only")
    p.add_argument("--trace", metavar="PATH", help="write a torch.profiler Chrome trace of a few fused steps")
    p.add_argument("--cost", action="store_true",
                   help="the cost report: one step per route on the meta device, counted and roofline-predicted "
                        "(uses --preset, --batch-size, --image-size, --channels, --json)")
    p.add_argument("--checkpoint-activations", default="none", choices=("none", "block"),
                   help="--cost: add the fused rows with per-block activation checkpointing (EDM2 presets)")
    p.add_argument("--compiled", action="store_true",
                   help="--cost: also the compiled steps (score, fused; fp32, bf16; with and without a CUDA graph) "
                        "as Inductor builds them for an H100, traced on the CPU (minutes)")
    p.add_argument("--ptx", action="store_true",
                   help="compile every Triton kernel configuration of one fused step for sm_80 and sm_90 (uses "
                        "--preset, 'all' for every preset, --batch-size, --image-size, --channels, --json)")
    p.add_argument("--largest-only", action="store_true",
                   help="--ptx: per kernel, dtypes and target only the configuration of the largest block sizes")
    p.add_argument("--jobs", type=int, default=2, help="--ptx: parallel compiles")
    p.add_argument("--json", metavar="PATH", help="write the tables as JSON")


def run_profile(args) -> int:
    import torch

    from .. import cuda_ext
    from ..config import resolve_device
    from ..tools.profile import format_kernel_table, format_step_table, profile_kernels, profile_step, trace_steps

    if args.ptx:
        return run_ptx(args)
    check_step_shape(args, size=args.step or args.cost)
    if min(args.batch_size, args.repeat, args.width, args.image_size) <= 0:
        raise ConfigError("--batch-size, --repeat, --width and --image-size must be positive")
    if args.cost:
        return run_cost(args)
    device = resolve_device(args.device)
    try:
        use_cuda = cuda_ext.resolve(args.cuda) and device.type == "cuda"
    except RuntimeError as error:
        raise ConfigError(f"--cuda on: {error}") from None
    use_triton = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[args.precision]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"profile: {name}, torch {torch.__version__}, {args.precision}, NormAct input "
          f"{args.batch_size}×{args.width}×{args.image_size}², loss input {args.batch_size}×3×{args.image_size}²")
    kernels = profile_kernels(args.batch_size, args.width, args.image_size, device, dtype, args.repeat, use_triton,
                              use_cuda)
    print(format_kernel_table(kernels))
    notes = []
    if not use_triton:
        notes.append("triton: needs a GPU (on the CPU it runs only interpreted, which is a correctness check, "
                     "not a timing: pytest tests/test_kernels_*.py)")
    if not use_cuda:
        notes.append(f"cuda c++: {cuda_ext.unavailable_reason() or 'not requested'}")
    steps = []
    if args.step:
        step_dtype = torch.float64 if args.precision == "fp64" else torch.float32
        steps = profile_step(args.preset, args.batch_size, args.image_size, args.channels, device, step_dtype,
                             max(3, args.repeat // 4), "triton" if use_triton else "torch")
        print(f"\nstep breakdown: preset {args.preset}, batch {args.batch_size}, {args.channels}×{args.image_size}², "
              f"fused route kernels {'triton' if use_triton else 'torch'}, {step_dtype}".replace("torch.", ""))
        print(format_step_table(steps))
    if args.trace:
        trace_steps(args.trace, args.preset, args.batch_size, args.image_size, args.channels, device,
                    torch.float32, "triton" if use_triton else "torch")
        print(f"trace written to {args.trace}")
    for note in notes:
        print(f"note: {note}")
    write_json(args.json, {"config": vars(args), "device": name, "torch": torch.__version__, "kernels": kernels,
                           "step": steps, "notes": notes})
    return 0


def run_cost(args) -> int:
    """``profile --cost``: counts and predictions per route; the fused route with each kernel set it can trace."""
    import torch

    from ..tools.cost import cost_report, format_cost_report, traceable_kernels

    kernels = traceable_kernels()
    if args.checkpoint_activations != "none" and not args.preset.startswith("edm2"):
        raise ConfigError("--checkpoint-activations needs an EDM2 preset (edm2-tiny, edm2-xs, edm2-s)")
    where = "fake CPU tensors under bf16 autocast" if args.precision == "bf16" else "the meta device"
    print(f"cost report: preset {args.preset}, batch {args.batch_size}, {args.channels}×{args.image_size}², "
          f"{args.precision}, one steady-state step on {where} (torch {torch.__version__})")
    report = cost_report(preset=args.preset, batch=args.batch_size, image_size=args.image_size,
                         channels=args.channels, kernels=kernels, checkpoint=args.checkpoint_activations,
                         dtype=torch.float64 if args.precision == "fp64" else torch.float32, precision=args.precision)
    print(format_cost_report(report))
    compiled = None
    if args.compiled:
        from ..tools.inductor_cost import compiled_report, format_compiled_report

        print("\ncompiled steps: Inductor's kernels for an H100, counted on the CPU (nothing runs)")
        compiled = compiled_report(args.preset, args.batch_size, args.image_size, args.channels)
        print(format_compiled_report(compiled))
    write_json(args.json, {"config": vars(args), "torch": torch.__version__,
                           **{k: v for k, v in report.items() if k != "rows"},
                           "routes": {r["route"]: {k: v for k, v in r.items() if k != "route"} for r in report["rows"]},
                           "compiled": compiled})
    return 0


def run_ptx(args) -> int:
    """``profile --ptx``: the compile table; exit 1 when a configuration fails to compile, cannot launch or spills
    in a per-layer kernel."""
    import argparse

    from ..model.unet import PRESETS  # 'all': the paper UNet's presets (NormAct, loss) and edm2-s (attention at
    from ..tools.ptx import PRECISIONS, TARGETS, format_ptx_table, ptx_report  # 64×64, c = 64 and L = 256, 64;
    # kernels/mp_block.py's at edm2's widest channels)

    presets = (*PRESETS, "edm2-s") if args.preset == "all" else (args.preset,)
    for preset in presets:
        check_step_shape(argparse.Namespace(**{**vars(args), "preset": preset}))
    if min(args.batch_size, args.jobs) <= 0:
        raise ConfigError("--batch-size and --jobs must be positive")
    try:
        report = ptx_report(presets, args.batch_size, args.image_size, args.channels, jobs=args.jobs,
                            largest_only=args.largest_only)
    except RuntimeError as error:
        if "TRITON_INTERPRET" in str(error):
            raise ConfigError(f"--ptx: {error}") from None
        raise
    print(f"Triton {report['triton']} compile check: presets {', '.join(presets)}, batch {args.batch_size}, "
          f"{args.channels}×{args.image_size}², {'/'.join(PRECISIONS)}, targets "
          f"{', '.join(t.name for t in TARGETS)}{' (largest configuration per kernel)' if args.largest_only else ''}")
    print(format_ptx_table(report))
    for failure in report["failures"]:
        print(f"FAIL {failure}")
    print(f"{len(report['rows'])} configurations, {len(report['failures'])} failures")
    write_json(args.json, {"config": vars(args), **report})
    return 1 if report["failures"] else 0


COMMANDS = {"profile": (add_profile, run_profile)}
