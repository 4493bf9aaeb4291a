"""``dsm-fast denoise``: the energy's denoiser on held-out images across noise levels (analysis/denoising.py)."""
from __future__ import annotations

from ..config import ConfigError
from .common import Formatter, add_run_args, examples, float_list, out_path, write_json


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
    if args.show < 1:
        raise ConfigError("--show must be positive")
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


COMMANDS = {"denoise": (add_denoise, run_denoise)}
