"""The dual-score-matching terms as Triton kernels: both residuals, the per-image reductions and their gradients.

Per image, with d dimensions, g = ∇_y U, g_t = ∂_t U, ε the noise and t the noise variance (method.md §2):

    res = √t g − ε,   space = Σ res² / d
    ρ = t g_t / d − ½ + Σ ε² / (2d),   time = ρ²

One pass over the image reduces S₁ = Σ res², S₂ = Σ ε², S₃ = Σ res·g; the backward is one more pass that writes

    ḡ = σ̄ 2√t res / d,   ε̄ = −σ̄ 2 res / d + τ̄ 2ρ ε / d,   ḡ_t = τ̄ 2ρ t / d,   t̄ = σ̄ S₃ / (d √t) + τ̄ 2ρ g_t / d

for incoming σ̄ (space) and τ̄ (time). Sums are float32 (float64 for float64 inputs). Custom operators
(torch.library): dsm_fast::dual_score_loss, whose backward is dsm_fast::dual_score_loss_backward, whose backward is
the autograd of the plain-PyTorch backward formulas (the training step never needs it); a third derivative raises.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 2048


# --- reference (plain PyTorch, the same math) -----------------------------------------------------------------
def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(dtype)


def dual_score_loss_ref(grad_y: torch.Tensor, grad_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(space, time) per image: ‖√t ∇_y U − ε‖²/d and (t ∂_t U/d − ½ + ‖ε‖²/(2d))²; shapes (B, …), (B,), (B, …), (B,)."""
    g, e = _flat(grad_y, eps.dtype), _flat(eps, eps.dtype)
    d = e.shape[1]
    space = (torch.sqrt(t)[:, None] * g - e).square().sum(dim=1) / d
    rho = t * grad_t.to(eps.dtype) / d - 0.5 + e.square().sum(dim=1) / (2 * d)
    return space, rho.square()


def dual_score_loss_backward_ref(grad_y, grad_t, eps, t, space_bar, time_bar):
    """(ḡ, ḡ_t, ε̄, t̄) of :func:`dual_score_loss_ref` for incoming (σ̄, τ̄), by the explicit formulas."""
    g, e = _flat(grad_y, eps.dtype), _flat(eps, eps.dtype)
    d = e.shape[1]
    sqrt_t = torch.sqrt(t)[:, None]
    res = sqrt_t * g - e
    rho = t * grad_t.to(eps.dtype) / d - 0.5 + e.square().sum(dim=1) / (2 * d)
    grad_g = (space_bar[:, None] * 2 * sqrt_t / d) * res
    grad_e = (-2 * space_bar[:, None] / d) * res + (time_bar * 2 * rho / d)[:, None] * e
    grad_gt = time_bar * 2 * rho * t / d
    grad_tt = space_bar * (res * g).sum(dim=1) / (d * sqrt_t[:, 0]) + time_bar * 2 * rho * grad_t / d
    return (grad_g.reshape(grad_y.shape).to(grad_y.dtype), grad_gt.to(grad_t.dtype),
            grad_e.reshape(eps.shape), grad_tt.to(t.dtype))


# --- Triton kernels ---------------------------------------------------------------------------------------------
@triton.jit
def _dual_loss_sums_kernel(g_ptr, e_ptr, sqrt_t_ptr, sums_ptr, d, BLOCK: tl.constexpr, N_BLOCKS: tl.constexpr):
    """One program per image. g, ε: (B, d); √t: (B,) sum dtype; sums: (B, 3) ← (Σ res², Σ ε², Σ res·g);
    N_BLOCKS = ⌈d/BLOCK⌉ (a constexpr: a plain int in the interpreter of every Triton version)."""
    b = tl.program_id(0)
    acc_ty = sums_ptr.dtype.element_ty
    sqrt_t = tl.load(sqrt_t_ptr + b)
    s1 = tl.zeros([BLOCK], dtype=acc_ty)
    s2 = tl.zeros([BLOCK], dtype=acc_ty)
    s3 = tl.zeros([BLOCK], dtype=acc_ty)
    for i in range(N_BLOCKS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < d
        g = tl.load(g_ptr + b.to(tl.int64) * d + offs, mask=mask, other=0.0).to(acc_ty)
        e = tl.load(e_ptr + b.to(tl.int64) * d + offs, mask=mask, other=0.0).to(acc_ty)
        res = sqrt_t * g - e
        s1 += res * res
        s2 += e * e
        s3 += res * g
    tl.store(sums_ptr + 3 * b, tl.sum(s1, axis=0))
    tl.store(sums_ptr + 3 * b + 1, tl.sum(s2, axis=0))
    tl.store(sums_ptr + 3 * b + 2, tl.sum(s3, axis=0))


@triton.jit
def _dual_loss_bwd_kernel(g_ptr, e_ptr, coef_ptr, grad_g_ptr, grad_e_ptr, d, BLOCK: tl.constexpr):
    """Grid (B, ⌈d/BLOCK⌉). g, ε, ḡ, ε̄: (B, d); coef: (B, 4) ← (√t, 2σ̄√t/d, −2σ̄/d, 2τ̄ρ/d).
    ḡ = coef₁ res, ε̄ = coef₂ res + coef₃ ε with res = √t g − ε."""
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    acc_ty = coef_ptr.dtype.element_ty
    g = tl.load(g_ptr + b.to(tl.int64) * d + offs, mask=mask, other=0.0).to(acc_ty)
    e = tl.load(e_ptr + b.to(tl.int64) * d + offs, mask=mask, other=0.0).to(acc_ty)
    res = tl.load(coef_ptr + 4 * b) * g - e
    grad_g = tl.load(coef_ptr + 4 * b + 1) * res
    grad_e = tl.load(coef_ptr + 4 * b + 2) * res + tl.load(coef_ptr + 4 * b + 3) * e
    tl.store(grad_g_ptr + b.to(tl.int64) * d + offs, grad_g.to(grad_g_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_e_ptr + b.to(tl.int64) * d + offs, grad_e.to(grad_e_ptr.dtype.element_ty), mask=mask)


# --- launchers --------------------------------------------------------------------------------------------------
def _sum_dtype(eps: torch.Tensor) -> torch.dtype:
    return torch.float64 if eps.dtype == torch.float64 else torch.float32


def dual_loss_sums_launch(grad_y: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, 3) sums (Σ res², Σ ε², Σ res·g) of contiguous grad_y, eps (B, …) in one pass."""
    b, d = eps.shape[0], eps[0].numel()
    sums = torch.empty(b, 3, device=eps.device, dtype=_sum_dtype(eps))
    block = min(MAX_BLOCK, triton.next_power_of_2(d))
    _dual_loss_sums_kernel[(b,)](grad_y, eps, torch.sqrt(t.to(sums.dtype)), sums, d, BLOCK=block,
                                 N_BLOCKS=triton.cdiv(d, block))
    return sums


def dual_loss_backward_launch(grad_y, grad_t, eps, t, space_bar, time_bar, sums):
    """(ḡ, ḡ_t, ε̄, t̄) for incoming (σ̄, τ̄), with the forward's sums; the image-sized ones in one pass."""
    b, d = eps.shape[0], eps[0].numel()
    dtype = sums.dtype
    t, grad_t32 = t.to(dtype), grad_t.to(dtype)
    space_bar, time_bar = space_bar.to(dtype), time_bar.to(dtype)
    sqrt_t = torch.sqrt(t)
    rho = t * grad_t32 / d - 0.5 + sums[:, 1] / (2 * d)
    coef = torch.stack([sqrt_t, 2 * space_bar * sqrt_t / d, -2 * space_bar / d, 2 * time_bar * rho / d], dim=1)
    grad_g, grad_e = torch.empty_like(grad_y), torch.empty_like(eps)
    block = min(MAX_BLOCK, triton.next_power_of_2(d))
    _dual_loss_bwd_kernel[(b, triton.cdiv(d, block))](grad_y, eps, coef.contiguous(), grad_g, grad_e, d, BLOCK=block)
    grad_gt = time_bar * 2 * rho * t / d
    grad_tt = space_bar * sums[:, 2] / (d * sqrt_t) + time_bar * 2 * rho * grad_t32 / d
    return grad_g, grad_gt.to(grad_t.dtype), grad_e, grad_tt


# --- custom operators (torch.library): fake implementations for meta/fake tensors, autograd by the next op -----
@torch.library.custom_op("dsm_fast::dual_score_loss", mutates_args=())
def _dual_score_loss_op(grad_y: torch.Tensor, grad_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(space, time, sums) per image; ``sums`` (B, 3) is kept for the backward (no gradient of its own)."""
    sums = dual_loss_sums_launch(grad_y, eps, t)
    d = eps[0].numel()
    rho = t.to(sums.dtype) * grad_t.to(sums.dtype) / d - 0.5 + sums[:, 1] / (2 * d)
    return (sums[:, 0] / d).to(eps.dtype), rho.square().to(eps.dtype), sums


@torch.library.custom_op("dsm_fast::dual_score_loss_backward", mutates_args=())
def _dual_score_loss_backward_op(grad_y: torch.Tensor, grad_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                                 space_bar: torch.Tensor, time_bar: torch.Tensor, sums: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ḡ, ḡ_t, ε̄, t̄) by the backward kernel."""
    grad_g, grad_gt, grad_e, grad_tt = dual_loss_backward_launch(grad_y, grad_t, eps, t, space_bar, time_bar, sums)
    return grad_g, grad_gt, grad_e, grad_tt.to(t.dtype)


@_dual_score_loss_op.register_fake
def _(grad_y, grad_t, eps, t):
    b = eps.shape[0]
    return eps.new_empty(b), eps.new_empty(b), eps.new_empty(b, 3, dtype=_sum_dtype(eps))


@_dual_score_loss_backward_op.register_fake
def _(grad_y, grad_t, eps, t, space_bar, time_bar, sums):
    return torch.empty_like(grad_y), torch.empty_like(grad_t), torch.empty_like(eps), torch.empty_like(t)


def _save_forward(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, output[2])
    ctx.mark_non_differentiable(output[2])


def _loss_backward(ctx, space_bar, time_bar, _sums_bar):
    grad_y, grad_t, eps, t, sums = ctx.saved_tensors
    space_bar = torch.zeros_like(t, dtype=eps.dtype) if space_bar is None else space_bar
    time_bar = torch.zeros_like(t, dtype=eps.dtype) if time_bar is None else time_bar
    return _dual_score_loss_backward_op(grad_y, grad_t, eps, t, space_bar, time_bar, sums)


class _BackwardOfBackward(torch.autograd.Function):
    """The backward's vector-Jacobian product by autograd of :func:`dual_score_loss_backward_ref` on the true inputs
    (the training step never needs it); differentiating it again raises."""

    @staticmethod
    def forward(ctx, grad_y, grad_t, eps, t, space_bar, time_bar, *grad_grads):
        with torch.enable_grad():  # partial derivatives: every input detached (t is an ancestor of ∇_y U)
            inputs = [x.detach().requires_grad_() for x in (grad_y, grad_t, eps, t, space_bar, time_bar)]
            outputs = dual_score_loss_backward_ref(*inputs)
            used = [(o, g) for o, g in zip(outputs, grad_grads) if g is not None]
            grads = torch.autograd.grad([o for o, _ in used], inputs, [g for _, g in used], allow_unused=True)
        return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("dsm_fast::dual_score_loss has no third derivative: its backward is differentiable once")


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _loss_backward_backward(ctx, *grad_grads):
    return (*_BackwardOfBackward.apply(*ctx.saved_tensors[:6], *grad_grads), None)


torch.library.register_autograd("dsm_fast::dual_score_loss", _loss_backward, setup_context=_save_forward)
torch.library.register_autograd("dsm_fast::dual_score_loss_backward", _loss_backward_backward,
                                setup_context=_save_inputs)
# Per op and call: (kernels launched: Triton + the (B,)-sized torch ops beside it; full passes over a ∇_y U-sized
# tensor), what dsm-fast profile --cost counts for an op it sees only from outside (tests/test_custom_ops.py recounts
# the kernels). Forward: read ∇_y U and ε; backward: read both, write ḡ and ε̄.
LAUNCHES = {"dsm_fast.dual_score_loss": (1 + 8, 2), "dsm_fast.dual_score_loss_backward": (1 + 27, 4)}


# --- public function --------------------------------------------------------------------------------------------
def dual_score_loss(grad_y: torch.Tensor, grad_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(space, time) per image (module doc) by the Triton kernels; twice differentiable in every input."""
    space, time, _ = _dual_score_loss_op(grad_y.contiguous(), grad_t, eps.contiguous(), t)
    return space, time
