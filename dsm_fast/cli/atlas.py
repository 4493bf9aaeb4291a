"""``dsm-fast atlas``: log p against image content: the most and least probable images, contrast and offset (analysis/atlas.py)."""
from __future__ import annotations

from ..config import ConfigError
from .common import Formatter, add_run_args, examples, out_path, write_json


def add_atlas(sub) -> None:
    p = sub.add_parser("atlas", help="test log p: histogram with a Gumbel fit, ranked images, contrast and offset",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast atlas runs/demo --images 256 --show 8 --out analysis",
                           "dsm-fast atlas runs/gsm --json atlas.json"),
                       description="log p(x) = −U(x, 0) − C (C by the t_max protocol) of held-out images: histogram "
                                   "of log p/d with a maximum-likelihood Gumbel fit and mean log p/d under contrast "
                                   "x ↦ m + α(x − m) and offset x ↦ x + β (OUT/atlas.png); for images, the highest, "
                                   "lowest and evenly spaced log p (OUT/atlas_images.png).")
    add_run_args(p, images=256)
    p.add_argument("--show", type=int, default=8, help="images per row of the ranked grid")


def run_atlas(args) -> int:
    from ..analysis.atlas import gumbel_fit, log_p_under_changes, plot_histogram, ranked
    from ..analysis.plots import save_image_rows
    from ..analysis.runs import evaluation_images, load_run, log_probabilities

    if args.show < 1:
        raise ConfigError("--show must be positive")
    run = load_run(args.run, args.device, args.ema)
    x = evaluation_images(run.cfg, args.data, args.images, args.seed)
    if len(x) < 3:
        raise ConfigError("the atlas needs at least 3 images")
    log_p, constant = log_probabilities(run, x, args.seed)
    d = x[0].numel()
    fit = gumbel_fit(log_p / d)
    changes = log_p_under_changes(run.model, x, run.clean_t, constant)
    plot_histogram(log_p / d, fit, changes, out_path(args, "atlas.png"))
    ranks = ranked(log_p, min(args.show, len(x)))
    print(f"log p/d over {len(x)} samples: mean {log_p.mean() / d:.4f}, min {log_p.min() / d:.4f}, "
          f"max {log_p.max() / d:.4f} nats; Gumbel ({fit['family']}) loc {fit['loc']:.4f} scale {fit['scale']:.4f}")
    print("contrast α → mean log p/d: " + ", ".join(f"{r['contrast']:g}: {r['log_p_per_dim']:.4f}"
                                                   for r in changes["contrast"]))
    print("offset β → mean log p/d: " + ", ".join(f"{r['offset']:g}: {r['log_p_per_dim']:.4f}"
                                                 for r in changes["offset"]))
    if x.dim() == 4:
        save_image_rows(out_path(args, "atlas_images.png"),
                        {f"{name} log p": x[index] for name, index in ranks.items()}, columns=len(ranks["highest"]))
        print(f"images written to {out_path(args, 'atlas_images.png')}")
    print(f"plot written to {out_path(args, 'atlas.png')}")
    write_json(args.json, {"checkpoint": str(run.checkpoint), "dim": d, "log_normalizer": constant,
                           "log_p_per_dim": (log_p / d).tolist(), "gumbel": fit, **changes,
                           "ranked": {k: v.tolist() for k, v in ranks.items()}})
    return 0


COMMANDS = {"atlas": (add_atlas, run_atlas)}
