"""``dsm-fast plots RUN``: the pictures ``train`` writes at its end (dsm_fast/analysis/report.py), on demand."""
from __future__ import annotations

from .common import Formatter, examples


def add_plots(sub) -> None:
    p = sub.add_parser("plots", help="pictures of a run: loss curve, loss per noise level, denoising grid",
                       formatter_class=Formatter, epilog=examples("dsm-fast plots runs/demo",
                                                                  "dsm-fast plots runs/demo --images 256 --ema"),
                       description="Writes into RUN/plots/: loss.png (the logged loss, space and time terms against "
                                   "the step, log-scaled), loss_per_noise_level.png (held-out space and time terms "
                                   "over log t), denoise.png (noisy / denoised / clean at 30, 20, 10, 0 dB) and "
                                   "plots.json with the numbers. train writes the same when it ends.")
    p.add_argument("run", help="a run folder (its newest checkpoint) or one checkpoint folder")
    p.add_argument("--images", type=int, default=32, help="held-out images (spread over the first 1024) for the "
                   "per-level curve and the PSNRs")
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)


def run_plots(args) -> int:
    from ..analysis.report import pictures_line, write_run_plots
    from ..analysis.runs import load_run
    from ..config import ConfigError
    from ..data import make_test_data

    if args.images <= 0:
        raise ConfigError("--images must be positive")
    run = load_run(args.run, args.device, args.ema)
    x = make_test_data(run.cfg, 1024)[0]  # the held-out samples train's own pictures use
    folder = write_run_plots(run.checkpoint.parent.parent, run.model, run.cfg, x, args.seed, args.images)
    print(f"step {run.step}: {pictures_line(folder)}")
    return 0


COMMANDS = {"plots": (add_plots, run_plots)}
