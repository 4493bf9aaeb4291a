"""``dsm-fast generalization``: two runs' log p on the same images (analysis/generalization.py)."""
from __future__ import annotations

from ..config import ConfigError
from .common import Formatter, add_run_args, examples, out_path, write_json


def add_generalization(sub) -> None:
    p = sub.add_parser("generalization", help="compare log p of two runs (e.g. trained on disjoint subsets)",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast train --subset first:200 --model small --steps 2000 --out runs/first",
                           "dsm-fast train --subset last:200 --model small --steps 2000 --out runs/last",
                           "dsm-fast generalization runs/first runs/last --images 256 --out analysis"),
                       description="log p_A(x) and log p_B(x) of the same held-out images (each with its own C), as "
                                   "dB/dim = (10/ln 10)·log p/d; mean, mean |·| and RMS of the difference in dB/dim "
                                   "and bits/dim (1 dB/dim = 0.332 bits/dim); scatter in OUT/generalization.png.")
    add_run_args(p, images=256)
    p.add_argument("run_b", help="the second run (or checkpoint) folder")


def run_generalization(args) -> int:
    from ..analysis.generalization import compare_log_p, plot_scatter
    from ..analysis.runs import evaluation_images, load_run, log_probabilities

    run_a, run_b = load_run(args.run, args.device, args.ema), load_run(args.run_b, args.device, args.ema)
    if (run_a.cfg.data == "gsm") != (run_b.cfg.data == "gsm") or run_a.clean_t != run_b.clean_t:
        raise ConfigError("the two runs model different kinds of data; compare runs on the same data")
    if run_a.sample_shape != run_b.sample_shape:
        raise ConfigError(f"the two runs model samples of different shapes, {run_a.sample_shape} and "
                          f"{run_b.sample_shape}; compare runs on the same data")
    x = evaluation_images(run_a.cfg, args.data, args.images, args.seed)
    log_p_a, _ = log_probabilities(run_a, x, args.seed)
    log_p_b, _ = log_probabilities(run_b, x, args.seed)
    stats = compare_log_p(log_p_a, log_p_b, x[0].numel())
    plot_scatter(log_p_a, log_p_b, x[0].numel(), stats, (args.run, args.run_b), out_path(args, "generalization.png"))
    print(f"log p_A − log p_B over {len(x)} samples: mean {stats['mean_db']:.4f}, mean |·| {stats['mean_abs_db']:.4f}, "
          f"RMS {stats['rms_db']:.4f} dB/dim (= {stats['mean_bits']:.4f}, {stats['mean_abs_bits']:.4f}, "
          f"{stats['rms_bits']:.4f} bits/dim); correlation {stats['correlation']:.4f}")
    print(f"plot written to {out_path(args, 'generalization.png')}")
    write_json(args.json, {"run_a": str(run_a.checkpoint), "run_b": str(run_b.checkpoint), "images": len(x), **stats})
    return 0


COMMANDS = {"generalization": (add_generalization, run_generalization)}
