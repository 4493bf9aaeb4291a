"""Communication volume per optimizer step and projected data-parallel scaling efficiency, computed from the
parameter count and a measured single-device step time (weak scaling: the per-device batch stays fixed).

    python benchmarks/engine_scaling.py                      # the README table
    python benchmarks/engine_scaling.py --step-ms 169 --accum 2

Model of one step on W devices (bytes per gradient/weight element b = 4, fp32):
- DDP and ZeRO-1: gradients reduced once per optimizer step (micro-steps run under no_sync / accumulate
  locally): a ring all-reduce moves 2 (W − 1)/W · P · b per device. ZeRO-1's reduce-scatter + all-gather of
  the updated weights moves the same.
- ZeRO-2: gradients are reduce-scattered after every micro-step, weights all-gathered once:
  (grad_accum + 1)(W − 1)/W · P · b.
Communication time = volume / bandwidth; efficiency = T / (T + comm) without overlap (the floor) and
T / max(T, comm) with full overlap of communication and backward (the ceiling).
"""
from __future__ import annotations

import argparse

PAPER_PARAMS = 8_649_856
ANCHOR_MS = 265.0  # method.md §6: the reference route, paper preset, batch 128, one H100, fp32 (not measured here)
BANDWIDTH_GBS = {"1 node (NVLink, 350 GB/s bus bw, assumed)": 350.0,
                 "multi-node (400 Gb/s IB per GPU, 50 GB/s, assumed)": 50.0}


def volume_bytes(params: int, world: int, engine: str, accum: int = 1, bytes_per_element: int = 4) -> float:
    """Bytes each device sends (and receives) per optimizer step."""
    if world == 1:
        return 0.0
    passes = {"ddp": 2, "zero1": 2, "zero2": accum + 1}[engine]
    return passes * (world - 1) / world * params * bytes_per_element


def efficiency(step_s: float, comm_s: float) -> tuple[float, float]:
    """(no overlap, full overlap) fraction of linear scaling."""
    return step_s / (step_s + comm_s), step_s / max(step_s, comm_s)


def table(presets: dict[str, tuple[int, float]], worlds: list[int], accum: int) -> str:
    header = ("| preset | params | step (ms, 1 device) | engine | devices | link | MB / step / device | "
              "efficiency (no overlap – full overlap) |")
    rows = [header, "|---|---|---|---|---|---|---|---|"]
    for name, (params, step_ms) in presets.items():
        for engine in ("ddp", "zero1", "zero2"):
            for world in worlds:
                link = next(iter(BANDWIDTH_GBS)) if world <= 8 else list(BANDWIDTH_GBS)[1]
                volume = volume_bytes(params, world, engine, accum)
                low, high = efficiency(step_ms / 1e3, volume / (BANDWIDTH_GBS[link] * 1e9))
                rows.append(f"| {name} | {params:,} | {step_ms:.0f} | {engine} | {world} | {link} | "
                            f"{volume / 1e6:.1f} | {low:.1%} – {high:.1%} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-ms", type=float, default=ANCHOR_MS,
                        help="single-device step time of the paper preset (default: method.md §6 anchor)")
    parser.add_argument("--big-params", type=int, default=300_000_000, help="parameters of the large preset")
    parser.add_argument("--accum", type=int, default=1, help="gradient accumulation (ZeRO-2 reduces per micro-step)")
    parser.add_argument("--worlds", default="8,16,64", help="comma-separated device counts")
    args = parser.parse_args()
    # The large preset's step time is scaled by parameter count from the paper preset's (an assumption:
    # compute grows with width², as parameters do, at a fixed resolution and batch).
    presets = {"paper": (PAPER_PARAMS, args.step_ms),
               "300M": (args.big_params, args.step_ms * args.big_params / PAPER_PARAMS)}
    print(table(presets, [int(w) for w in args.worlds.split(",")], args.accum))


if __name__ == "__main__":
    main()
