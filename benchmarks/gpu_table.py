"""The markdown table of benchmarks/gpu_check.sh's results, ready for benchmarks/RESULTS.md.

    python benchmarks/gpu_table.py OUT_DIR

Reads OUT_DIR/env.txt, bench_{fp32,bf16}_{eager,compiled,layout,edm2_eager,edm2_compiled}.json and cost.json; one
row per (network, precision, route) with ms/step, peak GiB, the first step's seconds (compilation, capture), the ratio
to the compiled score step of the same network and precision, and, for eager fp32 rows, the cost report's predicted H100/H200 ms. Then the issue's targets for the
fused, compiled, bf16, CUDA-graph step: ≤ 26 ms, ≤ 8 GiB, ≤ 1.6× the compiled bf16 score step.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TARGET_MS, TARGET_GIB, TARGET_RATIO = 26.0, 8.0, 1.6


PARTS = ("eager", "compiled", "layout", "edm2_eager", "edm2_compiled")


def load_rows(out: Path) -> list[dict]:
    """Every bench row, tagged with its precision and network (the bench's --preset)."""
    rows = []
    for precision in ("fp32", "bf16"):
        for part in PARTS:
            path = out / f"bench_{precision}_{part}.json"
            if path.is_file():
                result = json.loads(path.read_text())
                rows += [{**row, "precision": precision, "network": result["config"]["preset"]}
                         for row in result["rows"]]
    return rows


def predicted(cost: dict, route: str, kernels: str) -> str:
    name = f"fused ({kernels})" if route == "fused" else route
    row = cost.get("routes", {}).get(name)
    return " / ".join(f"{row['predicted_ms'][d]:.0f}" for d in ("H100 SXM", "H200 SXM")) if row else ""


def table(out: Path) -> str:
    rows = load_rows(out)
    cost = json.loads((out / "cost.json").read_text()) if (out / "cost.json").is_file() else {}
    score = {(r["network"], r["precision"]): r["ms_per_step"] for r in rows if r["route"] == "score+compile"}
    lines = [(out / "env.txt").read_text().strip() if (out / "env.txt").is_file() else "", "",
             ("| network | precision | route | kernels | ms/step | peak GiB | first step s | × compiled score | "
              "cost report H100 / H200 ms |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["network"], r["precision"])
        ratio = f"{r['ms_per_step'] / score[key]:.2f}" if key in score else "n/a"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        eager_fp32 = r["precision"] == "fp32" and "+" not in r["route"] and r["network"] == "paper"  # the cost report is of the paper preset
        guess = predicted(cost, r["route"], r["kernels"]) if eager_fp32 else ""
        lines.append(f"| {r['network']} | {r['precision']} | {r['route']} | {r['kernels']} | {r['ms_per_step']:.2f} | {peak} | "
                     f"{r['first_step_s']:.1f} | {ratio} | {guess} |")
    best = next((r for r in rows if r["precision"] == "bf16" and r["route"] == "fused+compile+graph"
                 and r["network"] == "paper"), None)
    if best is None:
        lines += ["", "targets: fused+compile+graph in bf16 not measured"]
    else:
        ratio = best["ms_per_step"] / score["paper", "bf16"] if ("paper", "bf16") in score else float("nan")
        checks = [(best["ms_per_step"] <= TARGET_MS, f"{best['ms_per_step']:.1f} ms ≤ {TARGET_MS:.0f}"),
                  (best["peak_gib"] is not None and best["peak_gib"] <= TARGET_GIB,
                   f"{best['peak_gib'] or float('nan'):.2f} GiB ≤ {TARGET_GIB:.0f}"),
                  (ratio <= TARGET_RATIO, f"{ratio:.2f}× compiled bf16 score ≤ {TARGET_RATIO}")]
        lines += ["", "targets (fused+compile+graph, bf16): " + "; ".join(
            f"{text} {'met' if ok else 'NOT met'}" for ok, text in checks)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
