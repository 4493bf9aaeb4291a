"""Communication volume per optimizer step and projected data-parallel scaling efficiency, computed from the
parameter count and a single-device step time (weak scaling: the per-device batch stays fixed).

    python benchmarks/engine_scaling.py                      # the README table (GPU anchor of docs/method.md §6.2)
    python benchmarks/engine_scaling.py --step-ms 26 --accum 4
    python benchmarks/engine_scaling.py --measure            # also time 1 vs 2 processes here (CPU, gloo)

Model of one step on W devices (P parameters, b = 4 bytes per fp32 gradient/weight element):
- DDP and ZeRO-1: gradients reduced once per optimizer step (micro-steps run under no_sync / accumulate
  locally): a ring all-reduce moves 2 (W − 1)/W · P · b per device. ZeRO-1's reduce-scatter + all-gather of
  the updated weights moves the same.
- ZeRO-2: gradients are reduce-scattered after every micro-step, weights all-gathered once:
  (grad_accum + 1)(W − 1)/W · P · b.
- ZeRO-3: every micro-step all-gathers the weights for the forward and again for the backward and
  reduce-scatters the gradients: 3 · grad_accum · (W − 1)/W · P · b.
Communication time = volume / bandwidth; efficiency = T / (T + comm) without overlap (the floor) and
T / max(T, comm) with full overlap of communication and backward (the ceiling).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# docs/method.md §6.2: the reference route, paper preset, batch 128, one H100, fp32 (not measured here)
ANCHOR_MS = 265.0
BIG_PARAMS = 300_000_000
BANDWIDTH_GBS = {"1 node (NVLink, 350 GB/s bus bw, assumed)": 350.0,
                 "multi-node (400 Gb/s IB per GPU, 50 GB/s, assumed)": 50.0}
ENGINES = ("ddp", "zero1", "zero2", "zero3")


def parameter_count(preset: str, channels: int = 3) -> int:
    from dsm_fast.model import build_model

    return sum(p.numel() for p in build_model(preset, channels=channels).parameters())


def volume_bytes(params: int, world: int, engine: str, accum: int = 1, bytes_per_element: int = 4) -> float:
    """Bytes each device sends (and receives) per optimizer step."""
    if world == 1:
        return 0.0
    passes = {"ddp": 2, "zero1": 2, "zero2": accum + 1, "zero3": 3 * accum}[engine]
    return passes * (world - 1) / world * params * bytes_per_element


def efficiency(step_s: float, comm_s: float) -> tuple[float, float]:
    """(no overlap, full overlap) fraction of linear scaling."""
    return step_s / (step_s + comm_s), step_s / max(step_s, comm_s)


def table(presets: dict[str, tuple[int, float]], worlds: list[int], accum: int) -> str:
    header = ("| preset | params | step (ms, 1 device) | engine | devices | link | MB / step / device | "
              "efficiency (no overlap – full overlap) |")
    rows = [header, "|---|---|---|---|---|---|---|---|"]
    for name, (params, step_ms) in presets.items():
        for engine in ENGINES:
            for world in worlds:
                link = next(iter(BANDWIDTH_GBS)) if world <= 8 else list(BANDWIDTH_GBS)[1]
                volume = volume_bytes(params, world, engine, accum)
                low, high = efficiency(step_ms / 1e3, volume / (BANDWIDTH_GBS[link] * 1e9))
                rows.append(f"| {name} | {params:,} | {step_ms:.0f} | {engine} | {world} | {link} | "
                            f"{volume / 1e6:.1f} | {low:.1%} – {high:.1%} |")
    return "\n".join(rows)


def timed_run(out: Path, processes: int, engine: str, args: argparse.Namespace, per_device_batch: int) -> float:
    """Images per second of one CPU training run (the last logged interval, which excludes start-up)."""
    flags = ["train", "--model", args.preset, "--image-size", str(args.image_size), "--route", "functional",
             "--device", "cpu", "--steps", str(args.steps), "--log-every", str(args.steps // 2),
             "--checkpoint-every", str(10 * args.steps), "--eval-images", "0", "--progress", "false",
             "--batch-size", str(per_device_batch * processes), "--engine", engine, "--out", str(out)]
    if engine == "deepspeed":
        flags += ["--zero-stage", "2"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                 "--master-port", str(29400 + os.getpid() % 500)] if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    subprocess.run([*launcher, "-m", "dsm_fast", *flags], check=True, env=env, capture_output=True)
    return json.loads((out / "stats.jsonl").read_text().splitlines()[-1])["img_per_s"]


def measure(args: argparse.Namespace) -> str:
    """Time 1 process and 2 processes (DDP, ZeRO-2) with the same per-process batch; 1 thread per process."""
    params = parameter_count(args.preset)
    rows = ["| engine | processes | img/s | step (ms) | MB / step / process | efficiency vs 1 process |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        one = timed_run(Path(folder) / "single", 1, "single", args, args.batch)
        rows.append(f"| single | 1 | {one:.1f} | {1e3 * args.batch / one:.0f} | 0 | 100% |")
        for engine, name in (("ddp", "ddp"), ("deepspeed", "zero2")):
            rate = timed_run(Path(folder) / engine, 2, engine, args, args.batch)
            rows.append(f"| {name} | 2 | {rate:.1f} | {1e3 * 2 * args.batch / rate:.0f} | "
                        f"{volume_bytes(params, 2, name) / 1e6:.1f} | {rate / (2 * one):.0%} |")
    return (f"Measured here: preset {args.preset} ({params:,} parameters), {args.image_size}², functional route, "
            f"batch {args.batch} per process, {args.steps} steps, CPU, gloo\n\n" + "\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-ms", type=float, default=ANCHOR_MS,
                        help="single-device step time of the paper preset (default: docs/method.md §6.2 anchor)")
    parser.add_argument("--big-params", type=int, default=BIG_PARAMS, help="parameters of the large preset")
    parser.add_argument("--accum", type=int, default=1, help="gradient accumulation (ZeRO-2/3 communicate per "
                                                             "micro-step)")
    parser.add_argument("--worlds", default="8,64", help="comma-separated device counts")
    parser.add_argument("--measure", action="store_true", help="also time 1 vs 2 processes on this machine")
    parser.add_argument("--preset", default="small", help="--measure: the UNet preset to time")
    parser.add_argument("--image-size", type=int, default=32, help="--measure: image size")
    parser.add_argument("--batch", type=int, default=8, help="--measure: images per process per step")
    parser.add_argument("--steps", type=int, default=12, help="--measure: steps per run")
    args = parser.parse_args()
    paper = parameter_count("paper")
    # The large preset's step time is scaled by parameter count from the paper preset's (an assumption:
    # compute grows with width², as parameters do, at a fixed resolution and batch).
    presets = {"paper": (paper, args.step_ms), "300M": (args.big_params, args.step_ms * args.big_params / paper)}
    print(f"Step time of the paper preset: {args.step_ms:g} ms"
          + (" (docs/method.md §6.2 anchor: reference route, one H100, batch 128, fp32; not measured here)"
             if args.step_ms == ANCHOR_MS else "") + f"; grad_accum {args.accum}\n")
    print(table(presets, [int(w) for w in args.worlds.split(",")], args.accum))
    if args.measure:
        print("\n" + measure(args))


if __name__ == "__main__":
    main()
