"""kernels/dual_score_loss.py against its plain-PyTorch reference and dsm_fast.losses: terms, first- and second-order
gradients in every input (∇_y U, ∂_t U, ε, t), on awkward sizes, with NaN-filled output buffers."""
import pytest
import torch
from dsm_fast.kernels import dual_score_loss as op

from dsm_fast.losses import space_term, time_term
from dsm_fast.tools.testing import TOLERANCES, assert_rel_close

SHAPES = [(2, 1, 5, 7), (3, 3, 9, 6), (2, 3, 29, 31)]  # the last: 2,697 dimensions > one 2,048 block
DTYPES = [torch.float64, torch.float32]


pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # see conftest.py


def draw_loss_inputs(shape, dtype, requires_grad=False):
    """(∇_y U, ∂_t U, ε, t) with t spanning 1e-9 … 1e3 and scores of the size the terms see there."""
    b, d = shape[0], shape[1] * shape[2] * shape[3]
    t = torch.logspace(-9, 3, b, dtype=torch.float64)
    eps = torch.randn(shape, dtype=torch.float64)
    grad_y = eps / t.sqrt()[:, None, None, None] + torch.randn(shape, dtype=torch.float64)
    grad_t = d / (2 * t) * (1 + 0.1 * torch.randn(b, dtype=torch.float64))
    return [x.to(dtype).requires_grad_(requires_grad) for x in (grad_y, grad_t, eps, t)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_terms_equal_the_reference_and_the_losses(shape, dtype, seed):
    grad_y, grad_t, eps, t = draw_loss_inputs(shape, dtype)
    tol = TOLERANCES[dtype]
    space, time = op.dual_score_loss(grad_y, grad_t, eps, t)
    assert_rel_close([space, time], list(op.dual_score_loss_ref(grad_y, grad_t, eps, t)), tol, "terms", seed)
    assert_rel_close([space, time], [space_term(grad_y, eps, t), time_term(grad_t, eps, t)], tol, "losses.py", seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_first_and_second_order_gradients(shape, dtype, seed):
    inputs = draw_loss_inputs(shape, dtype, requires_grad=True)
    tol = TOLERANCES[dtype]
    weights = (torch.rand(shape[0], dtype=dtype), torch.rand(shape[0], dtype=dtype))

    def gradients(fn):
        first = torch.autograd.grad(fn(*inputs), inputs, weights, create_graph=True)
        directions = [torch.ones_like(g) for g in first]
        second = torch.autograd.grad(first, inputs, directions, allow_unused=True)
        return list(first), [torch.zeros_like(x) if s is None else s for s, x in zip(second, inputs)]

    first, second = gradients(op.dual_score_loss)
    first_ref, second_ref = gradients(op.dual_score_loss_ref)
    for name, a, e in zip(("∇_y U", "∂_t U", "ε", "t"), first, first_ref):
        assert_rel_close(a, e, tol, f"first-order gradient in {name}", seed)
    for name, a, e in zip(("∇_y U", "∂_t U", "ε", "t"), second, second_ref):
        if e.abs().max() > 0:
            assert_rel_close(a, e, tol, f"second-order gradient in {name}", seed)
        else:
            assert not a.abs().max() > 0, name


def test_explicit_backward_formulas_equal_autograd(seed):
    inputs = draw_loss_inputs(SHAPES[1], torch.float64, requires_grad=True)
    bars = (torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64))
    expected = torch.autograd.grad(op.dual_score_loss_ref(*inputs), inputs, bars)
    assert_rel_close(list(op.dual_score_loss_backward_ref(*inputs, *bars)), list(expected), 1e-12,
                     "explicit backward", seed)


def test_gradcheck_and_third_order_refusal(seed):
    shape = (2, 1, 3, 2)  # moderate t: finite differences of step 1e-6 need t ≫ 1e-6
    inputs = [torch.randn(shape, dtype=torch.float64), 3 * torch.randn(2, dtype=torch.float64),
              torch.randn(shape, dtype=torch.float64), torch.tensor([0.5, 3.0], dtype=torch.float64)]
    inputs = [x.requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(op.dual_score_loss, inputs, fast_mode=True)
    (grad_y_bar,) = torch.autograd.grad(op.dual_score_loss(*inputs)[0].sum(), inputs[0], create_graph=True)
    (second,) = torch.autograd.grad(grad_y_bar.square().sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="no third derivative"):
        second.sum().backward()


def test_strided_and_expanded_per_image_inputs(seed):
    """t and ∂_t U given as strided views, and incoming gradients that are expanded scalars (what ``.sum()``'s
    backward hands over, stride 0): the kernels read them by stride, as the reference does."""
    grad_y, grad_t, eps, t = draw_loss_inputs(SHAPES[1], torch.float64)
    t_strided = torch.stack([t, torch.full_like(t, float("nan"))], dim=1)[:, 0].requires_grad_()
    grad_t_strided = torch.stack([grad_t, torch.full_like(grad_t, float("nan"))], dim=1)[:, 0].requires_grad_()
    inputs = [grad_y.requires_grad_(), grad_t_strided, eps.requires_grad_(), t_strided]
    assert t_strided.stride(0) == 2

    def gradients(fn):
        space, time = fn(*inputs)
        return [space, time, *torch.autograd.grad(space.sum() + 3 * time.sum(), inputs)]

    assert_rel_close(gradients(op.dual_score_loss), gradients(op.dual_score_loss_ref), 1e-12, "strided", seed)
