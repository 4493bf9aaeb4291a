"""``dsm-fast normalization``: the proof of normalization on the Gaussian scale mixture."""
from __future__ import annotations

from pathlib import Path

from ..config import OBJECTIVES, ConfigError
from .common import Formatter, check_writable_folder, examples, write_file, write_json


def add_normalization(sub) -> None:
    p = sub.add_parser("normalization", help="proof of normalization on the Gaussian scale mixture (plot)",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast normalization --plot gsm.png",
                           "dsm-fast normalization --steps 3000 --objectives dual,single --json gsm.json"),
                       description="Train a radial energy on ½N(0, I) + ½N(0, 16 I) in d = 1000 with each "
                                   "objective, then compare log p_t(y) = −U(y, t) − C with the exact closed form "
                                   "at t = 0.01 … 100 (error in nats per dimension).")
    p.add_argument("--objectives", default="dual,single", help="comma-separated objectives")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="normalization.png", help="PNG of learned vs exact log p_t against ‖y‖/√d")
    p.add_argument("--json", metavar="PATH", help="write the errors as JSON")


def run_normalization(args) -> int:
    from ..analysis.normalization import plot_comparison, run_comparison

    objectives = args.objectives.split(",")
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        raise ConfigError(f"unknown objective(s) {', '.join(unknown)}; choose from {', '.join(OBJECTIVES)}")
    if args.steps <= 0:
        raise ConfigError("--steps must be positive")
    check_writable_folder(Path(args.plot).parent, "--plot", args.plot)
    results = run_comparison(objectives, args.steps, args.seed)
    print(f"{'objective':<10}" + "".join(f"{'t=' + format(r['t'], 'g'):>11}" for r in results[objectives[0]]["rows"]))
    for objective, result in results.items():
        print(f"{objective:<10}" + "".join(f"{r['error_nats_per_dim']:>11.4f}" for r in result["rows"]))
    print("(mean |learned − exact| log p_t(y), nats per dimension)")
    write_file(args.plot, "--plot", lambda file: plot_comparison(results, file))
    print(f"plot written to {args.plot}")
    write_json(args.json, {o: [{"t": r["t"], "error_nats_per_dim": r["error_nats_per_dim"]} for r in res["rows"]]
                            for o, res in results.items()})
    return 0


COMMANDS = {"normalization": (add_normalization, run_normalization)}
