"""kernels/norm_act.py against its plain-PyTorch reference (kernels/norm_act_ref.py): outputs, first- and
second-order gradients; and the reference's explicit adjoint against autograd of its forward.

Runs under TRITON_INTERPRET=1 on the CPU (tests/conftest.py), so sizes are small but awkward (odd, non powers of
two, rows longer than one block). Every kernel output is allocated NaN-filled, so an element a kernel fails to
write cannot pass.
"""
import pytest
import torch
from dsm_fast.kernels import norm_act as op

from dsm_fast.tools.testing import TOLERANCES, assert_rel_close, relative_error

SHAPES = [(2, 3, 5, 7), (3, 5, 9, 6), (1, 2, 37, 29)]  # the last: rows of 1,073 > one 1,024 block
DTYPES = [torch.float64, torch.float32]


pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # see conftest.py


def draw_norm_act_inputs(shape, dtype, requires_grad=False):
    """h with a per-channel offset and spread, gain around 1, modulation around 0, an incoming gradient."""
    b, c = shape[:2]
    h = (torch.randn(shape, dtype=torch.float64) * torch.rand(1, c, 1, 1, dtype=torch.float64) * 3
         + torch.randn(1, c, 1, 1, dtype=torch.float64)).to(dtype)
    gain = (1 + 0.3 * torch.randn(c, dtype=torch.float64)).to(dtype)
    modulation = (0.3 * torch.randn(b, c, dtype=torch.float64)).to(dtype)
    grad_out = torch.randn(shape, dtype=torch.float64).to(dtype)
    return [x.requires_grad_(requires_grad) for x in (h, gain, modulation, grad_out)]


def vjp_by_autograd(h, gain, modulation, grad_out):
    """(h̄, m̄) by autograd of the forward reference, differentiable again: the yardstick of its explicit adjoint."""
    with torch.enable_grad():
        h_, m_ = (x if x.requires_grad else x.detach().requires_grad_() for x in (h, modulation))
        return torch.autograd.grad(op.norm_act_ref(h_, gain, m_), (h_, m_), grad_out, create_graph=True)


def test_reference_adjoint_is_the_vjp_of_the_reference(seed):
    """docs/method.md §4.4's derivation: the explicit (h̄, m̄) and their derivatives in (h, g, m, ḡ) equal autograd's
    of the forward formula, float64."""
    inputs = draw_norm_act_inputs(SHAPES[1], torch.float64, requires_grad=True)
    explicit, by_autograd = op.norm_act_adjoint_ref(*inputs), vjp_by_autograd(*inputs)
    assert_rel_close(list(explicit), list(by_autograd), 1e-12, "adjoint (h̄, m̄)", seed)
    w_h, w_m = torch.randn_like(inputs[0]), torch.randn_like(inputs[2])
    assert_rel_close(list(torch.autograd.grad(explicit, inputs, (w_h, w_m))),
                     list(torch.autograd.grad(by_autograd, inputs, (w_h, w_m))), 1e-12, "second order", seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_adjoint(shape, dtype, seed):
    h, gain, modulation, grad_out = draw_norm_act_inputs(shape, dtype)
    tol = TOLERANCES[dtype]
    assert_rel_close(op.norm_act(h, gain, modulation), op.norm_act_ref(h, gain, modulation), tol, "forward", seed)
    assert_rel_close(list(op.norm_act_adjoint(h, gain, modulation, grad_out)),
                     list(op.norm_act_adjoint_ref(h, gain, modulation, grad_out)), tol, "adjoint (h̄, m̄)", seed)


@pytest.mark.parametrize("spread", [1e-22, 1e-3], ids=["V<<eps, denormal V", "V~eps"])
def test_float32_where_the_variance_is_tiny(spread, seed):
    """V ≪ eps (deep layers at initialization: V ~ 1e-44 in the release, a float32 denormal): the Triton kernels and
    the plain-PyTorch reference (the model's explicit adjoint), in float32, against float64 autograd of the same
    inputs."""
    h, gain, modulation, grad_out = draw_norm_act_inputs(SHAPES[1], torch.float64)
    inputs = [x.float() for x in (h * spread, gain, modulation, grad_out)]
    exact = [op.norm_act_ref(*(x.double() for x in inputs[:3])), *vjp_by_autograd(*(x.double() for x in inputs))]
    routes = {"triton": [op.norm_act(*inputs[:3]), *op.norm_act_adjoint(*inputs)],
              "reference": [op.norm_act_ref(*inputs[:3]), *op.norm_act_adjoint_ref(*inputs)]}
    for name, actual in routes.items():
        assert_rel_close([x.double() for x in actual], [x.detach() for x in exact], TOLERANCES[torch.float32], name,
                         seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_first_and_second_order_gradients(shape, dtype, seed):
    """d/d(h, g, m) of ⟨w, z⟩ (first order: the forward's backward is the adjoint kernel), and d/d(h, g, m, ḡ) of
    ⟨w_h, h̄⟩ + ⟨w_m, m̄⟩ (the adjoint's backward: second derivatives of the forward), against autograd of the ref."""
    inputs = draw_norm_act_inputs(shape, dtype, requires_grad=True)
    h, gain, modulation, _ = inputs
    tol = TOLERANCES[dtype]
    w = torch.randn_like(h)
    first = torch.autograd.grad(op.norm_act(h, gain, modulation), (h, gain, modulation), w)
    expected = torch.autograd.grad(op.norm_act_ref(h, gain, modulation), (h, gain, modulation), w)
    assert_rel_close(list(first), list(expected), tol, "first-order gradients", seed)
    w_h, w_m = torch.randn_like(h), torch.randn_like(modulation)
    second = torch.autograd.grad(op.norm_act_adjoint(*inputs), inputs, (w_h, w_m))
    expected = torch.autograd.grad(op.norm_act_adjoint_ref(*inputs), inputs, (w_h, w_m))
    assert_rel_close(list(second), list(expected), tol, "second-order gradients", seed)


def test_double_backward_through_the_forward_and_third_order_refusal(seed):
    """create_graph through the forward Function reaches the adjoint's backward; one more order raises."""
    h, gain, modulation, _ = draw_norm_act_inputs((2, 3, 4, 5), torch.float64, requires_grad=True)
    w = torch.randn_like(h)

    def hessian_vector(fn):
        (grad_h,) = torch.autograd.grad(fn(h, gain, modulation), h, w, create_graph=True)
        return torch.autograd.grad(grad_h.square().sum(), (h, gain, modulation), create_graph=fn is op.norm_act_ref)

    assert_rel_close(list(hessian_vector(op.norm_act)), list(hessian_vector(op.norm_act_ref)), 1e-10,
                     "double backward", seed)
    (grad_h,) = torch.autograd.grad(op.norm_act(h, gain, modulation), h, w, create_graph=True)
    (grad2,) = torch.autograd.grad(grad_h.square().sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="no third derivative"):
        grad2.sum().backward()


def test_gradcheck_float64(seed):
    """Second order too: the forward's backward runs the adjoint on the forward's saved statistics, whose backward
    must still differentiate h through them."""
    inputs = draw_norm_act_inputs((2, 3, 3, 2), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op.norm_act, inputs[:3], fast_mode=True)
    assert torch.autograd.gradgradcheck(op.norm_act, inputs[:3], fast_mode=True)
    assert torch.autograd.gradcheck(op.norm_act_adjoint, inputs, fast_mode=True)


def test_bfloat16_storage_no_worse_than_the_reference(seed):
    """bf16 in and out, float32 statistics: error to the float64 result at most twice the bf16 reference's."""
    h, gain, modulation, grad_out = draw_norm_act_inputs(SHAPES[2], torch.float64)
    exact = [op.norm_act_ref(h, gain, modulation), *op.norm_act_adjoint_ref(h, gain, modulation, grad_out)]
    low = (h.bfloat16(), gain.float(), modulation.float())
    kernel = [op.norm_act(*low), *op.norm_act_adjoint(*low, grad_out.bfloat16())]
    reference = [op.norm_act_ref(*low), *op.norm_act_adjoint_ref(*low, grad_out.bfloat16())]
    assert kernel[0].dtype == torch.bfloat16 and kernel[1].dtype == torch.bfloat16
    for name, k, r, e in zip(("z", "h̄", "m̄"), kernel, reference, exact):
        assert relative_error(k, e) <= 2 * relative_error(r, e) + 1e-6, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_pass_statistics_survive_a_large_offset(dtype, seed):
    """μ, v in one pass over rows of three blocks (1,024 + 1,024 + 50 positions) whose mean is 1,000 times their
    spread: merging exact per-block moments (Chan, Golub & LeVeque) keeps v to the dtype's rounding, where
    E h² − μ² in float32 would lose every digit of it."""
    h = 1e3 + torch.randn(2, 3, 2 * op.MAX_BLOCK + 50, 1, dtype=torch.float64)
    h[:, :, -1] += 30.0  # an outlier alone in the last block
    h = h.to(dtype)
    mean, var = op.norm_act_statistics_launch(h)
    rel = 1e-10 if dtype == torch.float64 else TOLERANCES[dtype]
    assert_rel_close(mean.double(), h.double().mean(dim=(2, 3)), rel, "mean", seed)
    assert_rel_close(var.double(), h.double().var(dim=(2, 3), unbiased=False), rel, "variance", seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_handing_h_on_adds_its_two_gradients_in_the_backward(dtype, seed):
    """NormActHandingOn: h's gradient through z and through the handed-on h (into the adjoint, as in the fused
    route), summed by dsm_fast::norm_act_backward, equals autograd's of the reference."""
    h, gain, modulation, grad_out = draw_norm_act_inputs(SHAPES[2], dtype, requires_grad=True)
    w = torch.randn_like(h)

    def by_kernels(h, k):
        z, mean, var, h_on = op.NormActHandingOn.apply(h, k)
        return z, *op.norm_act_adjoint_op(h_on, k, mean, var, grad_out)

    def by_reference(h, k):
        return op.scaled_norm_act_ref(h, k), *op.scaled_norm_act_adjoint_ref(h, k, grad_out)

    inputs = [h, gain, modulation, grad_out]
    gradients = []
    for step in (by_kernels, by_reference):
        z, grad_h, grad_k = step(h, op.modulated_gain(h, gain, modulation))
        gradients.append(torch.autograd.grad((z * w).sum() + grad_h.square().sum() + grad_k.sum(), inputs))
    rel = 1e-10 if dtype == torch.float64 else TOLERANCES[dtype]
    assert_rel_close(list(gradients[0]), list(gradients[1]), rel, "gradients", seed)


def test_a_channel_slice_of_the_incoming_gradient_is_read_in_place(seed):
    """ḡ a channel slice of a wider tensor (the explicit adjoint's skip split): the adjoint and its backward read it
    without a copy and give exactly what they give on a contiguous ḡ."""
    h, gain, modulation, _ = draw_norm_act_inputs(SHAPES[1], torch.float64)
    b, c, height, width = h.shape
    g = torch.randn(b, c + 3, height, width, dtype=torch.float64)[:, 1:c + 1]
    assert op._channel_rows(g)[0] is g
    k = op.modulated_gain(h, gain, modulation)
    mean, var = op.norm_act_statistics_launch(h)
    hh, kk = torch.randn_like(h), torch.randn_like(k)
    for launcher, extra in ((op.norm_act_adjoint_launch, ()), (op.norm_act_adjoint_backward_launch, (hh, kk))):
        sliced, copied = launcher(h, k, mean, var, g, *extra), launcher(h, k, mean, var, g.contiguous(), *extra)
        assert all(torch.equal(x, y) for x, y in zip(sliced, copied)), (launcher.__name__, seed)
