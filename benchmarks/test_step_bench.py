"""Step benchmarks (pytest-benchmark): each route's full training step at a small CPU size, checked
against the reference route's parameter gradients before it is timed.

    pytest benchmarks/test_step_bench.py --benchmark-only          # timings
    pytest benchmarks --benchmark-disable                          # CI: correctness only, one run each
"""
import copy

import pytest
import torch

from dsm_fast.config import ROUTES
from dsm_fast.losses import sample_noise_levels
from dsm_fast.model import UNetEnergy
from dsm_fast.routes import make_route
from dsm_fast.tools.bench import step_function
from dsm_fast.tools.testing import assert_rel_close, parameter_gradients

SIZES = {"tiny-16": ("tiny", 4, 16)}


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("route", ["score", *ROUTES])
def test_step(benchmark, route, size):
    preset, batch, image = SIZES[size]
    torch.manual_seed(0)
    model = UNetEnergy(3, preset)
    x = torch.rand(batch, 3, image, image)
    t = sample_noise_levels(batch, 1e-9, 1e3)
    eps = torch.randn_like(x)
    if route != "score":
        expected = parameter_gradients(model, make_route("reference", model), x, t, eps)
        assert_rel_close(parameter_gradients(model, make_route(route, model), x, t, eps), expected, 1e-4, f"{route} gradients (float32)")
    step, _ = step_function(route, copy.deepcopy(model), "fp32")
    loss = benchmark(step, x, t, eps)
    assert torch.isfinite(loss)
