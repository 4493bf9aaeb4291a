"""The ``dsm-fast`` console script (also ``python -m dsm_fast``).

Argument definitions here are light (no torch import) so ``--help`` is instant; each subcommand's
``run_*`` imports what it needs. A user mistake ends in one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .config import ConfigError, TrainConfig


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def write_json(path: str | None, payload) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=float) + "\n")


# --- train -----------------------------------------------------------------------------------------
FIELD_HELP = {
    "model": "UNet preset (paper, small, tiny) or 'radial' for --data gsm",
    "data": "'demo' (photographs shipped with scikit-image), 'gsm' (Gaussian scale mixture), a folder or a .npy",
    "gsm_sigmas": "comma-separated standard deviations of the mixture components",
    "radial_offset": "radial model: start mis-normalized, log p_t off by -a*log t nats/dim (normalization uses 0.02)",
    "route": "reference (eager double backward), compiled (torch.compile + torch.func), functional (torch.func, "
             "eager; first-order, the route for DeepSpeed) or fused (explicit adjoint, first-order; Triton on CUDA)",
    "precision": "fp32, bf16 (autocast, CUDA only) or fp64",
    "objective": "dual (space + time score), single (space only) or diffclf (space + noise-level classification; "
                 "reference route only)",
    "time_weight": "λ in loss = space + λ·time (diffclf: space + λ·classification)",
    "diffclf_levels": "diffclf: N noise levels, log-spaced over [t_min, t_max], that the classifier tells apart",
    "subset": "train on 'first:N' or 'last:N' of the training images (disjoint runs for dsm-fast generalization)",
    "lr_halve_every": "halve the learning rate every this many steps",
    "ema_decay": "EMA of the weights (0 disables)",
    "grad_clip": "max global gradient norm (0 disables)",
    "max_bad_steps": "stop (with a checkpoint) after this many non-finite losses in a row",
    "eval_images": "held-out images whose NLL is printed when training ends (0 skips)",
    "loader": "prepared ImageNet64 only: auto (DALI if installed and on CUDA, else cpu), cpu, or dali",
    "optimizer": "auto (apex FusedAdam if installed, else torch Adam, fused on CUDA), torch or apex",
    "batch_size": "the global batch: images per optimizer step over all ranks and micro-steps",
    "engine": "single, ddp or deepspeed (launch ddp/deepspeed with torchrun or the deepspeed launcher)",
    "grad_accum": "micro-batches per optimizer step on each rank",
    "zero_stage": "DeepSpeed ZeRO stage 0-3 (3 only with --route fused, see README)",
    "offload": "DeepSpeed: keep optimizer state in CPU memory",
    "deepspeed_config": "DeepSpeed JSON used instead of the generated one (batch keys must agree)",
    "dist_timeout": "seconds a rendezvous or collective may wait before every rank stops",
}


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train an energy model by dual (or single) score matching",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast train --model small --steps 300 --batch-size 16 --out runs/demo",
                           "dsm-fast train --config run.yaml --lr 2e-4",
                           "dsm-fast train --out runs/demo --steps 600 --resume",
                           "dsm-fast train --data gsm --model radial --t-min 1e-2 --t-max 1e2 --out runs/gsm",
                           "torchrun --nproc-per-node 8 -m dsm_fast train --engine ddp --route functional",
                           "deepspeed --num_gpus 8 -m dsm_fast train --engine deepspeed --zero-stage 2 "
                           "--route functional"),
                       description="Train U(y, t) on images (or the analytic GSM data). Options come from the "
                                   "defaults, then --config FILE (YAML or TOML), then the command line.")
    p.add_argument("--config", help="YAML or TOML file of the options below (keys with underscores)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=argparse.SUPPRESS,
                   help="passed by the deepspeed launcher; LOCAL_RANK in the environment takes precedence")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, dest=f.name, default=None, metavar=f.type.upper() if f.type in ("int", "float") else None,
                       help=f"{FIELD_HELP.get(f.name, '')} (default: {f.default})".strip())


def run_train(args) -> int:
    from .config import resolve_config
    from .data import make_test_data
    from .distributed import stop
    from .evaluate import clean_noise_level, evaluate_nll
    from .train import Trainer

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    cfg = resolve_config(args.config, overrides)
    try:
        trainer = Trainer(cfg, resume=args.resume, local_rank=args.local_rank)
        if trainer.world.is_main:
            print(f"training {cfg.model} on {cfg.data} ({cfg.objective} score matching, route {cfg.route}, "
                  f"{trainer.optimizer_name}, engine {cfg.engine} × {trainer.world.size}, {trainer.device}) → "
                  f"{trainer.run_dir}", flush=True)
        summary = trainer.run()
    finally:
        stop()
    if not trainer.world.is_main:  # rank 0 reports and evaluates
        return 0
    print(f"done: step {summary['step']}, loss {summary.get('loss', float('nan')):.4f}, "
          f"{summary['skipped_steps']} skipped steps", flush=True)
    if cfg.eval_images > 0:
        x, quantized = make_test_data(cfg, cfg.eval_images)
        result = evaluate_nll(trainer.model, x, quantized, cfg.t_max, seed=cfg.seed, t_eval=clean_noise_level(cfg))
        low, high = result["ci95"]
        print(f"held-out NLL: {result['nll_bits_per_dim']:.4f} bits/dim (95% CI {low:.4f}–{high:.4f}, "
              f"{result['n']} samples)")
    return 0


# --- eval ------------------------------------------------------------------------------------------
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="normalized log p and NLL (bits/dim) of a trained run; denoising PSNR",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast eval runs/demo",
                           "dsm-fast eval runs/demo --dequantize --per-image logp.csv --json nll.json",
                           "dsm-fast eval runs/demo/checkpoints/step_00000300 --ema --denoise"),
                       description="C = (d/2) log(2πe t_max) − mean U(x + √t_max ε, t_max); log p(x) = −(U(x, 0) + C); "
                                   "NLL = 8 + (mean U(x, 0) + C)/(d ln 2) bits/dim for 8-bit images. By default the "
                                   "continuous density is evaluated at the 8-bit images (the paper's protocol).")
    p.add_argument("run", help="a run folder (its newest checkpoint) or one checkpoint folder")
    p.add_argument("--data", help="evaluate on this data instead of the run's held-out split (folder or .npy)")
    p.add_argument("--images", type=int, default=1000, help="how many held-out samples")
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


def run_eval(args) -> int:
    import numpy as np
    import torch

    from .checkpoint import load_checkpoint, resolve_checkpoint
    from .data import GaussianScaleMixture, make_test_data
    from .diffclf import with_free_energies
    from .evaluate import clean_noise_level, denoising_psnr, evaluate_nll
    from .model import build_model
    from .train import compute_dtype, config_from_run, resolve_device

    if args.images <= 0:
        raise ConfigError("--images must be positive")
    if args.per_image and Path(args.per_image).suffix not in (".npy", ".csv"):
        raise ConfigError("--per-image must end in .npy or .csv")
    checkpoint = resolve_checkpoint(args.run)
    run_dir = checkpoint.parent.parent
    cfg = config_from_run(run_dir, device=args.device, **({"data": args.data} if args.data else {}))
    device = resolve_device(cfg.device)
    weights, state, ema = load_checkpoint(checkpoint, map_location=device)
    if args.ema and ema is None:
        raise ConfigError(f"{checkpoint} has no EMA weights (train with --ema-decay)")
    x, quantized = make_test_data(cfg, args.images, seed=args.seed)
    model = with_free_energies(build_model(cfg.model, channels=x.shape[1], dim=x[0].numel()), cfg)
    model.to(device, compute_dtype(cfg))
    model.load_state_dict(ema if args.ema else weights)
    exact = None
    variance = float(x.double().var(dim=0).mean()) if args.variance_correction else 0.0
    t_eval = clean_noise_level(cfg)
    if cfg.data == "gsm":
        exact = GaussianScaleMixture(cfg.gsm_dim, cfg.gsm_sigmas).log_prob(x, t_eval)
    result = evaluate_nll(model, x, quantized, cfg.t_max, args.dequantize, variance, args.seed, args.batch_size,
                          exact, t_eval)
    low, high = result["ci95"]
    print(f"checkpoint {checkpoint} (step {state['step']}{', EMA' if args.ema else ''})")
    print(f"NLL {result['nll_bits_per_dim']:.4f} bits/dim, 95% CI [{low:.4f}, {high:.4f}], {result['n']} samples, "
          f"{'dequantized' if args.dequantize else 'continuous density at the data points'}")
    if exact is not None:
        print(f"exact NLL of the same samples: {result['exact_nll_bits_per_dim']:.4f} bits/dim "
              f"(both of p_t at t = t_min = {t_eval:g})")
    log_p = result.pop("log_p")
    if args.per_image:
        if args.per_image.endswith(".npy"):
            np.save(args.per_image, log_p)
        else:
            np.savetxt(args.per_image, np.stack([np.arange(len(log_p)), log_p], 1), delimiter=",",
                       header="index,log_p_nats", comments="", fmt=["%d", "%.6f"])
    if args.denoise:
        result["denoising"] = denoising_psnr(model, x, torch.Generator().manual_seed(args.seed),
                                             batch_size=args.batch_size)
        print(f"{'input PSNR (dB)':>16}{'t':>12}{'output PSNR (dB)':>18}")
        for row in result["denoising"]:
            print(f"{row['input_psnr']:>16.0f}{row['t']:>12.3g}{row['output_psnr']:>18.2f}")
    write_json(args.json, {"checkpoint": str(checkpoint), **result})
    return 0


# --- bench -----------------------------------------------------------------------------------------
def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time the training routes side by side on this device",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast bench --preset paper --batch-size 128",
                           "dsm-fast bench --preset tiny --batch-size 8 --image-size 32 --device cpu --json b.json",
                           "dsm-fast bench --data data/imagenet64 --loader cpu --batch-size 128 --steps 200"),
                       description="Median ms/step of the plain score-network DSM step ('score'), and of the dual "
                                   "score matching routes, with img/s, peak memory and ratios, all in one run.")
    p.add_argument("--preset", default="paper", help="UNet preset")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--routes", default=None, help="comma-separated routes (default: score and every dual route)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per route")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp64"))
    p.add_argument("--device", default="auto")
    p.add_argument("--json", metavar="PATH", help="write the table as JSON")
    p.add_argument("--data", metavar="PATH", help="time the data loader (images/s) of this prepared ImageNet64 "
                                                  "folder instead of the routes; --steps batches of --batch-size")
    p.add_argument("--loader", default="auto", choices=("auto", "cpu", "dali"), help="the loader timed with --data")


def run_bench(args) -> int:
    import torch

    if args.data:
        from .data.imagenet64 import time_loader

        if args.batch_size <= 0 or args.steps <= 0 or args.warmup < 0:
            raise ConfigError("--batch-size and --steps must be positive, --warmup ≥ 0")
        row = time_loader(args.data, args.loader, args.batch_size, args.steps, args.warmup, args.device)
        print(f"loader {row['loader']} ({args.loader}), batch {row['batch_size']}, device {args.device}, "
              f"torch {torch.__version__}: {row['img_per_s']:.0f} img/s (median {row['ms_per_batch']:.2f} ms/batch, "
              f"mean {row['img_per_s_mean']:.0f} img/s over {row['batches']} batches)")
        write_json(args.json, {"config": vars(args), "versions": {"torch": torch.__version__}, "rows": [row]})
        return 0

    from .bench import bench_routes, format_table
    from .model import PRESETS
    from .routes import ROUTES
    from .train import resolve_device

    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    routes = args.routes.split(",") if args.routes else ["score", *ROUTES]
    unknown = [r for r in routes if r not in ("score", *ROUTES)]
    if unknown:
        raise ConfigError(f"unknown route(s) {', '.join(unknown)}; choose from score, {', '.join(ROUTES)}")
    if args.batch_size <= 0 or args.steps <= 0 or args.warmup < 0:
        raise ConfigError("--batch-size and --steps must be positive, --warmup ≥ 0")
    down = 2 ** (len(PRESETS[args.preset].widths) - 1)
    if args.image_size % down:
        raise ConfigError(f"--image-size must be a multiple of {down} for preset {args.preset}")
    device = resolve_device(args.device)
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(f"bench: preset {args.preset}, batch {args.batch_size}, {args.channels}×{args.image_size}², "
          f"{args.precision}, {versions['device']}, torch {versions['torch']}", flush=True)
    rows = bench_routes(routes, args.preset, args.batch_size, args.image_size, args.channels, args.steps,
                        args.warmup, device, args.precision, progress=True)
    print(format_table(rows))
    write_json(args.json, {"config": vars(args) | {"routes": routes}, "versions": versions, "rows": rows})
    return 0


# --- profile -------------------------------------------------------------------------------------
def add_profile(sub) -> None:
    p = sub.add_parser("profile", help="per-kernel and per-phase timings of the fused route on this device",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast profile --preset paper --batch-size 128",
                           "dsm-fast profile --preset tiny --batch-size 4 --image-size 16 --device cpu",
                           "dsm-fast profile --cuda on --trace fused.json --json profile.json"),
                       description="Per op (NormAct forward, NormAct adjoint, dual-score loss terms), side by side: the "
                                   "PyTorch reference, the Triton kernel and the CUDA C++ kernel where built — median "
                                   "ms, achieved GB/s (ideal traffic over time) and relative error to float64. Then the "
                                   "fused route's step by phase beside the reference route's step. On the CPU only the "
                                   "PyTorch rows and the step run; the report says what needs a GPU.")
    p.add_argument("--preset", default="paper", help="UNet preset of the step breakdown")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--width", type=int, default=64, help="channels of the NormAct input timed per kernel")
    p.add_argument("--repeat", type=int, default=20, help="timed calls per row")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp64"),
                   help="storage dtype of the kernel rows and of the step (bf16: kernel rows only)")
    p.add_argument("--cuda", default="auto", choices=("auto", "on", "off"),
                   help="the CUDA C++ extension: auto (if built and on a GPU), on (fail if not), off")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-step", dest="step", action="store_false", help="kernel rows only")
    p.add_argument("--trace", metavar="PATH", help="write a torch.profiler Chrome trace of a few fused steps")
    p.add_argument("--json", metavar="PATH", help="write the tables as JSON")


def run_profile(args) -> int:
    import torch

    from . import cuda_ext
    from .model import PRESETS
    from .profile import format_kernel_table, format_step_table, profile_kernels, profile_step, trace_steps
    from .train import resolve_device

    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    if min(args.batch_size, args.repeat, args.width, args.image_size) <= 0:
        raise ConfigError("--batch-size, --repeat, --width and --image-size must be positive")
    down = 2 ** (len(PRESETS[args.preset].widths) - 1)
    if args.step and args.image_size % down:
        raise ConfigError(f"--image-size must be a multiple of {down} for preset {args.preset}")
    device = resolve_device(args.device)
    try:
        use_cuda = cuda_ext.resolve(args.cuda) and device.type == "cuda"
    except RuntimeError as error:
        raise ConfigError(f"--cuda on: {error}") from None
    use_triton = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[args.precision]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"profile: {name}, torch {torch.__version__}, {args.precision}, NormAct input "
          f"{args.batch_size}×{args.width}×{args.image_size}², loss input {args.batch_size}×3×{args.image_size}²")
    kernels = profile_kernels(args.batch_size, args.width, args.image_size, device, dtype, args.repeat, use_triton,
                              use_cuda)
    print(format_kernel_table(kernels))
    notes = []
    if not use_triton:
        notes.append("triton: needs a GPU (on the CPU it runs only interpreted, which is a correctness check, "
                     "not a timing: pytest tests/test_kernels_*.py)")
    if not use_cuda:
        notes.append(f"cuda c++: {cuda_ext.unavailable_reason() or 'not requested'}")
    steps = []
    if args.step:
        step_dtype = torch.float64 if args.precision == "fp64" else torch.float32
        steps = profile_step(args.preset, args.batch_size, args.image_size, args.channels, device, step_dtype,
                             max(3, args.repeat // 4), "triton" if use_triton else "torch")
        print(f"\nstep breakdown: preset {args.preset}, batch {args.batch_size}, {args.channels}×{args.image_size}², "
              f"fused route kernels {'triton' if use_triton else 'torch'}, {step_dtype}".replace("torch.", ""))
        print(format_step_table(steps))
    if args.trace:
        trace_steps(args.trace, args.preset, args.batch_size, args.image_size, args.channels, device,
                    torch.float32, "triton" if use_triton else "torch")
        print(f"trace written to {args.trace}")
    for note in notes:
        print(f"note: {note}")
    write_json(args.json, {"config": vars(args), "device": name, "torch": torch.__version__, "kernels": kernels,
                           "step": steps, "notes": notes})
    return 0


# --- data ----------------------------------------------------------------------------------------
def add_data(sub) -> None:
    p = sub.add_parser("data", help="prepare and verify ImageNet64 (official files or image folders)",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast data prepare --src downloads/ --out data/imagenet64",
                           "dsm-fast data verify data/imagenet64",
                           "dsm-fast train --data data/imagenet64 --loader auto"),
                       description="prepare: read the official downsampled-ImageNet 64×64 files (train_data_batch_1…10 "
                                   "and val_data, pickled or _npz, loose or in Imagenet64_*.zip) or train/ and val/ "
                                   "folders of images (box-resized to 64×64), validate them, and write one memory-"
                                   "mappable uint8 (N, 3, 64, 64) .npy per split with labels and a manifest (sha256). "
                                   "verify: re-check a prepared folder against its manifest.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    prep = actions.add_parser("prepare", help="official files or image folders → a prepared dataset folder",
                              formatter_class=Formatter, epilog=examples(
                                  "dsm-fast data prepare --src downloads/ --out data/imagenet64"))
    prep.add_argument("--src", required=True, help="folder with the official files/zips, or with train/ and val/")
    prep.add_argument("--out", required=True, help="the prepared dataset folder (written atomically)")
    prep.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    check = actions.add_parser("verify", help="re-check a prepared dataset against its manifest",
                               formatter_class=Formatter, epilog=examples("dsm-fast data verify data/imagenet64"))
    check.add_argument("folder", help="a prepared dataset folder")
    check.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_data(args) -> int:
    from .data.imagenet64 import verify
    from .data.prepare import prepare

    if args.action == "prepare":
        manifest, written = prepare(args.src, args.out, progress=args.progress)
        counts = ", ".join(f"{split} {entry['count']:,}" for split, entry in manifest["splits"].items())
        print(f"{'prepared' if written else 'up to date, nothing to do'}: {args.out} ({counts} images)")
    else:
        manifest = verify(args.folder, progress=args.progress)
        counts = ", ".join(f"{split} {entry['count']:,}" for split, entry in manifest["splits"].items())
        print(f"ok: {args.folder} matches its manifest ({counts} images)")
    return 0


# --- normalization ---------------------------------------------------------------------------------
def add_normalization(sub) -> None:
    p = sub.add_parser("normalization", help="proof of normalization on the Gaussian scale mixture (plot)",
                       formatter_class=Formatter, epilog=examples(
                           "dsm-fast normalization --plot gsm.png",
                           "dsm-fast normalization --steps 3000 --objectives dual,single --json gsm.json"),
                       description="Train a radial energy on ½N(0, I) + ½N(0, 16 I) in d = 1000 with each "
                                   "objective, then compare log p_t(y) = −U(y, t) − C with the exact closed form "
                                   "at t = 0.01 … 100 (error in nats per dimension).")
    p.add_argument("--objectives", default="dual,single", help="comma-separated objectives")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="normalization.png", help="PNG of learned vs exact log p_t against ‖y‖/√d")
    p.add_argument("--json", metavar="PATH", help="write the errors as JSON")


def run_normalization(args) -> int:
    from .losses import OBJECTIVES
    from .normalization import plot_comparison, run_comparison

    objectives = args.objectives.split(",")
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        raise ConfigError(f"unknown objective(s) {', '.join(unknown)}; choose from {', '.join(OBJECTIVES)}")
    if args.steps <= 0:
        raise ConfigError("--steps must be positive")
    results = run_comparison(objectives, args.steps, args.seed)
    print(f"{'objective':<10}" + "".join(f"{'t=' + format(r['t'], 'g'):>11}" for r in results[objectives[0]]["rows"]))
    for objective, result in results.items():
        print(f"{objective:<10}" + "".join(f"{r['error_nats_per_dim']:>11.4f}" for r in result["rows"]))
    print("(mean |learned − exact| log p_t(y), nats per dimension)")
    plot_comparison(results, args.plot)
    print(f"plot written to {args.plot}")
    write_json(args.json, {o: [{"t": r["t"], "error_nats_per_dim": r["error_nats_per_dim"]} for r in res["rows"]]
                            for o, res in results.items()})
    return 0



# --- analyses (dsm_fast/analysis/) -----------------------------------------------------------------
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

    from .analysis.dimensionality import dimensionality_curves, noise_levels, plot_dimensionality
    from .analysis.runs import evaluation_images, load_run, log_probabilities

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

    from .analysis.plots import save_image_rows
    from .analysis.runs import load_run
    from .analysis.sampling import plot_radial, reverse_diffusion

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

    from .analysis.denoising import denoise_examples, plot_psnr
    from .analysis.plots import save_image_rows
    from .analysis.runs import evaluation_images, load_run
    from .evaluate import denoising_psnr

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
        grid = {}
        for example in denoise_examples(run.model, shown, psnrs, torch.Generator().manual_seed(args.seed + 1)):
            grid[f"noisy, {example['input_psnr']:g} dB"] = example["noisy"]
            grid[f"denoised, {example['input_psnr']:g} dB"] = example["denoised"]
        grid["clean"] = shown
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
    from .analysis.atlas import gumbel_fit, log_p_under_changes, plot_histogram, ranked
    from .analysis.plots import save_image_rows
    from .analysis.runs import evaluation_images, load_run, log_probabilities

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
    from .analysis.generalization import compare_log_p, plot_scatter
    from .analysis.runs import evaluation_images, load_run, log_probabilities

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
    "train": (add_train, run_train),
    "eval": (add_eval, run_eval),
    "bench": (add_bench, run_bench),
    "profile": (add_profile, run_profile),
    "data": (add_data, run_data),
    "normalization": (add_normalization, run_normalization),
    "dimensionality": (add_dimensionality, run_dimensionality),
    "sample": (add_sample, run_sample),
    "denoise": (add_denoise, run_denoise),
    "atlas": (add_atlas, run_atlas),
    "generalization": (add_generalization, run_generalization),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsm-fast", formatter_class=Formatter,
                                     description="Train and evaluate normalized energy models of images by dual "
                                                 "score matching.", epilog=examples(
                                                     "dsm-fast train --model small --steps 300 --batch-size 16",
                                                     "dsm-fast eval runs/default", "dsm-fast bench --preset paper"))
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # the deepspeed launcher puts it before the subcommand
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError
    from .data.images import DataError

    try:
        return COMMANDS[args.command][1](args)
    except (ConfigError, DataError, CheckpointError) as error:
        parser.exit(2, f"dsm-fast {args.command}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"dsm-fast {args.command}: interrupted\n")
    except Exception as error:
        from .distributed import DistributedError
        from .train import TrainingStopped

        if isinstance(error, (TrainingStopped, DistributedError)):
            parser.exit(1, f"dsm-fast {args.command}: stopped: {error}\n")
        raise


if __name__ == "__main__":
    sys.exit(main())
