"""The explicit adjoint (dsm_fast/model/adjoint.py) and the fused route against eager autograd, in float64."""
import os

import pytest
import torch

from dsm_fast.config import resolve_kernels
from dsm_fast.model import RadialEnergy, UNetEnergy
from dsm_fast.routes import FusedRoute, ReferenceRoute, make_route
from dsm_fast.tools.testing import (
    TOLERANCES,
    assert_rel_close,
    assert_scores_equal_autograd,
    draw_batch,
    parameter_gradients,
    perturbed,
    relative_error,
)

TOL = TOLERANCES[torch.float64]  # 1e-6


@pytest.mark.parametrize("channels", [1, 3])
def test_energy_and_scores_equal_autograd(channels, seed):
    model = perturbed(UNetEnergy(channels, "tiny").double())
    assert_scores_equal_autograd(model, *draw_batch(3, channels), TOL, seed)


@pytest.mark.parametrize("channels, objective", [(1, "dual"), (3, "dual"), (3, "single")])
def test_fused_route_gradients_equal_reference(channels, objective, seed):
    model = perturbed(UNetEnergy(channels, "tiny").double())
    x, t, eps = draw_batch(3, channels)
    expected = parameter_gradients(model, ReferenceRoute(model, objective), x, t, eps)
    route = FusedRoute(model, objective, kernels="torch")
    assert_rel_close(parameter_gradients(model, route, x, t, eps), expected, TOL, "fused (torch) gradients", seed)


def test_fused_route_backward_is_first_order(monkeypatch, seed):
    """The fused terms are built without autograd.grad, and one plain backward (no create_graph) gives θ's
    gradients with no graph left on them."""
    model = perturbed(UNetEnergy(1, "tiny").double())
    x, t, eps = draw_batch(2, 1)

    def refuse(*args, **kwargs):
        raise AssertionError("the fused route called autograd.grad")

    with monkeypatch.context() as patch:
        patch.setattr(torch.autograd, "grad", refuse)
        loss = make_route("fused", model)(x, t, eps)["loss"].mean()
    loss.backward()
    assert all(p.grad.grad_fn is None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_fused_route_triton_kernels_equal_reference(seed, channels=3):
    """The same equality with NormAct and the loss terms run by the Triton kernels (interpreted on the CPU; colour
    only, since the kernels see the hidden layers alone, the same for gray, and an interpreted case costs ≈ 45 s)."""
    model = perturbed(UNetEnergy(channels, "tiny").double())
    x, t, eps = draw_batch(2, channels)
    assert_scores_equal_autograd(model, x, t, eps, TOL, seed, kernels="triton")
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


DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason=(
               "the Triton kernels run on the CPU interpreted only (set where there is no GPU; the cuda case covers "
               "this one there)"))),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_triton_route_in_the_trainers_precisions(dtype, device, seed):
    """The trainer's precisions at the initial weights, t at both ends of 1e-9 … 1e3: float32 weights and Triton kernels, bf16
    through autocast (statistics in float32) as the trainer runs it, against the eager reference in float64.
    float32: parameter gradients within 1e-4. bf16: rounding the convolutions' storage to 8 bits costs a few 1e-2
    at t = 1e3 whatever computes the rest (the reference route's double backward under autocast: ≈ 0.5), so the
    bound is the plain-PyTorch explicit adjoint's error in the same autocast, times 2 on CUDA and 3 interpreted:
    Triton's CPU interpreter does not round float32 → bf16 to nearest (half of the conversions differ from torch's),
    which cost 1.0–1.8× over seeds 0–4."""
    torch.manual_seed(seed)
    model = UNetEnergy(3, "tiny").double()
    x, t, eps = draw_batch(2, 3)  # t = 1e-9 and 1e3, the ends
    expected = parameter_gradients(model, ReferenceRoute(model), x, t, eps)
    low_model = UNetEnergy(3, "tiny").to(device)
    low_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    inputs = [v.float().to(device) for v in (x, t, eps)]

    def error(kernels: str) -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            actual = parameter_gradients(low_model, FusedRoute(low_model, kernels=kernels), *inputs)
        return relative_error(actual, expected)  # inf if anything is not finite

    bound = TOLERANCES[torch.float32] if dtype == torch.float32 else (2 if device == "cuda" else 3) * error("torch")
    assert error("triton") < bound, (dtype, device, seed)
