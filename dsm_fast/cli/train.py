"""``dsm-fast train``: train U(y, t) from defaults ← --preset NAME ← --config FILE ← the command line; at the end, the
loss it started from and reached, the held-out NLL beside the untrained level, and the run's pictures."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from ..config import PRESETS, TrainConfig, resume_flags
from .common import Formatter, examples


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
                       help=f"{f.metadata['help']} (default: {f.default})".strip())


def run_train(args) -> int:
    from ..config import resolve_config
    from ..data import make_test_data
    from ..distributed import stop
    from ..model import parameter_count
    from ..train import Trainer

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    resume = resume_wanted(args, overrides)
    cfg = resolve_config(args.config, overrides, args.preset, resume=resume)
    if cfg.eval_images > 0:
        make_test_data(cfg, 1)  # a data set too small to hold out images is refused before training, not after
    try:
        trainer = Trainer(cfg, resume=resume, local_rank=args.local_rank)
        cfg = trainer.cfg  # route, kernels and compilation resolved
        start = held_out_nll(trainer, cfg) if trainer.world.is_main and not trainer.engine.partitions_weights else None
        if trainer.world.is_main:
            warn_small_data(trainer, cfg)
            print(f"training {cfg.model} ({parameter_count(trainer.model):,} parameters) on {cfg.data}"
                  f"{f' (preset {args.preset})' if args.preset else ''} "
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


def resume_wanted(args, overrides: dict) -> bool:
    """--resume: continue; --resume auto: continue when --out already holds a checkpoint, else start the run."""
    if args.resume != "auto":
        return args.resume == "yes"
    from ..checkpoint import list_checkpoints
    from ..config import given_options

    return bool(list_checkpoints(Path(given_options(args.config, overrides, args.preset).get("out", TrainConfig.out))))


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
