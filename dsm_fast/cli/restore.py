"""``dsm-fast restore``: a trained energy as the prior of a linear inverse problem (analysis/inverse.py)."""
from __future__ import annotations

import math
import time

from ..config import RESTORE_TASKS, ConfigError
from .common import Formatter, add_run_args, examples, given_or, out_path, write_json

METHODS = ("ascent", "posterior")
ASCENT_IMAGE_LEVELS = ("final", "tracked")  # analysis/inverse.py ASCENT_LEVELS; vectors take 'residual'


def add_restore(sub) -> None:
    p = sub.add_parser("restore", help="restore images from a linear measurement (inpaint, superres, deblur, "
                                       "compressive) with the energy as the prior",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast restore runs/demo --task inpaint --box 16 --out analysis",
                           "dsm-fast restore runs/demo --task superres --factor 4 --method posterior --samples 8",
                           "dsm-fast restore runs/demo --task deblur --blur-sigma 1.5 --noise 0.01 --json deblur.json",
                           "dsm-fast restore runs/demo --task compressive --fraction 0.25 --images photos/",
                           "dsm-fast restore runs/gsm --task compressive --fraction 0.5 --method posterior"),
                       description="m = A x + s n (s = --noise) of the images (the run's held-out ones, or --images), "
                                   "restored by --method ascent (Kadkhodaie & Simoncelli 2021: stochastic "
                                   "coarse-to-fine ascent with D(y, t) = y − t ∇_y U, the measured part kept exactly "
                                   "when s = 0, ending with D at the likeliest level t̂ = argmax_t log p_t(y); "
                                   "--level tracked tells D t̂ at every step) or "
                                   "--method posterior (annealed MALA on exp(−U(y, t)) N(m; Ay, s² I) down to "
                                   "--t-end, accept/reject by U itself: samples, their mean and per-pixel std). "
                                   "Prints PSNR / SSIM per image beside the Wiener solution under the Gaussian N(μ, "
                                   "v I) of the training pixels, and log p of each restoration; grid in "
                                   "OUT/restore_<task>.png. GSM runs (vectors): compressive or inpaint --fraction, "
                                   "compared with the exact posterior (component weights, mean).")
    add_run_args(p, images=0, data=False)
    add_image_source(p, count=8)
    p.add_argument("--task", required=True, choices=RESTORE_TASKS)
    p.add_argument("--box", metavar="SIZE|T,L,H,W", help="inpaint: the missing box, a central SIZE × SIZE square or "
                                                         "TOP,LEFT,HEIGHT,WIDTH (default: a central half-side box)")
    p.add_argument("--fraction", type=float, help="inpaint: measure this fraction of random pixels; compressive: "
                                                  "measure this fraction of the dimensions")
    p.add_argument("--mask", help="inpaint: a mask image or .npy of the images' size, non-zero = measured")
    p.add_argument("--factor", type=int, default=4, help="superres: K × K block averaging")
    p.add_argument("--blur-sigma", type=float, default=1.5, help="deblur: Gaussian kernel's std in pixels")
    p.add_argument("--noise", type=float, default=0.0, help="measurement noise std s (pixel scale [0, 1])")
    p.add_argument("--method", default="ascent", choices=METHODS)
    p.add_argument("--h0", type=float, default=0.01, help="ascent: first step size h₀ (paper's default)")
    p.add_argument("--beta", type=float, default=0.01, help="ascent: noise injection β ∈ (0, 1], 1 = none "
                                                            "(paper's default)")
    p.add_argument("--sigma-start", type=float, help="ascent: σ₀ (default: 1 for images, √t_max for vectors)")
    p.add_argument("--sigma-end", type=float, help="ascent: stop at a residual σ ≤ this (with --level tracked: "
                                                   "or once t̂ stops falling) (default: 0.01 for images, √t_min "
                                                   "for vectors)")
    p.add_argument("--level", default="final", choices=ASCENT_IMAGE_LEVELS,
                   help="ascent, images: the level D is told — 'final': the residual's σ² (the paper's estimate), "
                        "the likeliest level t̂ for the last denoising; 'tracked': t̂ at every step (better where "
                        "the prior cannot tell fine noise from texture, can stall where t̂ over-reads; README)")
    p.add_argument("--samples", type=int, default=8, help="posterior: draws per image")
    p.add_argument("--levels", type=int, default=100, help="posterior: noise levels, log-spaced")
    p.add_argument("--mala-steps", type=int, default=4, help="posterior: MALA steps per level")
    p.add_argument("--t-start", type=float, help="posterior: first level (default: 1 for images, t_max for vectors)")
    p.add_argument("--t-end", type=float, help="posterior: last level (default: 1e-5 for images, t_min for "
                                               "vectors)")


def add_image_source(p, count: int) -> None:
    """--images (a folder or .npy; default the run's held-out images or fresh GSM draws) and --count."""
    p.add_argument("--images", metavar="PATH", help="a folder of images or a .npy uint8 (N, C, H, W) array "
                                                    "(default: the run's held-out images)")
    p.add_argument("--count", type=int, default=count, help="how many images (evenly spaced over the set), or GSM "
                                                            "draws")


def check_restore_args(args) -> None:
    if args.noise < 0 or not math.isfinite(args.noise):
        raise ConfigError("--noise must be ≥ 0")
    if not 0 < args.beta <= 1 or not 0 < args.h0 <= 1:
        raise ConfigError("need 0 < --h0 ≤ 1 and 0 < --beta ≤ 1")
    if args.samples < 1 or args.levels < 1 or args.mala_steps < 1:
        raise ConfigError("--samples, --levels and --mala-steps must be positive")


def run_restore(args) -> int:
    import numpy as np
    import torch

    from ..analysis.inverse import constrained_ascent, posterior_sampling
    from ..analysis.measurements import make_measurement
    from ..analysis.plots import save_image_rows
    from ..analysis.restoration import gaussian_start_statistics, image_rows, mixture_rows, wiener
    from ..analysis.runs import evaluation_images, load_run, log_probabilities
    from ..data import GaussianScaleMixture, image_split
    from ..evaluate import energies, nll_bits_per_dim

    check_restore_args(args)
    run = load_run(args.run, args.device, args.ema)
    cfg, vectors = run.cfg, run.cfg.data == "gsm"
    x = evaluation_images(cfg, args.images, args.count, args.seed, spread=True)
    op = make_measurement(args.task, tuple(x.shape[1:]), args.seed, args.box, args.fraction, args.mask, args.factor,
                          args.blur_sigma)
    generator = torch.Generator().manual_seed(args.seed)
    clean = op.apply(x)
    m = clean + args.noise * torch.randn(clean.shape, generator=generator, dtype=torch.float64)
    centre = 0.0 if vectors else 0.5
    start = time.perf_counter()
    summary = {"checkpoint": str(run.checkpoint), "task": args.task, "method": args.method, "noise": args.noise,
               "images": len(x), "measurements_per_image": op.count, "dim": op.dim}
    if args.method == "ascent":
        sigma_start = given_or(args.sigma_start, math.sqrt(cfg.t_max) if vectors else 1.0)
        sigma_end = given_or(args.sigma_end, math.sqrt(cfg.t_min) if vectors else 0.01)
        if not 0 < sigma_end < sigma_start < math.inf:
            raise ConfigError("need 0 < --sigma-end < --sigma-start")
        # the likeliest level needs U normalized across t, and is for images: on the GSM it mistakes the σ = 2
        # component for σ = 1 plus noise (√t̂ ≈ 1.6 measured), so vectors take the residual's level
        level = args.level if cfg.objective != "single" and not vectors else "residual"
        out = constrained_ascent(run.model, op, m, args.noise, generator, args.h0, args.beta, sigma_start, sigma_end,
                                 centre, (cfg.t_min, cfg.t_max), level=level)
        restored, std, samples = out["restored"].double().cpu(), None, None
        summary.update(iterations=out["iterations"], converged=out["converged"], level=level, h0=args.h0,
                       beta=args.beta, sigma_start=sigma_start, sigma_end=sigma_end,
                       final_sigma=out["final_sigma"].tolist())
        last = {"residual": "the residual's level", "final": "the residual's level, the likeliest at the end",
                "tracked": "the likeliest level"}[level]
        print(f"ascent: {out['iterations']} iterations" + ("" if out["converged"] else
                                                          f" (stopped before σ ≤ {sigma_end:g})")
              + f", denoising at {last}, last √t = {out['final_sigma'].median():.4f} (median)")
    else:
        t_start = given_or(args.t_start, cfg.t_max if vectors else 1.0)
        t_end = given_or(args.t_end, cfg.t_min if vectors else 1e-5)
        if not 0 < t_end < t_start < math.inf:
            raise ConfigError("need 0 < --t-end < --t-start")
        out = posterior_sampling(run.model, op, m, args.noise, args.samples, generator, t_start, t_end, args.levels,
                                 args.mala_steps, centre)
        samples = out["samples"].double().cpu()
        restored, std = out["mean"].double().cpu(), out["std"].double().cpu()
        rates = [level["acceptance"] for level in out["mala"]]
        summary.update(samples=args.samples, levels=args.levels, mala_steps=args.mala_steps, t_start=t_start,
                       t_end=t_end, mean_acceptance=float(np.mean(rates)), mean_posterior_std=float(std.mean()))
        print(f"posterior: {args.samples} samples per image, {args.levels} levels × {args.mala_steps} MALA steps, "
              f"mean acceptance {np.mean(rates):.3f}, mean posterior std {std.mean():.4f}")
    summary["seconds"] = time.perf_counter() - start
    log_p_truth, constant = log_probabilities(run, x, args.seed)
    log_p = -(energies(run.model, restored, run.clean_t) + constant).numpy()
    summary["nll_bits_per_dim"] = {"restored": nll_bits_per_dim(torch.from_numpy(log_p), op.dim, not vectors).tolist(),
                                   "truth": nll_bits_per_dim(torch.from_numpy(log_p_truth), op.dim,
                                                             not vectors).tolist()}
    if vectors:
        mixture = GaussianScaleMixture(cfg.gsm_dim, cfg.gsm_sigmas)
        summary["exact_posterior"] = mixture_rows(op, m, args.noise, mixture, run.clean_t, restored, samples)
        report_mixture(summary)
    else:
        baseline = wiener(op, m, *gaussian_start_statistics(run.model, image_split(cfg, "train")), args.noise)
        summary.update(image_rows(x, restored, baseline))
        report_images(summary)
        rows = {"measurement (A⁺m)": op.pinv(m.to(torch.float64)), f"restoration ({args.method})": restored}
        if std is not None:
            scale = float(std.max().clamp_min(1e-12))
            rows[f"posterior std (white = {scale:.3f})"] = std / scale
        rows["Wiener solution (Gaussian prior)"] = baseline
        rows["truth"] = x
        path = out_path(args, f"restore_{args.task}.png")
        save_image_rows(path, rows, columns=min(8, len(x)))
        print(f"grid written to {path}")
    write_json(args.json, summary)
    return 0


def report_images(summary: dict) -> None:
    import numpy as np

    rows, nll = summary["per_image"], summary["nll_bits_per_dim"]
    print(f"{'image':>6}{'PSNR':>9}{'SSIM':>8}{'Wiener PSNR':>13}{'Wiener SSIM':>13}{'NLL restored':>14}"
          f"{'NLL truth':>11}   (dB; bits/dim)")
    for i in range(len(rows["psnr"])):
        print(f"{i:>6}{rows['psnr'][i]:>9.2f}{rows['ssim'][i]:>8.3f}{rows['wiener_psnr'][i]:>13.2f}"
              f"{rows['wiener_ssim'][i]:>13.3f}{nll['restored'][i]:>14.3f}{nll['truth'][i]:>11.3f}")
    mean = summary["mean"]
    print(f"{'mean':>6}{mean['psnr']:>9.2f}{mean['ssim']:>8.3f}{mean['wiener_psnr']:>13.2f}"
          f"{mean['wiener_ssim']:>13.3f}{np.mean(nll['restored']):>14.3f}{np.mean(nll['truth']):>11.3f}")


def report_mixture(summary: dict) -> None:
    exact = summary["exact_posterior"]
    print(f"{'sample':>6}  {'exact weights':<18}{'sampled weights':<18}{'RMS from exact mean':>20}"
          f"{'RMS misfit':>12}")
    for i, weights in enumerate(exact["exact_weights"]):
        sampled = " ".join(f"{w:.3f}" for w in exact["sample_weights"][i]) if "sample_weights" in exact else "—"
        print(f"{i:>6}  {' '.join(f'{w:.3f}' for w in weights):<18}{sampled:<18}"
              f"{exact['rms_from_exact_mean'][i]:>20.4f}{exact['measurement_misfit'][i]:>12.2e}")


COMMANDS = {"restore": (add_restore, run_restore)}
