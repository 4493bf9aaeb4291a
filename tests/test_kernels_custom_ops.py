"""The Triton ops as torch.library custom operators: opcheck (schema, fake tensors, autograd registration, AOT
dispatch), the meta device, a graph-break-free torch.compile trace, and the kernel counts dsm-fast profile --cost uses.
Interpreted on the CPU (tests/conftest.py); outputs and first/second-order gradients against the references are in
tests/test_kernels_*.py."""
import pytest
import torch
from dsm_fast.kernels import dual_score_loss as loss_op
from dsm_fast.kernels import norm_act as na
from triton.runtime import interpreter

from dsm_fast.tools.cost import CostMode


def norm_act_inputs(device="cpu", dtype=torch.float64):
    """(h, k, μ, v, ḡ, H, K): h's statistics μ, v as the forward returns them."""
    h = torch.randn(2, 3, 5, 3, device=device, dtype=dtype) * 2 + 0.5
    k = 1 + 0.2 * torch.randn(2, 3, device=device, dtype=dtype)
    mean, var = h.mean(dim=(2, 3)), h.var(dim=(2, 3), unbiased=False)
    return h, k, mean, var, torch.randn_like(h), torch.randn_like(h), torch.randn_like(k)


def loss_inputs(device="cpu", dtype=torch.float64):
    t = torch.tensor([0.5, 3.0], device=device, dtype=dtype)
    eps = torch.randn(2, 3, 4, 4, device=device, dtype=dtype)
    return torch.randn_like(eps), 3 * torch.randn(2, device=device, dtype=dtype), eps, t


def test_opcheck_every_op(seed):
    h, k, mean, var, g, hh, kk = norm_act_inputs()
    grad_y, grad_t, eps, t = loss_inputs()
    _, _, sums = loss_op._dual_score_loss_op(grad_y, grad_t, eps, t)
    cases = [(torch.ops.dsm_fast.norm_act.default, (h.requires_grad_(), k.requires_grad_())),
             (torch.ops.dsm_fast.norm_act_statistics.default, (h.detach(),)),
             (torch.ops.dsm_fast.norm_act_adjoint.default, (h, k, mean, var, g.requires_grad_())),
             # no gradient required: its own backward raises by design (test_kernels_norm_act.py)
             (torch.ops.dsm_fast.norm_act_adjoint_backward.default,
              [x.detach() for x in (h, k, mean, var, g, hh, kk)]),
             (torch.ops.dsm_fast.norm_act_backward.default, [x.detach() for x in (h, k, mean, var, g, hh)]),
             (torch.ops.dsm_fast.dual_score_loss.default, (grad_y.requires_grad_(), grad_t, eps, t)),
             (torch.ops.dsm_fast.dual_score_loss_backward.default,
              (grad_y, grad_t, eps, t, torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64), sums))]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_meta_tensors_flow_through_every_op():
    h, k, mean, var, g, hh, kk = norm_act_inputs("meta")
    assert na.norm_act(h, k[0], k).shape == h.shape
    grad_h, grad_m = na.norm_act_adjoint(h, k[0], k, g)
    assert grad_h.shape == h.shape and grad_m.shape == k.shape
    outs = torch.ops.dsm_fast.norm_act_adjoint_backward(h, k, mean, var, g, hh, kk)
    assert [o.shape for o in outs] == [h.shape, k.shape, g.shape] and all(o.is_meta for o in outs)
    space, time = loss_op.dual_score_loss(*loss_inputs("meta"))
    assert space.shape == time.shape == (2,) and space.is_meta


def test_compile_traces_the_ops_without_graph_breaks(seed):
    """fullgraph=True fails on any graph break; aot_eager also derives the backward through register_autograd."""
    h, k, _, _, g, _, _ = norm_act_inputs()
    h.requires_grad_()

    def fn(h, k, g):
        z = na.norm_act(h, k[0], k)
        grad_h, grad_m = na.norm_act_adjoint(z, k[0], k, g)
        space, time = loss_op.dual_score_loss(grad_h[:, :3], grad_m.sum(dim=1), g[:, :3], k[:, 0].abs() + 0.1)
        return (space + time).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (expected,) = torch.autograd.grad(fn(h, k, g), h)
    (actual,) = torch.autograd.grad(compiled(h, k, g), h)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, launcher, make_args", [
    ("dsm_fast.norm_act", na.norm_act_forward_launch, lambda: norm_act_inputs()[:2]),
    ("dsm_fast.norm_act_statistics", na.norm_act_statistics_launch, lambda: norm_act_inputs()[:1]),
    ("dsm_fast.norm_act_adjoint", na.norm_act_adjoint_launch, lambda: norm_act_inputs()[:5]),
    ("dsm_fast.norm_act_backward", na.norm_act_adjoint_launch, lambda: norm_act_inputs()[:6]),
    ("dsm_fast.norm_act_adjoint_backward", na.norm_act_adjoint_backward_launch, norm_act_inputs),
    ("dsm_fast.dual_score_loss", loss_op._dual_score_loss_op._init_fn, loss_inputs),
    ("dsm_fast.dual_score_loss_backward", loss_op._dual_score_loss_backward_op._init_fn,
     lambda: (*loss_inputs(), torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64),
              torch.rand(2, 3, dtype=torch.float64))),
], ids=lambda v: v if isinstance(v, str) else "")
def test_kernel_counts_used_by_the_cost_report(name, launcher, make_args, monkeypatch):
    """Triton launches (counted at the interpreter) plus the torch ops beside them equal the op's LAUNCHES entry."""
    launches = {**na.LAUNCHES, **loss_op.LAUNCHES}
    triton_calls = []
    real_run = interpreter.InterpretedFunction.run
    monkeypatch.setattr(interpreter.InterpretedFunction, "run",
                        lambda self, *a, **k: triton_calls.append(1) or real_run(self, *a, **k))
    args = make_args()
    with CostMode({}) as mode:
        launcher(*args)
    interpreter_copies = ("aten.new_empty", "aten.set_", "aten.copy_")  # the interpreter moving data, not kernels
    torch_ops = [op for op in mode.ops if op.name not in interpreter_copies]
    assert len(triton_calls) + len(torch_ops) == launches[name][0], [op.name for op in torch_ops]

