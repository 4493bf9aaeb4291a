"""The training routes (dsm_fast/routes.py): equal parameter gradients, auto choice, compile and its fallback."""
import warnings

import pytest
import torch

from dsm_fast.model import UNetEnergy
from dsm_fast.routes import Compiled, FunctionalRoute, ReferenceRoute, make_route
from dsm_fast.tools.testing import assert_rel_close, parameter_gradients

T_SPAN = torch.tensor([1e-9, 1e-5, 1e-2, 1.0, 30.0, 1e3], dtype=torch.float64)


def batch(n=6, channels=3, size=16, dtype=torch.float64):
    x = torch.rand(n, channels, size, size, dtype=dtype)
    return x, T_SPAN[:n].to(dtype), torch.randn(x.shape, dtype=dtype)


def test_functional_route_matches_reference_in_float64(seed):
    model = UNetEnergy(3, "tiny").double()
    x, t, eps = batch()
    expected = parameter_gradients(model, ReferenceRoute(model), x, t, eps)
    actual = parameter_gradients(model, FunctionalRoute(model), x, t, eps)
    assert_rel_close(actual, expected, 1e-6, "torch.func route gradients", seed)


def test_compiled_fused_step_matches_reference(seed):
    """torch.compile over the whole fused (explicit-adjoint) terms; its backward by AOTAutograd. Parameter
    gradients equal the eager reference route's: float64 < 1e-10, float32 < 1e-4 (fresh inputs on a second call
    go through the same compiled graph). Backend aot_eager: Inductor's CPU code generation takes minutes for this
    graph on 2 cores; Inductor itself is checked on CUDA (tests/test_routes_cuda.py) and timed by bench."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        model = UNetEnergy(1, "tiny").to(dtype)
        x, t, eps = batch(2, channels=1, size=8, dtype=dtype)
        route = make_route("fused", model, kernels="torch", compile=True, backend="aot_eager")
        for _ in range(2):
            expected = parameter_gradients(model, ReferenceRoute(model), x, t, eps)
            actual = parameter_gradients(model, route, x, t, eps)
            assert not route.fell_back, "compilation failed on this machine"
            assert_rel_close(actual, expected, tol, f"compiled fused route gradients ({dtype})", seed)
            x, eps = torch.rand_like(x), torch.randn_like(eps)


def test_auto_route_and_compile_resolve_once():
    from dsm_fast.config import ConfigError, resolve_compile, resolve_route

    unet = UNetEnergy(3, "tiny")
    assert resolve_route("auto", True, "dual") == "fused" and resolve_route("auto", True, "single") == "fused"
    assert resolve_route("auto", True, "diffclf") == "reference" and resolve_route("auto", False, "dual") == "reference"
    assert resolve_route("functional", True, "dual") == "functional"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not resolve_compile("auto", "fused", cpu) and resolve_compile("auto", "fused", cuda)
    assert not resolve_compile("auto", "reference", cuda) and not resolve_compile("auto", "fused", cuda, "deepspeed")
    for bad in (lambda: resolve_compile("on", "reference", cpu), lambda: Compiled(ReferenceRoute(unet))):
        with pytest.raises(ConfigError, match="cannot be compiled"):
            bad()


@pytest.mark.parametrize("part", ["forward", "backward"])
def test_a_failed_compile_falls_back_with_one_warning(part, failing_compiler, seed):
    """The backward is compiled within the compiled forward call (AOTAutograd would otherwise compile it at the first
    loss.backward(), outside the fallback), so a failure of either graph's compiler falls back."""
    model = UNetEnergy(1, "tiny").double()
    x, t, eps = batch(2, channels=1, size=8)
    route = make_route("fused", model, kernels="torch", compile=True, backend=failing_compiler(part))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = parameter_gradients(model, route, x, t, eps)
        second = parameter_gradients(model, route, x, t, eps)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and f"(RuntimeError: cannot lower the {part} graph)" in messages[0], messages
    assert "details" not in messages[0] and route.fallback == f"RuntimeError: cannot lower the {part} graph"
    eager = parameter_gradients(model, route.route, x, t, eps)
    assert all(torch.equal(a, b) for a, b in zip(first, eager)) and all(map(torch.equal, second, eager))


def test_an_error_while_the_compiled_step_runs_is_not_a_compile_failure(failing_compiler):
    model = UNetEnergy(1, "tiny").double()
    x, t, eps = batch(2, channels=1, size=8)
    route = make_route("fused", model, kernels="torch", compile=True, backend=failing_compiler("run"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(torch.OutOfMemoryError, match="while running the compiled forward"):
            route(x, t, eps)
    assert not route.fell_back
