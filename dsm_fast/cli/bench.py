"""``dsm-fast bench``: the training routes (or the data loader) timed side by side on this device."""
from __future__ import annotations

from ..config import FIRST_ORDER, ROUTES, ConfigError, choices
from .common import Formatter, add_step_shape, check_step_shape, examples, write_json


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time the training routes side by side on this device",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast bench --preset paper --batch-size 128",
                           "dsm-fast bench --preset tiny --batch-size 8 --image-size 32 --device cpu --json b.json",
                           "dsm-fast bench --routes score+compile,reference,fused,fused+compile,fused+compile+graph "
                           "--precision bf16",
                           "dsm-fast bench --data data/imagenet64 --loader cpu --batch-size 128 --steps 200"),
                       description="Median ms/step of the plain score-network DSM step ('score'), and of the dual "
                                   "score matching routes, with img/s, peak memory, the first step's seconds "
                                   "(compilation, capture) and ratios, all in one run. A route may carry modifiers: "
                                   "ROUTE+compile (torch.compile), ROUTE+reduce-overhead (torch.compile's CUDA graphs), "
                                   "ROUTE+graph (the whole step captured in one CUDA graph), ROUTE+channels-last (weights and "
                                   "batches in torch.channels_last).")
    add_step_shape(p)
    p.add_argument("--routes", default=None, help="comma-separated route specs (default: score and every dual route)")
    p.add_argument("--compile", action="store_true", help="add +compile to every first-order route of --routes")
    p.add_argument("--cuda-graph", action="store_true", help="add +graph to every route of --routes (CUDA)")
    p.add_argument("--kernels", default="auto", choices=choices("kernels"),
                   help="the fused route's kernels (auto: triton on CUDA; cuda: the CUDA C++ NormAct, built)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per route")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="fp32", choices=choices("precision"))
    p.add_argument("--device", default="auto")
    p.add_argument("--json", metavar="PATH", help="write the table as JSON")
    p.add_argument("--data", metavar="PATH", help="time the data loader (images/s) of this prepared ImageNet64 "
                                                  "folder instead of the routes; --steps batches of --batch-size")
    p.add_argument("--loader", default="auto", choices=choices("loader"), help="the loader timed with --data")


def run_bench(args) -> int:
    import torch

    if args.data:
        from ..data.imagenet64 import time_loader

        if args.batch_size <= 0 or args.steps <= 0 or args.warmup < 0:
            raise ConfigError("--batch-size and --steps must be positive, --warmup ≥ 0")
        row = time_loader(args.data, args.loader, args.batch_size, args.steps, args.warmup, args.device)
        print(f"loader {row['loader']} ({args.loader}), batch {row['batch_size']}, device {args.device}, "
              f"torch {torch.__version__}: {row['img_per_s']:.0f} img/s (median {row['ms_per_batch']:.2f} ms/batch, "
              f"mean {row['img_per_s_mean']:.0f} img/s over {row['batches']} batches)")
        write_json(args.json, {"config": vars(args), "versions": {"torch": torch.__version__}, "rows": [row]})
        return 0

    from ..config import resolve_device, resolve_kernels
    from ..tools.bench import bench_routes, format_table, parse_spec

    check_step_shape(args)
    routes = args.routes.split(",") if args.routes else ["score", *ROUTES]
    try:
        parsed = [parse_spec(r) for r in routes]
    except ValueError as error:
        raise ConfigError(str(error)) from None
    unknown = [name for name, _ in parsed if name not in ("score", *ROUTES)]
    if unknown:
        raise ConfigError(f"unknown route(s) {', '.join(unknown)}; choose from score, {', '.join(ROUTES)}")
    if args.compile:
        routes = [r + "+compile" if name in FIRST_ORDER and not mods & {"compile", "reduce-overhead"} else r
                  for r, (name, mods) in zip(routes, parsed)]
    if args.cuda_graph:
        routes = [r if "graph" in mods else r + "+graph" for r, (_, mods) in zip(routes, parsed)]
    refused = [r for r in routes if parse_spec(r)[0] == "reference" and {"compile", "reduce-overhead"} & parse_spec(r)[1]]
    if refused:
        raise ConfigError(f"route reference cannot be compiled (torch.compile refuses its double backward): "
                          f"{', '.join(refused)}")
    if args.batch_size <= 0 or args.steps <= 0 or args.warmup < 0:
        raise ConfigError("--batch-size and --steps must be positive, --warmup ≥ 0")
    device = resolve_device(args.device)
    try:
        resolve_kernels(args.kernels, device)
    except RuntimeError as error:
        raise ConfigError(f"--kernels {args.kernels}: {error}") from None
    if device.type != "cuda" and any("graph" in parse_spec(r)[1] for r in routes):
        raise ConfigError("+graph (--cuda-graph) needs a CUDA device")
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version(),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(f"bench: preset {args.preset}, batch {args.batch_size}, {args.channels}×{args.image_size}², "
          f"{args.precision}, {versions['device']}, torch {versions['torch']}", flush=True)
    def save(rows: list[dict]) -> None:
        write_json(args.json, {"config": vars(args) | {"routes": routes}, "versions": versions, "rows": rows})

    rows = bench_routes(routes, args.preset, args.batch_size, args.image_size, args.channels, args.steps,
                        args.warmup, device, args.precision, progress=True, kernels=args.kernels, on_row=save)
    print(format_table(rows))
    save(rows)
    return 0


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


COMMANDS = {"bench": (add_bench, run_bench)}
