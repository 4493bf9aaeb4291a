"""kernels/mp_block.py (the EDM2 block's elementwise chains) against its plain-PyTorch references
(kernels/mp_block_ref.py): outputs, gradients, and the gradients of the gradients wherever the fused route takes
them (a forward op's backward is its adjoint op, whose backward is the adjoint's backward op).

Runs under TRITON_INTERPRET=1 on the CPU (tests/conftest.py): small, awkward shapes (odd channel counts, positions
not a multiple of a block, a modulation that is a column slice of a wider array). Outputs are allocated NaN-filled.
"""
import pytest
import torch
from dsm_fast.kernels import mp_block as op
from dsm_fast.kernels import mp_block_ref as ref

from dsm_fast.tools.testing import TOLERANCES, assert_rel_close

pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # see conftest.py

SHAPE = (2, 5, 3, 7)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def assert_like_reference(kernel_fn, ref_fn, inputs, seed, dtype=torch.float64, second_order=True):
    """kernel_fn(*inputs) against ref_fn on float64 copies: outputs, the VJP with random cotangents (taken with
    create_graph), and, if ``second_order``, the VJP of that VJP."""
    tol = TOLERANCES[dtype] if dtype != torch.float64 else 1e-12
    ours, theirs = leaves(*(x.to(dtype) for x in inputs)), leaves(*inputs)
    out, expected = kernel_fn(*ours), ref_fn(*theirs)
    out, expected = (out if isinstance(out, tuple) else (out,)), (expected if isinstance(expected, tuple) else (expected,))
    assert_rel_close([o.double() for o in out], list(expected), tol, "outputs", seed)
    cotangents = [torch.randn_like(e) for e in expected]
    grads = torch.autograd.grad(out, ours, [c.to(dtype) for c in cotangents], create_graph=second_order)
    expected_grads = torch.autograd.grad(expected, theirs, cotangents, create_graph=second_order)
    assert_rel_close([g.double() for g in grads], list(expected_grads), tol, "gradients", seed)
    if second_order:
        directions = [torch.randn_like(g) for g in expected_grads]
        second = torch.autograd.grad(grads, ours, [d.to(dtype) for d in directions], allow_unused=True)
        expected_second = torch.autograd.grad(expected_grads, theirs, directions, allow_unused=True)
        pairs = [(a, e) for a, e in zip(second, expected_second) if e is not None]
        assert_rel_close([a.double() for a, _ in pairs], [e for _, e in pairs], tol, "second derivatives", seed)


def modulation(b, c):
    """c (B, C) as EDM2UNet.modulations hands it over: a column slice of a wider (B, ΣC) array."""
    return (1 + 0.5 * torch.randn(b, c + 4, dtype=torch.float64)).split([c, 4], dim=1)[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pixel_norm_silu_and_its_adjoint(seed, dtype):
    x = 2 * torch.randn(SHAPE, dtype=torch.float64)
    assert_like_reference(lambda x: op.pixel_norm_silu(x)[:2], lambda x: ref.pixel_norm_silu_ref(x)[:2], [x], seed,
                          dtype)
    p, v = torch.randn_like(x), torch.randn_like(x)

    # the op's r is a cache of x (its derivative in x is the whole one); the reference differentiates through r
    assert_like_reference(lambda x, p, v: op.pixel_norm_silu_adjoint(x, op.pixel_norm_silu(x.detach())[2], p, 0.7, v),
                          lambda x, p, v: ref.pixel_norm_silu_adjoint_ref(x, ref.pixel_norm(x)[1], p, 0.7, v),
                          [x, p, v], seed, dtype, second_order=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mod_silu_and_its_adjoint(seed, dtype):
    h, u, p = 2 * torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64), torch.randn(
        SHAPE, dtype=torch.float64)
    c = modulation(SHAPE[0], SHAPE[1])
    assert_like_reference(op.mod_silu, ref.mod_silu_ref, [h, c], seed, dtype)
    assert_like_reference(lambda h: op.mod_silu(h, None), lambda h: ref.mod_silu_ref(h, None), [h], seed, dtype)
    assert_like_reference(lambda h, c, u: op.mod_silu_adjoint(h, c, u, None, 0.0),
                          lambda h, c, u: ref.mod_silu_adjoint_ref(h, c, u, None, 0.0), [h, c, u], seed, dtype,
                          second_order=False)
    assert_like_reference(lambda h, u, p: op.mod_silu_adjoint(h, None, u, p, 0.6)[0],
                          lambda h, u, p: ref.mod_silu_adjoint_ref(h, None, u, p, 0.6)[0], [h, u, p], seed, dtype,
                          second_order=False)


def test_mp_sum_clip_and_masked_sums(seed):
    x, y = 300 * torch.randn(SHAPE, dtype=torch.float64), 300 * torch.randn(SHAPE, dtype=torch.float64)
    out, mask = op.mp_sum_clip(x, y, 0.8, 0.6)
    expected, expected_mask = ref.mp_sum_clip_ref(x, y, 0.8, 0.6)
    assert torch.equal(mask.bool(), expected_mask) and 0 < expected_mask.sum() < expected_mask.numel()
    assert_rel_close(out, expected, 1e-15, "clipped sum", seed)
    assert_like_reference(lambda x, y: op.mp_sum_clip(x, y, 0.8, 0.6)[0],
                          lambda x, y: ref.mp_sum_clip_ref(x, y, 0.8, 0.6)[0], [x, y], seed, second_order=False)
    # linear ops: the backward of the backward is the op again (a cotangent that requires grad)
    for y_in in (y, None):
        assert_like_reference(lambda x, y=None: op.masked_sum(x, y, mask, 0.8, 0.6),
                              lambda x, y=None: ref.masked_sum_ref(x, y, expected_mask, 0.8, 0.6),
                              [x] if y_in is None else [x, y_in], seed, second_order=False)
    g = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    xx, yy = leaves(x, y)
    dx, dy = torch.autograd.grad(op.masked_sum(xx, yy, mask, 0.8, 0.6), (xx, yy), g, create_graph=True)
    dg = torch.autograd.grad((dx * x).sum() + (dy * y).sum(), g)[0]
    assert_rel_close(dg, (0.8 * x + 0.6 * y) * expected_mask, 1e-15, "masked_split's backward", seed)


def test_weight_norms_of_a_network(seed):
    """Several weights (conv, linear, 1×1; rows longer than one 1,024 block), gains on some, scales on others."""
    weights = [torch.randn(6, 5, 3, 3, dtype=torch.float64), torch.randn(4, 1100, dtype=torch.float64),
               torch.randn(3, 7, 1, 1, dtype=torch.float64)]
    gains = [torch.randn(1, dtype=torch.float64), torch.randn(1, dtype=torch.float64)]

    def call(impl):
        return lambda w0, w1, w2, g0, g1: tuple(impl([w0, w1, w2], [g0, None, g1], [0.7, 1.0, 0.3]))

    assert_like_reference(call(op.weight_norms), call(ref.weight_norms_ref), [*weights, *gains], seed,
                          second_order=False)


def test_backward_ops_refuse_a_third_derivative():
    x, p, v = leaves(*(torch.randn(SHAPE, dtype=torch.float64) for _ in range(3)))
    out = op.pixel_norm_silu_adjoint(x, op.pixel_norm_silu(x.detach())[2], p, 1.0, v)
    grad = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)[0]
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(grad.sum(), x)


def test_meta_tensors_flow_through_every_op():
    x = torch.empty(SHAPE, device="meta")
    c = torch.empty(SHAPE[0], SHAPE[1], device="meta")
    _, s, r = op.pixel_norm_silu(x)
    assert r.shape == (SHAPE[0], 1, *SHAPE[2:]) and op.pixel_norm_silu_adjoint(x, r, None, 1.0, s).is_meta
    out, c_bar = op.mod_silu_adjoint(x, c, x, x, 0.5)
    assert out.shape == x.shape and c_bar.shape == c.shape and op.mod_silu(x, c).is_meta
    assert op.mp_sum_clip(x, x, 0.5, 0.5)[1].dtype == torch.uint8
    assert [w.shape for w in op.weight_norms([x, c], [None, None], [1.0, 1.0])] == [x.shape, c.shape]
