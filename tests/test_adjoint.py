"""The explicit adjoint (dsm_fast/model/adjoint.py) and the fused route against eager autograd, in float64."""
import math

import pytest
import torch

from dsm_fast.model import RadialEnergy, UNetEnergy, adjoint, energy_and_scores
from dsm_fast.routes import FusedRoute, ReferenceRoute, make_route, noisy, resolve_kernels
from dsm_fast.testing import TOLERANCES, assert_rel_close

TOL = TOLERANCES[torch.float64]  # 1e-6


def perturbed_model(channels: int) -> UNetEnergy:
    """The tiny preset in float64 with every parameter moved off its initial value (gains off 1, deep layers'
    variances off eps), so that every path, the noise embedding's to ∂_t U included, carries weight."""
    model = UNetEnergy(channels, "tiny").double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def draw(n: int, channels: int):
    """Images in [0, 1], t spanning 1e-9 … 1e3 (both ends and a log-uniform draw between), noise."""
    x = torch.rand(n, channels, 16, 16, dtype=torch.float64)
    middle = torch.exp(math.log(1e-9) + torch.rand(n - 2, dtype=torch.float64) * math.log(1e12))
    t = torch.cat([torch.tensor([1e-9], dtype=torch.float64), middle, torch.tensor([1e3], dtype=torch.float64)])
    return x, t, torch.randn_like(x)


def parameter_gradients(model, route, x, t, eps):
    model.zero_grad(set_to_none=True)
    route(x, t, eps)["loss"].mean().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("channels", [1, 3])
def test_energy_and_scores_equal_autograd(channels, seed):
    model = perturbed_model(channels)
    x, t, eps = draw(3, channels)
    y = noisy(x, t, eps)
    expected = energy_and_scores(model, y, t)
    actual = adjoint.energy_and_scores(model, y, t)
    for name, a, e in zip(("U", "∇_y U", "∂_t U"), actual, expected):
        assert_rel_close(a, e, TOL, name, seed)


@pytest.mark.parametrize("channels, objective", [(1, "dual"), (3, "dual"), (3, "single")])
def test_fused_route_gradients_equal_reference(channels, objective, seed):
    model = perturbed_model(channels)
    x, t, eps = draw(3, channels)
    expected = parameter_gradients(model, ReferenceRoute(model, objective), x, t, eps)
    route = FusedRoute(model, objective, kernels="torch")
    assert_rel_close(parameter_gradients(model, route, x, t, eps), expected, TOL, "fused (torch) gradients", seed)


def test_fused_route_backward_is_first_order(monkeypatch, seed):
    """The fused terms are built without autograd.grad, and one plain backward (no create_graph) gives θ's
    gradients with no graph left on them."""
    model = perturbed_model(1)
    x, t, eps = draw(2, 1)

    def refuse(*args, **kwargs):
        raise AssertionError("the fused route called autograd.grad")

    with monkeypatch.context() as patch:
        patch.setattr(torch.autograd, "grad", refuse)
        loss = make_route("fused", model)(x, t, eps)["loss"].mean()
    loss.backward()
    assert all(p.grad.grad_fn is None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("channels", [1, 3])
def test_fused_route_triton_kernels_equal_reference(channels, seed):
    """The same equality with NormAct and the loss terms run by the Triton kernels (interpreted on the CPU)."""
    model = perturbed_model(channels)
    x, t, eps = draw(2, channels)
    expected_scores = energy_and_scores(model, noisy(x, t, eps), t)
    actual_scores = adjoint.energy_and_scores(model, noisy(x, t, eps), t, kernels="triton")
    for name, a, e in zip(("U", "∇_y U", "∂_t U"), actual_scores, expected_scores):
        assert_rel_close(a, e, TOL, f"{name} (triton)", seed)
    expected = parameter_gradients(model, ReferenceRoute(model), x, t, eps)
    route = FusedRoute(model, kernels="triton")
    assert_rel_close(parameter_gradients(model, route, x, t, eps), expected, TOL, "fused (triton) gradients", seed)


def test_kernel_choice_and_model_checks(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_kernels("auto", cpu) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_kernels("triton", cpu)
    with pytest.raises(ValueError, match="unknown kernels"):
        resolve_kernels("cuda-graphs", cpu)
    with pytest.raises(TypeError, match="needs a UNetEnergy"):
        make_route("fused", RadialEnergy(8))(torch.rand(2, 8), torch.ones(2), torch.randn(2, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (float32 and bf16 Triton kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_route_on_the_gpu_matches_the_float64_reference(dtype, seed):
    """Paper-sized channels are not needed for the bound: the tiny preset on CUDA, Triton kernels, float32 weights
    (bf16 through autocast, as the trainer runs it), against the eager reference in float64 on the CPU."""
    model = perturbed_model(3)
    x, t, eps = draw(4, 3)
    expected = parameter_gradients(model, ReferenceRoute(model), x, t, eps)
    gpu_model = UNetEnergy(3, "tiny").cuda()
    gpu_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    route = FusedRoute(gpu_model, kernels="auto")
    assert route.kernels == "triton"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        actual = parameter_gradients(gpu_model, route, *(v.float().cuda() for v in (x, t, eps)))
    assert_rel_close(actual, expected, TOLERANCES[dtype], f"fused (triton, {dtype}) gradients", seed)
