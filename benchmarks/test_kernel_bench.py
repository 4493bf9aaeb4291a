"""Kernel benchmarks (pytest-benchmark): every implementation of every fused op in dsm_fast.tools.profile's registry,
checked against the float64 reference before it is timed.

    pytest benchmarks/test_kernel_bench.py --benchmark-only        # timings
    pytest benchmarks --benchmark-disable                          # CI: correctness only, one call each

Triton rows run on a GPU, or interpreted on the CPU when TRITON_INTERPRET=1 (tests/conftest.py sets it for a
whole-suite run); CUDA C++ rows where the extension is built and a GPU is visible.
"""
import os

import pytest
import torch

from dsm_fast import cuda_ext
from dsm_fast.tools.profile import implementations, kernel_inputs, profile_step
from dsm_fast.tools.testing import TOLERANCES, assert_rel_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
USE_TRITON = DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
REGISTRY = implementations(DEVICE, USE_TRITON, cuda_ext.is_available())
SIZES = {"b4-c16-20px": (4, 16, 20)} if DEVICE.type == "cpu" else {"b128-c64-64px": (128, 64, 64)}
CASES = [(op, impl) for op, impls in REGISTRY.items() for impl in impls]


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("op, impl", CASES, ids=[f"{op}-{impl}".replace(" ", "_") for op, impl in CASES])
def test_kernel(benchmark, op, impl, size):
    batch, channels, image = SIZES[size]
    exact_inputs = kernel_inputs(batch, channels, image, DEVICE, torch.float64, torch.Generator(DEVICE).manual_seed(0))
    inputs = {k: v.float() for k, v in exact_inputs.items()}
    impls = REGISTRY[op]
    expected = impls[next(iter(impls))](exact_inputs)
    with torch.no_grad():
        actual = benchmark(impls[impl], inputs)
    assert_rel_close(list(actual) if isinstance(actual, tuple) else actual,
                     list(expected) if isinstance(expected, tuple) else expected, TOLERANCES[torch.float32],
                     f"{op} ({impl})")


def test_step_breakdown_runs():
    rows = profile_step("tiny", 2, 16, 3, DEVICE, torch.float32, repeat=1, kernels="torch")
    assert [r["phase"].split(":")[0] for r in rows] == ["fused"] * 4 + ["reference"]
    assert all(r["ms"] > 0 for r in rows)
