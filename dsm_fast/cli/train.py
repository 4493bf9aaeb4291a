"""``dsm-fast train``: train U(y, t) from defaults ← --preset NAME ← --config FILE ← the command line; at the end, the
loss it started from and reached, the held-out NLL beside the untrained level, and the run's pictures."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from ..config import PRESETS, ConfigError, TrainConfig, resume_flags
from .common import Formatter, examples

FIELD_HELP = {
    "model": "UNet preset (paper, small, tiny) or 'radial' for --data gsm",
    "energy": "paper (U = ½<y, f(y, t)>, the paper's) or gaussian (U starts at the data's Gaussian energy and the UNet "
              "learns the difference; see dsm_fast/model/gaussian.py)",
    "plots": "write RUN/plots/ (loss curve, loss per noise level, denoising grid, plots.json) when training ends",
    "data": "'demo' (photographs shipped with scikit-image), 'gsm' (Gaussian scale mixture), a folder or a .npy",
    "gsm_sigmas": "comma-separated standard deviations of the mixture components",
    "radial_offset": "radial model: start mis-normalized, log p_t off by -a*log t nats/dim (normalization uses 0.02)",
    "route": "auto (fused for a UNet with dual/single, else reference), reference (eager double backward), "
             "functional (torch.func; first-order) or fused (explicit adjoint, first-order; Triton on CUDA)",
    "kernels": "the fused route's NormAct and loss kernels: auto (triton on CUDA, else torch), torch, triton or cuda "
               "(the CUDA C++ NormAct, when built; second order by Triton)",
    "compile": "torch.compile the first-order step: auto (on CUDA), on (bare --compile) or off; falls back to eager "
               "with one warning",
    "cuda_graph": "CUDA, --engine single: capture the whole step (forward, backward, Adam, EMA) once and replay it",
    "precision": "fp32, bf16 (autocast, CUDA only) or fp64",
    "objective": "dual (space + time score), single (space only) or diffclf (space + noise-level classification; "
                 "reference route only)",
    "time_weight": "λ in loss = space + λ·time (diffclf: space + λ·classification)",
    "diffclf_levels": "diffclf: N noise levels, log-spaced over [t_min, t_max], that the classifier tells apart",
    "subset": "train on 'first:N' or 'last:N' of the training images (disjoint runs for dsm-fast generalization)",
    "lr_halve_every": "halve the learning rate every this many steps",
    "ema_decay": "EMA of the weights (0 disables)",
    "grad_clip": "max global gradient norm (0 disables)",
    "max_bad_steps": "stop after this many non-finite losses in a row; --resume then continues from the healthy "
                     "checkpoint before them",
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
                           "dsm-fast train --preset demo --out runs/demo",
                           "dsm-fast train --model small --steps 300 --batch-size 16 --out runs/small",
                           "dsm-fast train --config run.yaml --lr 2e-4",
                           "dsm-fast train --out runs/demo --steps 600 --resume",
                           "dsm-fast train --data gsm --model radial --t-min 1e-2 --t-max 1e2 --out runs/gsm",
                           "torchrun --nproc-per-node 8 -m dsm_fast train --engine ddp --route functional",
                           "deepspeed --num_gpus 8 -m dsm_fast train --engine deepspeed --zero-stage 2 "
                           "--route functional"),
                       description="Train U(y, t) on images (or the analytic GSM data). Options come from the "
                                   "defaults, then --preset NAME, then --config FILE (YAML or TOML), then the command "
                                   "line.")
    p.add_argument("--preset", choices=tuple(PRESETS), help="named settings (dsm_fast/config.py): demo (the main job: "
                   "minutes on a 2-core CPU, visibly learning), paper (the defaults)")
    p.add_argument("--config", help="YAML or TOML file of the options below (keys with underscores)")
    p.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"),
                   help="continue the run in --out from its newest healthy checkpoint, with the run's own options "
                        f"(config.json); only {resume_flags()} may be given anew. --resume auto: continue the run "
                        "if --out holds one, else start it (for torchrun --max-restarts and requeued jobs)")
    p.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=argparse.SUPPRESS,
                   help="passed by the deepspeed launcher; LOCAL_RANK in the environment takes precedence")
    bare = {"bool": "true", "compile": "on"}  # what a flag given without a value means
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        const = bare.get(f.name, bare.get(f.type))
        p.add_argument(flag, dest=f.name, default=None, metavar=f.type.upper() if f.type in ("int", "float") else None,
                       nargs="?" if const else None, const=const,
                       help=f"{FIELD_HELP.get(f.name, '')} (default: {f.default})".strip())


def run_train(args) -> int:
    from ..checkpoint import list_checkpoints
    from ..config import check_resume, given_options
    from ..data import make_test_data
    from ..distributed import stop
    from ..train import Trainer, config_from_run

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    given = given_options(args.config, overrides, args.preset)
    run_dir = Path(given.get("out", TrainConfig.out))
    resume = args.resume == "yes" or (args.resume == "auto" and bool(list_checkpoints(run_dir)))
    if resume:  # the run's resolved options ← the few a resume may change
        if not (run_dir / "config.json").is_file():
            raise ConfigError(f"--resume: {run_dir} holds no run to resume (no config.json); drop --resume to start one")
        saved = config_from_run(run_dir)
        check_resume(saved, given)
        cfg = dataclasses.replace(saved, **given).validate()
    else:
        cfg = TrainConfig(**given).validate()
    if cfg.eval_images > 0:
        make_test_data(cfg, 1)  # a data set too small to hold out images is refused before training, not after
    try:
        trainer = Trainer(cfg, resume=resume, local_rank=args.local_rank)
        cfg = trainer.cfg  # route, kernels and compilation resolved
        start = held_out_nll(trainer, cfg) if trainer.world.is_main and not trainer.engine.partitions_weights else None
        if trainer.world.is_main:
            warn_small_data(trainer, cfg)
            print(f"training {cfg.model} on {cfg.data}{f' (preset {args.preset})' if args.preset else ''} "
                  f"({cfg.objective} score matching, energy {cfg.energy}, route {cfg.route}, kernels {cfg.kernels}, "
                  f"compile {cfg.compile}{', CUDA graph' if cfg.cuda_graph else ''}, {trainer.optimizer_name}, "
                  f"engine {cfg.engine} × {trainer.world.size}, {trainer.device}) → {trainer.run_dir}", flush=True)
        first_step, began = trainer.step, time.perf_counter()
        summary = trainer.run()
    finally:
        stop()
    if not trainer.world.is_main:  # rank 0 reports and evaluates
        return 0
    report(trainer, cfg, summary, start, first_step, time.perf_counter() - began)
    return 0


def warn_small_data(trainer, cfg) -> None:
    """One line when the training set holds fewer images than one batch: every step then repeats images."""
    images = getattr(trainer.data, "images", None)
    if images is not None and images.shape[0] < cfg.batch_size:
        print(f"warning: {images.shape[0]} training image(s), fewer than --batch-size {cfg.batch_size}: every batch "
              f"repeats images (each epoch is shorter than one step)", file=sys.stderr, flush=True)


def held_out_nll(trainer, cfg) -> dict | None:
    """The NLL of ``trainer.model`` on ``cfg.eval_images`` held-out samples, or None when there are none."""
    from ..data import make_test_data
    from ..evaluate import clean_noise_level, evaluate_nll

    if cfg.eval_images <= 0:
        return None
    x, quantized = make_test_data(cfg, cfg.eval_images)
    return evaluate_nll(trainer.model, x, quantized, cfg.t_max, seed=cfg.seed, t_eval=clean_noise_level(cfg))


def report(trainer, cfg, summary: dict, start: dict | None, first_step: int, seconds: float) -> None:
    """What the run did: steps and speed, the smoothed loss it started from and reached, the NLL beside the level it
    started at and a flat energy's, and where its pictures are."""
    import math

    steps = summary["step"] - first_step
    fell_back = summary.get("compile_fell_back")  # (config.RUN_RECORD)
    print(f"done: step {summary['step']} in {seconds / 60:.1f} min ({steps / max(seconds, 1e-9):.2f} steps/s), "
          f"{summary['skipped_steps']} skipped steps"
          + (f"; torch.compile fell back to eager at {fell_back}" if fell_back else ""), flush=True)
    first, last = summary.get("first_smoothed_loss"), summary.get("smoothed_loss", float("nan"))
    if first is not None and math.isfinite(last):
        print(f"loss (smoothed over ~{cfg.log_every} steps): {first:.4f} at the first logged step → {last:.4f} now "
              f"({100 * (last / first - 1):+.1f}%)")
    result = held_out_nll(trainer, cfg)
    if result is not None:
        low, high = result["ci95"]
        flat = 0.5 * math.log2(2 * math.pi * math.e * cfg.t_max) + (8.0 if result["quantized_data"] else 0.0)
        before = f"at step {first_step}: {start['nll_bits_per_dim']:.4f}; " if start else ""
        print(f"held-out NLL: {result['nll_bits_per_dim']:.4f} bits/dim (95% CI {low:.4f}–{high:.4f}, "
              f"{result['n']} samples; {before}a flat energy: {flat:.4f})")
    if cfg.plots:
        from ..analysis.report import pictures_line, write_run_plots
        from ..data import make_test_data

        print(pictures_line(write_run_plots(trainer.run_dir, trainer.model, cfg, make_test_data(cfg, 1024)[0],
                                            seed=cfg.seed)))


COMMANDS = {"train": (add_train, run_train)}
