"""Training-loss curves of two routes from the same seed and data, beside the run-to-run noise of the reference.

    python benchmarks/route_curves.py --preset paper --batch-size 128 --steps 2000           # the GPU record
    python benchmarks/route_curves.py --preset tiny --batch-size 8 --steps 2000 --device cpu # CPU sanity check

Three runs: the reference route with seed s, the candidate route (default fused) with seed s — same initial
weights, same batches, same noise — and the reference route with seed s + 1 (other weights, batches and noise).
Per-step losses are smoothed by a moving average of ``--window`` steps; the candidate agrees "within
run-to-run noise" when its mean |Δ| from the reference is no larger than the reference's own mean |Δ| between
seeds. Writes OUT/curves.json (raw and smoothed curves, the two distances) and OUT/curves.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np


def train_losses(cfg) -> np.ndarray:
    """The per-step loss of one run (``log_every`` = 1), read back from its stats.jsonl."""
    from dsm_fast.train import Trainer

    Trainer(cfg).run()
    lines = (Path(cfg.out) / "stats.jsonl").read_text().splitlines()
    return np.array([json.loads(line)["loss"] for line in lines])


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average over ``window`` consecutive steps (valid part only)."""
    return np.convolve(values, np.ones(window) / window, mode="valid")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--route", default="fused", help="the route compared with the reference")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", default="runs/route_curves")
    args = parser.parse_args(argv)
    if args.window >= args.steps:
        parser.error(f"--window {args.window} must be smaller than --steps {args.steps}")

    from dsm_fast.analysis.plots import pyplot
    from dsm_fast.config import TrainConfig

    out = Path(args.out)
    base = TrainConfig(model=args.preset, batch_size=args.batch_size, image_size=args.image_size, steps=args.steps,
                       device=args.device, precision=args.precision, seed=args.seed, log_every=1,
                       checkpoint_every=args.steps, eval_images=0, progress=True)
    runs = {"reference": {"route": "reference"}, args.route: {"route": args.route},
            "reference, seed + 1": {"route": "reference", "seed": args.seed + 1}}
    losses = {}
    for name, changes in runs.items():
        print(f"training {name}", file=sys.stderr)
        folder = out / name.replace(", ", "_").replace(" + ", "_plus_")
        losses[name] = train_losses(dataclasses.replace(base, out=str(folder), **changes).validate())
    smoothed = {name: smooth(values, args.window) for name, values in losses.items()}
    route_gap = float(np.abs(smoothed[args.route] - smoothed["reference"]).mean())
    seed_gap = float(np.abs(smoothed["reference, seed + 1"] - smoothed["reference"]).mean())
    summary = {"preset": args.preset, "batch_size": args.batch_size, "steps": args.steps, "window": args.window,
               f"mean |{args.route} - reference|": route_gap, "mean |reference seed+1 - reference|": seed_gap,
               "within run-to-run noise": route_gap <= seed_gap,
               "final smoothed loss": {name: float(curve[-1]) for name, curve in smoothed.items()}}
    (out / "curves.json").write_text(json.dumps({**summary, "losses": {k: v.tolist() for k, v in losses.items()}}))

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 4.5))
    steps = np.arange(args.window, args.steps + 1)
    for name, curve in smoothed.items():
        axis.plot(steps[: len(curve)], curve, label=name, linestyle="--" if "seed" in name else "-")
    axis.set(xlabel="step", ylabel=f"loss (moving average of {args.window})", yscale="log",
             title=f"{args.preset}, batch {args.batch_size}: {args.route} vs reference")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "curves.png", dpi=120)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
