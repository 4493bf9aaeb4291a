"""``dsm-fast eval``: the normalizing constant at t_max, NLL in bits/dim, per-image log p, denoising PSNR."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ConfigError, compute_dtype, config_from_run, resolve_device
from .common import Formatter, check_writable_folder, examples, write_file, write_json


def count_or_all(text: str) -> int | None:
    """'all' → None (every image of the split), else a positive count."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got {text!r}")
    return int(text)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="normalized log p and NLL (bits/dim) of a trained run; denoising PSNR",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast eval runs/demo",
                           "dsm-fast eval runs/demo --dequantize --per-image logp.csv --json nll.json",
                           "dsm-fast eval runs/demo/checkpoints/step_00000300 --ema --denoise",
                           "dsm-fast eval runs/paper-colour --data data/imagenet64 --images all --train-images 50000",
                           "dsm-fast eval runs/paper-gray --data data/imagenet64 --images all  # gray by ITU-R 601 luma"),
                       description="C = (d/2) log(2πe t_max) − mean U(x + √t_max ε, t_max); log p(x) = −(U(x, 0) + C); "
                                   "NLL = 8 + (mean U(x, 0) + C)/(d ln 2) bits/dim for 8-bit images. By default the "
                                   "continuous density is evaluated at the 8-bit images (the paper's protocol). The "
                                   "paper's protocol on ImageNet64: --images all (the 50,000 validation images) and "
                                   "--train-images, whose NLL uses the C of the test images. A grayscale run reads a "
                                   "colour dataset through PIL's luma L = (299 R + 587 G + 114 B)/1000.")
    p.add_argument("run", help="a run folder (its newest checkpoint) or one checkpoint folder")
    p.add_argument("--data", help="evaluate on this data instead of the run's (folder, .npy or prepared ImageNet64)")
    p.add_argument("--images", type=count_or_all, default=1000, metavar="N|all",
                   help="how many held-out samples (the first N of the split), or all of them")
    p.add_argument("--train-images", type=count_or_all, default=0, metavar="N|all",
                   help="also the NLL of the first N training images (or all), with the C of the held-out ones "
                        "(default: none)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--dequantize", action="store_true", help="uniform dequantization x → (k + u)/256")
    p.add_argument("--variance-correction", action="store_true",
                   help="use N(0, (t_max + var(x)) I) instead of N(0, t_max I) for p at t_max")
    p.add_argument("--denoise", action="store_true", help="also print the denoising PSNR table")
    p.add_argument("--per-image", metavar="PATH", help="write per-image log p(x) (nats) to a .npy or .csv file")
    p.add_argument("--json", metavar="PATH", help="write the numbers as JSON")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def evaluation_sets(cfg, images: int | None, train_images: int | None, seed: int):
    """(held-out samples, training samples or None, 8-bit quantized?): uint8 image arrays read lazily (memory maps
    of a prepared dataset stay on disk), or fresh GSM draws."""
    from ..data import image_split, make_test_data

    if cfg.data == "gsm":
        if images is None or train_images != 0:
            raise ConfigError("the GSM data has no fixed splits: give --images N and no --train-images")
        return make_test_data(cfg, images, seed=seed)[0], None, False
    test = image_split(cfg, "test")[:images]
    train = image_split(cfg, "train")[:train_images] if train_images != 0 else None
    return test, train, True


def run_eval(args) -> int:
    import numpy as np
    import torch

    from ..checkpoint import evaluated_weights, load_checkpoint, resolve_checkpoint
    from ..data import GaussianScaleMixture
    from ..data.imagenet64 import is_prepared, partial_note, read_manifest
    from ..diffclf import with_free_energies
    from ..evaluate import clean_noise_level, denoising_psnr, evaluate_nll, sample_dim, variance_per_dim
    from ..model import build_model

    if args.batch_size <= 0:
        raise ConfigError("--batch-size must be positive")
    if args.per_image:  # checked before the evaluation: a path that cannot be written fails at once
        if Path(args.per_image).suffix not in (".npy", ".csv"):
            raise ConfigError("--per-image must end in .npy or .csv")
        check_writable_folder(Path(args.per_image).parent, "--per-image", args.per_image)
    checkpoint = resolve_checkpoint(args.run)
    run_dir = checkpoint.parent.parent
    cfg = config_from_run(run_dir, device=args.device, **({"data": args.data} if args.data else {}))
    device = resolve_device(cfg.device)
    weights, state, ema = load_checkpoint(checkpoint, map_location=device)
    weights = evaluated_weights(checkpoint, weights, ema, args.ema)
    x, train_x, quantized = evaluation_sets(cfg, args.images, args.train_images, args.seed)
    model = with_free_energies(build_model(cfg.model, channels=x.shape[1], dim=sample_dim(x), energy=cfg.energy), cfg)
    model.to(device, compute_dtype(cfg))
    model.load_state_dict(weights)
    exact = None
    variance = variance_per_dim(x) if args.variance_correction else 0.0
    t_eval = clean_noise_level(cfg)
    if cfg.data == "gsm":
        exact = GaussianScaleMixture(cfg.gsm_dim, cfg.gsm_sigmas).log_prob(x, t_eval)
    result = evaluate_nll(model, x, quantized, cfg.t_max, args.dequantize, variance, args.seed, args.batch_size,
                          exact, t_eval, train_x)
    low, high = result["ci95"]
    density = "dequantized" if args.dequantize else "continuous density at the data points"
    print(f"checkpoint {checkpoint} (step {state['step']}{', EMA' if args.ema else ''})")
    if is_prepared(cfg.data) and (note := partial_note(read_manifest(cfg.data))):
        print(f"data: {cfg.data} ({note})")
        result["data_note"] = note
    print(f"NLL {result['nll_bits_per_dim']:.4f} bits/dim, 95% CI [{low:.4f}, {high:.4f}], {result['n']} samples, "
          f"{density}")
    if "train" in result:
        train = result["train"]
        print(f"train NLL {train['nll_bits_per_dim']:.4f} bits/dim, 95% CI [{train['ci95'][0]:.4f}, "
              f"{train['ci95'][1]:.4f}], {train['n']} training samples, with the C of the held-out ones")
    if exact is not None:
        print(f"exact NLL of the same samples: {result['exact_nll_bits_per_dim']:.4f} bits/dim "
              f"(both of p_t at t = t_min = {t_eval:g})")
    log_p = result.pop("log_p")
    if args.per_image:
        def save_log_p(file: Path) -> None:
            if file.suffix == ".npy":
                np.save(file, log_p)
            else:
                np.savetxt(file, np.stack([np.arange(len(log_p)), log_p], 1), delimiter=",",
                           header="index,log_p_nats", comments="", fmt=["%d", "%.6f"])

        write_file(args.per_image, "--per-image", save_log_p)
    if args.denoise:
        result["denoising"] = denoising_psnr(model, x, torch.Generator().manual_seed(args.seed),
                                             batch_size=args.batch_size)
        print(f"{'input PSNR (dB)':>16}{'t':>12}{'output PSNR (dB)':>18}")
        for row in result["denoising"]:
            print(f"{row['input_psnr']:>16.0f}{row['t']:>12.3g}{row['output_psnr']:>18.2f}")
    write_json(args.json, {"checkpoint": str(checkpoint), **result})
    return 0


COMMANDS = {"eval": (add_eval, run_eval)}
