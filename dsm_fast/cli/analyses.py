"""The analyses of trained runs (dsm_fast/analysis/): dimensionality, sample, denoise, atlas, generalization."""
from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from .common import Formatter, examples, write_json


def add_run_args(p, images: int, data: bool = True) -> None:
    """Options every analysis of one trained run shares."""
    p.add_argument("run", help="a run folder (its newest checkpoint) or one checkpoint folder")
    if data:
        p.add_argument("--data", help="images to analyse (folder or .npy) instead of the run's held-out split")
        p.add_argument("--images", type=int, default=images, help="how many images (or GSM draws)")
    p.add_argument("--out", default="analysis", help="folder for the PNG files")
    p.add_argument("--json", metavar="PATH", help="write the numbers as JSON")
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)


def float_list(text: str, name: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{name} expects comma-separated numbers, got {text!r}") from None


def out_path(args, name: str) -> Path:
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return Path(args.out) / name


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

    if not 0 < args.t_min < args.t_max or args.levels < 2 or args.noise_draws < 1:
        raise ConfigError("need 0 < --t-min < --t-max, --levels ≥ 2 and --noise-draws ≥ 1")
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
    t_min, t_max = args.t_min or run.cfg.t_min, args.t_max or run.cfg.t_max
    if not 0 < t_min < t_max:
        raise ConfigError("need 0 < --t-min < --t-max")
    cfg = run.cfg
    shape = (args.count, cfg.gsm_dim) if cfg.data == "gsm" else (args.count, cfg.channels, cfg.image_size,
                                                                cfg.image_size)
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


def add_denoise(sub) -> None:
    p = sub.add_parser("denoise", help="denoise images at given noise levels: PSNR table, plot and image grid",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast denoise runs/demo --psnrs 30,20,10,0 --out analysis",
                           "dsm-fast denoise runs/demo --data photos/ --images 8 --json psnr.json"),
                       description="D(y, t) = y − t ∇_y U(y, t) at input PSNR p (t = 10^(−p/10), peak 1): the output "
                                   "PSNR of every image (OUT/denoise_psnr.png) and, for images, a grid of noisy / "
                                   "denoised rows per level and the clean row (OUT/denoise.png).")
    add_run_args(p, images=8)
    p.add_argument("--psnrs", default="30,20,10,0", help="comma-separated input PSNRs (dB)")
    p.add_argument("--show", type=int, default=8, help="images in the grid")


def run_denoise(args) -> int:
    import torch

    from ..analysis.denoising import denoise_grid, plot_psnr
    from ..analysis.plots import save_image_rows
    from ..analysis.runs import evaluation_images, load_run
    from ..evaluate import denoising_psnr

    psnrs = float_list(args.psnrs, "--psnrs")
    run = load_run(args.run, args.device, args.ema)
    x = evaluation_images(run.cfg, args.data, args.images, args.seed)
    rows = denoising_psnr(run.model, x, torch.Generator().manual_seed(args.seed), psnrs)
    plot_psnr(rows, out_path(args, "denoise_psnr.png"))
    print(f"{'input PSNR (dB)':>16}{'t':>12}{'output PSNR (dB)':>18}")
    for row in rows:
        print(f"{row['input_psnr']:>16.1f}{row['t']:>12.3g}{row['output_psnr']:>18.2f}")
    if x.dim() == 4:
        shown = x[:args.show]
        grid = denoise_grid(run.model, shown, psnrs, torch.Generator().manual_seed(args.seed + 1))
        save_image_rows(out_path(args, "denoise.png"), grid, columns=len(shown))
        print(f"images written to {out_path(args, 'denoise.png')}")
    write_json(args.json, {"checkpoint": str(run.checkpoint), "images": len(x), "rows": rows})
    return 0


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


COMMANDS = {
    "dimensionality": (add_dimensionality, run_dimensionality),
    "sample": (add_sample, run_sample),
    "denoise": (add_denoise, run_denoise),
    "atlas": (add_atlas, run_atlas),
    "generalization": (add_generalization, run_generalization),
}
