"""``dsm-fast dimensionality``: effective dimensionality and E[log p_t | x] across noise levels (analysis/dimensionality.py)."""
from __future__ import annotations

import math

from ..config import ConfigError
from .common import Formatter, add_run_args, examples, out_path, write_json


def add_dimensionality(sub) -> None:
    p = sub.add_parser("dimensionality", help="effective dimensionality and E[log p_t | x] across noise levels",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast dimensionality runs/demo --images 32 --show 4 --out analysis",
                           "dsm-fast dimensionality runs/gsm --t-min 1e-2 --t-max 1e2 --json deff.json"),
                       description="d_eff(x, t) = E_ε‖x − D(x + √t ε, t)‖²/t and E[log p_t(y) | x] = −E U(y, t) − C "
                                   "for t log-spaced over [--t-min, --t-max], for --show chosen images and the average "
                                   "over --images; curves in OUT/dimensionality.png.")
    add_run_args(p, images=32)
    p.add_argument("--show", type=int, default=4, help="images drawn individually (the first ones)")
    p.add_argument("--t-min", type=float, default=1e-12)
    p.add_argument("--t-max", type=float, default=1e3)
    p.add_argument("--levels", type=int, default=31, help="noise levels, log-spaced")
    p.add_argument("--noise-draws", type=int, default=2, help="draws of ε per image and level")


def run_dimensionality(args) -> int:
    import torch

    from ..analysis.dimensionality import dimensionality_curves, noise_levels, plot_dimensionality
    from ..analysis.runs import evaluation_images, load_run, log_probabilities

    if not 0 < args.t_min < args.t_max < math.inf or args.levels < 2 or args.noise_draws < 1 or args.show < 0:
        raise ConfigError("need 0 < --t-min < --t-max < inf, --levels ≥ 2, --noise-draws ≥ 1 and --show ≥ 0")
    run = load_run(args.run, args.device, args.ema)
    x = evaluation_images(run.cfg, args.data, args.images, args.seed)
    _, constant = log_probabilities(run, x, args.seed)
    result = dimensionality_curves(run.model, x, noise_levels(args.t_min, args.t_max, args.levels), constant,
                                   torch.Generator().manual_seed(args.seed), args.noise_draws)
    show = min(args.show, len(x))
    plot_dimensionality(result, out_path(args, "dimensionality.png"), [f"image {i}" for i in range(show)])
    print(f"{'t':>10}{'mean d_eff':>14}{'mean E log p/d':>16}   (d = {result['dim']}, {len(x)} samples)")
    for j, t in enumerate(result["levels"]):
        print(f"{t:>10.3g}{result['d_eff'][:, j].mean():>14.2f}{result['log_p'][:, j].mean() / result['dim']:>16.4f}")
    print(f"plot written to {out_path(args, 'dimensionality.png')}")
    write_json(args.json, {"checkpoint": str(run.checkpoint), "dim": result["dim"], "log_normalizer": constant,
                           "t": result["levels"].tolist(), "mean_d_eff": result["d_eff"].mean(0).tolist(),
                           "mean_log_p": result["log_p"].mean(0).tolist(),
                           "shown": {"d_eff": result["d_eff"][:show].tolist(),
                                     "log_p": result["log_p"][:show].tolist()}})
    return 0


COMMANDS = {"dimensionality": (add_dimensionality, run_dimensionality)}
