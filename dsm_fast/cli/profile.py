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
                           "dsm-fast profile --cost --json cost.json   # no GPU needed"),
                       description="Per op (NormAct forward, NormAct adjoint, dual-score loss terms), side by side: the "
                                   "PyTorch reference, the Triton kernel and the CUDA C++ kernel where built — median "
                                   "ms, achieved GB/s (ideal traffic over time) and relative error to float64. Then the "
                                   "fused route's step by phase beside the reference route's step. On the CPU only the "
                                   "PyTorch rows and the step run; the report says what needs a GPU. --cost instead "
                                   "traces one step of each route on the meta device (no GPU, seconds) and prints "
                                   "kernels, FLOPs, bytes moved and saved, and a roofline estimate for H100 and H200.")
    add_step_shape(p, "UNet preset of the step breakdown and the cost report")
    p.add_argument("--width", type=int, default=64, help="channels of the NormAct input timed per kernel")
    p.add_argument("--repeat", type=int, default=20, help="timed calls per row")
    p.add_argument("--precision", default="fp32", choices=choices("precision"),
                   help="storage dtype of the kernel rows and of the step (bf16: kernel rows only)")
    p.add_argument("--cuda", default="auto", choices=SWITCH,
                   help="the CUDA C++ extension: auto (if built and on a GPU), on (fail if not), off")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-step", dest="step", action="store_false", help="kernel rows only")
    p.add_argument("--trace", metavar="PATH", help="write a torch.profiler Chrome trace of a few fused steps")
    p.add_argument("--cost", action="store_true",
                   help="the cost report: one step per route on the meta device, counted and roofline-predicted "
                        "(uses --preset, --batch-size, --image-size, --channels, --json)")
    p.add_argument("--json", metavar="PATH", help="write the tables as JSON")


def run_profile(args) -> int:
    import torch

    from .. import cuda_ext
    from ..config import resolve_device
    from ..tools.profile import format_kernel_table, format_step_table, profile_kernels, profile_step, trace_steps

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
    print(f"cost report: preset {args.preset}, batch {args.batch_size}, {args.channels}×{args.image_size}², fp32, "
          f"one steady-state step on the meta device (torch {torch.__version__})")
    report = cost_report(preset=args.preset, batch=args.batch_size, image_size=args.image_size,
                         channels=args.channels, kernels=kernels)
    print(format_cost_report(report))
    write_json(args.json, {"config": vars(args), "torch": torch.__version__,
                           **{k: v for k, v in report.items() if k != "rows"},
                           "routes": {r["route"]: {k: v for k, v in r.items() if k != "route"} for r in report["rows"]}})
    return 0


COMMANDS = {"profile": (add_profile, run_profile)}
