"""``dsm-fast score``: per-image NLL of image sets under a run's normalized energy, and AUROC between two sets."""
from __future__ import annotations

from ..config import ConfigError
from .common import Formatter, add_run_args, examples, out_path, write_json


def add_score(sub) -> None:
    p = sub.add_parser("score", help="per-image NLL (bits/dim) of image sets; AUROC of telling two sets apart",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast score runs/demo",
                           "dsm-fast score runs/demo --images photos/ --against other.npy --json score.json",
                           "dsm-fast score runs/gsm --images draws.npy  # float (N, d) vectors; exact NLL beside"),
                       description="log p(x) = −U(x, t) − C (t = 0 for images, t_min for GSM runs), one C for every "
                                   "set: the t_max protocol on --train-images training images. Prints the mean NLL "
                                   "(bits/dim) of each set and of the training images; with --against, the AUROC of "
                                   "telling A (in) from B (out) by log p and by typicality |log p − mean training "
                                   "log p| (likelihood alone can rank outliers as more likely). Histograms in "
                                   "OUT/score.png.")
    add_run_args(p, images=0, data=False)
    p.add_argument("--images", metavar="A", help="a folder of images or a .npy (uint8 images; float (N, d) vectors "
                                                 "for a GSM run); default: the run's held-out images (GSM: fresh "
                                                 "draws)")
    p.add_argument("--against", metavar="B", help="a second set, scored with the same C; AUROC of A against B")
    p.add_argument("--count", type=int, default=256, help="at most this many images per set (evenly spaced)")
    p.add_argument("--train-images", type=int, default=256,
                   help="training images (evenly spaced) that fix C and the mean training log p")
    p.add_argument("--batch-size", type=int, default=64)


def vector_set(path: str, dim: int, count: int):
    """A float .npy of (N, d) GSM-like vectors, at most ``count`` rows, float64."""
    import numpy as np
    import torch

    from ..data.images import DataError

    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read as .npy ({error})") from None
    if x.ndim != 2 or x.shape[1] != dim or len(x) == 0 or not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: expected a float (N, {dim}) array of vectors, got {x.dtype} {x.shape}")
    return torch.from_numpy(x[:count]).double()


def scored_set(run, source: str | None, count: int, seed: int):
    from ..analysis.runs import evaluation_images

    if run.cfg.data == "gsm" and source is not None:
        return vector_set(source, run.cfg.gsm_dim, count)
    return evaluation_images(run.cfg, source, count, seed, spread=True)


def run_score(args) -> int:
    import numpy as np
    import torch

    from ..analysis.runs import load_run
    from ..analysis.scoring import log_p_with_constant, nll_per_image, plot_histograms, separation
    from ..data import GaussianScaleMixture, image_split

    if args.count <= 0 or args.train_images < 2 or args.batch_size <= 0:
        raise ConfigError("--count and --batch-size must be positive, --train-images ≥ 2")
    run = load_run(args.run, args.device, args.ema)
    cfg, vectors = run.cfg, run.cfg.data == "gsm"
    sets = {"A": scored_set(run, args.images, args.count, args.seed)}
    if args.against:
        sets["B"] = scored_set(run, args.against, args.count, args.seed)
    if vectors:
        mixture = GaussianScaleMixture(cfg.gsm_dim, cfg.gsm_sigmas)
        train = mixture.sample(args.train_images, torch.Generator().manual_seed(args.seed + 7), dtype=torch.float64)
        variance = float(train.var(dim=0).mean())
    else:
        images = image_split(cfg, "train")
        rows = np.unique(np.linspace(0, len(images) - 1, min(args.train_images, len(images))).round().astype(int))
        train, variance = torch.from_numpy(np.array(images[rows])).double() / 255.0, 0.0
    log_p, constant = log_p_with_constant(run.model, {**sets, "train": train}, train, cfg.t_max, run.clean_t,
                                          args.seed, variance, args.batch_size)
    dim = train[0].numel()
    nll = {name: nll_per_image(values, dim, not vectors) for name, values in log_p.items()}
    summary = {"checkpoint": str(run.checkpoint), "dim": dim, "log_normalizer": constant, "t_eval": run.clean_t,
               "sets": {name: {"source": getattr(args, {"A": "images", "B": "against"}.get(name, ""), None),
                               "n": len(v), "mean_nll_bits_per_dim": float(v.mean()),
                               "nll_bits_per_dim": v.tolist()} for name, v in nll.items()}}
    print(f"{'set':>6}{'n':>6}{'mean NLL':>11}{'min':>9}{'max':>9}   (bits/dim; C = {constant:.2f} nats from "
          f"{len(train)} training {'draws' if vectors else 'images'})")
    for name, v in nll.items():
        print(f"{name:>6}{len(v):>6}{v.mean():>11.4f}{v.min():>9.4f}{v.max():>9.4f}")
    if vectors:
        for name, x in {**sets, "train": train}.items():
            exact = nll_per_image(mixture.log_prob(x, run.clean_t).numpy(), dim, False)
            summary["sets"][name]["exact_nll_bits_per_dim"] = exact.tolist()
            print(f"{name:>6}: exact NLL {exact.mean():.4f} bits/dim, mean |model − exact| "
                  f"{np.abs(nll[name] - exact).mean():.4f} bits/dim per sample")
    if args.against:
        summary["separation"] = separation(log_p["A"], log_p["B"], float(log_p["train"].mean()))
        print(f"AUROC of A against B: by log p {summary['separation']['auroc_log_p']:.4f}, by typicality "
              f"{summary['separation']['auroc_typicality']:.4f}")
    path = out_path(args, "score.png")
    plot_histograms({key: v for key, v in nll.items() if key != "train"}, path, float(nll["train"].mean()))
    print(f"histogram written to {path}")
    write_json(args.json, summary)
    return 0


COMMANDS = {"score": (add_score, run_score)}
