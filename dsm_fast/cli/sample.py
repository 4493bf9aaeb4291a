"""``dsm-fast sample``: samples of a trained energy (analysis/sampling.py)."""
from __future__ import annotations

import math

from ..config import ConfigError
from .common import Formatter, add_run_args, examples, given_or, out_path, write_json


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="samples by reverse diffusion with the energy's score, optionally MALA",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast sample runs/demo --count 16 --steps 200 --out analysis",
                           "dsm-fast sample runs/demo --mala-steps 2 --json samples.json",
                           "dsm-fast sample runs/gsm --count 500 --mala-steps 2"),
                       description="Probability-flow ODE of the variance-exploding diffusion (Heun steps, t log-spaced "
                                   "from --t-max down to --t-min; default: the run's range), with --mala-steps "
                                   "Metropolis-adjusted Langevin steps at each level (the accept/reject uses U itself). "
                                   "Images: OUT/samples.png; GSM runs: OUT/samples_radial.png (‖x‖²/d).")
    add_run_args(p, images=0, data=False)
    p.add_argument("--count", type=int, default=16, help="how many samples")
    p.add_argument("--steps", type=int, default=100, help="noise levels from t_max down to t_min")
    p.add_argument("--mala-steps", type=int, default=0, help="MALA steps at each level (0: none)")
    p.add_argument("--t-min", type=float, default=None, help="last noise level (default: the run's t_min)")
    p.add_argument("--t-max", type=float, default=None, help="first noise level (default: the run's t_max)")
    p.add_argument("--save", metavar="PATH", help="write the samples as a float .npy")


def run_sample(args) -> int:
    import numpy as np
    import torch

    from ..analysis.plots import save_image_rows
    from ..analysis.runs import load_run
    from ..analysis.sampling import plot_radial, reverse_diffusion

    if args.count <= 0 or args.steps <= 0 or args.mala_steps < 0:
        raise ConfigError("--count and --steps must be positive, --mala-steps ≥ 0")
    run = load_run(args.run, args.device, args.ema)
    cfg = run.cfg
    t_min, t_max = given_or(args.t_min, cfg.t_min), given_or(args.t_max, cfg.t_max)
    if not 0 < t_min < t_max < math.inf:
        raise ConfigError("need 0 < --t-min < --t-max")
    shape = (args.count, *run.sample_shape)
    out = reverse_diffusion(run.model, shape, t_min, t_max, args.steps, torch.Generator().manual_seed(args.seed),
                            args.mala_steps)
    samples = out["samples"].double().cpu()
    radius = samples.reshape(len(samples), -1).square().mean(1)
    summary = {"checkpoint": str(run.checkpoint), "count": args.count, "steps": args.steps, "t_min": t_min,
               "t_max": t_max, "mala_steps": args.mala_steps, "mean_sq_norm_per_dim": float(radius.mean()),
               "mala": out["mala"]}
    if cfg.data == "gsm":
        path = out_path(args, "samples_radial.png")
        plot_radial(samples, path, tuple(s * s for s in cfg.gsm_sigmas))
    else:
        path = out_path(args, "samples.png")
        summary["outside_0_1_fraction"] = float(((samples < 0) | (samples > 1)).double().mean())
        save_image_rows(path, {f"{args.count} samples, {args.steps} levels, {args.mala_steps} MALA steps per level":
                               samples}, columns=min(8, args.count))
    print(f"{args.count} samples: mean ‖x‖²/d {summary['mean_sq_norm_per_dim']:.4f}"
          + (f", mean MALA acceptance {np.mean([m['acceptance'] for m in out['mala']]):.3f}" if out["mala"] else ""))
    print(f"plot written to {path}")
    if args.save:
        np.save(args.save, samples.numpy())
    write_json(args.json, summary)
    return 0


COMMANDS = {"sample": (add_sample, run_sample)}
