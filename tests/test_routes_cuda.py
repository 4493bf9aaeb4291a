"""The fast path on CUDA (skipped without a GPU; benchmarks/gpu_check.sh runs it): the custom ops' second order on
the device, the 'cuda' backend, Inductor's compiled fused step in float32 and bf16, the captured CUDA graph step
against eager steps, a non-finite step skipped inside the graph, and a training step that never synchronizes."""

import pytest
import torch

from dsm_fast import cuda_ext
from dsm_fast.model import UNetEnergy
from dsm_fast.routes import ReferenceRoute, make_route
from dsm_fast.tools.testing import (
    TOLERANCES,
    assert_rel_close,
    draw_batch,
    parameter_gradients,
    relative_error,
    tiny_config,
)
from dsm_fast.train import Trainer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def reference_and_gpu_model():
    """The float64 reference gradients on the CPU and a float32 CUDA copy of the same weights, the initial ones: with
    every weight moved off them (tests/test_model_adjoint.py's float64 model) float32 itself is ill-conditioned at t = 1e3
    (the float32 reference route 7e-4 from float64, measured on the CPU)."""
    model = UNetEnergy(3, "tiny").double()
    x, t, eps = draw_batch(4, 3)
    expected = parameter_gradients(model, ReferenceRoute(model), x, t, eps)
    gpu = UNetEnergy(3, "tiny").cuda()
    gpu.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    return expected, gpu, [v.float().cuda() for v in (x, t, eps)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_second_order_kernels_on_the_device(dtype, seed):
    from dsm_fast.kernels import norm_act as na

    h = torch.randn(3, 5, 37, 29, device="cuda", dtype=dtype) * 2 + 0.5
    k = 1 + 0.3 * torch.randn(3, 5, device="cuda", dtype=dtype)
    g, hh, kk = torch.randn_like(h), torch.randn_like(h), torch.randn_like(k)
    inputs = [x.detach().double().requires_grad_() for x in (h, k, g)]
    expected = torch.autograd.grad(na.scaled_norm_act_adjoint_ref(*inputs), inputs, (hh.double(), kk.double()))
    mean, var = na.norm_act_statistics_launch(h)
    actual = na.norm_act_adjoint_backward_launch(h, k, mean, var, g, hh, kk)
    assert_rel_close([a.double() for a in actual], list(expected), TOLERANCES[dtype], "second order", seed)
    torch.library.opcheck(torch.ops.dsm_fast.norm_act_adjoint_backward.default, (h, k, mean, var, g, hh, kk))


@pytest.mark.skipif(not cuda_ext.is_available(), reason="needs the built extension dsm_fast._cuda")
def test_cuda_backend_gradients_match_the_reference(seed):
    expected, gpu, batch = reference_and_gpu_model()
    actual = parameter_gradients(gpu, make_route("fused", gpu, kernels="cuda"), *batch)
    assert_rel_close(actual, expected, TOLERANCES[torch.float32], "fused (cuda) gradients", seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inductor_compiled_fused_step_matches_the_reference(dtype, seed):
    """float32: within 1e-4 of the float64 reference. bf16 autocast: within twice the eager plain-PyTorch fused
    route's own bf16 error (the convolutions' bf16 storage costs a few 1e-2 at t = 1e3 whatever runs the rest;
    tests/test_model_adjoint.py)."""
    expected, gpu, batch = reference_and_gpu_model()

    def error(route) -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            actual = parameter_gradients(gpu, route, *batch)
        return relative_error(actual, expected)  # inf if anything is not finite

    route = make_route("fused", gpu, kernels="triton", compile=True)
    compiled = error(route)
    assert not route.fell_back, f"Inductor failed to compile the fused step: {route.fallback}"
    bound = TOLERANCES[dtype] if dtype == torch.float32 else 2 * error(make_route("fused", gpu, kernels="torch"))
    assert compiled < bound, (dtype, compiled, bound, seed)


def cuda_config(out, **changes):
    return tiny_config(out, **{"steps": 8, "log_every": 4, "device": "cuda", "compile": "off", **changes})


def test_cuda_graph_steps_equal_eager_steps_and_skip_a_non_finite_one(tmp_path, monkeypatch):
    runs = {}
    for graph in (False, True):
        trainer = Trainer(cuda_config(tmp_path / str(graph), cuda_graph=graph))
        real_next = trainer.data.next_batch

        def poisoned(n, device, dtype, trainer=trainer, real_next=real_next):
            x = real_next(n, device, dtype)
            return x * float("nan") if trainer.step == 5 else x  # after capture (3 warm-up steps, then step 3)

        monkeypatch.setattr(trainer.data, "next_batch", poisoned)
        trainer.run()
        assert trainer.skipped.total == 1 and all(torch.isfinite(p).all() for p in trainer.model.parameters())
        runs[graph] = [p.detach().clone() for p in trainer.model.parameters()]
    assert_rel_close(runs[True], runs[False], 1e-5, "CUDA graph vs eager weights after 8 steps")


def test_a_training_step_never_synchronizes_the_host(tmp_path):
    trainer = Trainer(cuda_config(tmp_path / "sync", route="fused", kernels="triton"))
    x = torch.rand(4, 3, 16, 16, device="cuda")
    t, eps = torch.logspace(-9, 3, 4, device="cuda"), torch.randn_like(x)
    trainer._update(x, t, eps)  # the first step creates the optimizer's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            out = trainer._update(x, t, eps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(out["ok"]) and torch.isfinite(out["loss"])
