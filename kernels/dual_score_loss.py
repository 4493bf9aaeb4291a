"""The dual-score-matching terms as Triton kernels: both residuals, the per-image reductions and their gradients.

Per image, with d dimensions, g = ∇_y U, g_t = ∂_t U, ε the noise and t the noise variance (docs/method.md §2.2, §4.6):

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

from .launch import launch

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
def _rho(t, grad_t, sum_e2, d):
    """ρ = t g_t / d − ½ + Σ ε² / (2d)."""
    return t * grad_t / d - 0.5 + sum_e2 / (2 * d)


@triton.jit
def _dual_loss_fwd_kernel(g_ptr, e_ptr, t_ptr, gt_ptr, space_ptr, time_ptr, sums_ptr, d, t_stride, gt_stride,
                          BLOCK: tl.constexpr, N_BLOCKS: tl.constexpr):
    """One program per image. g, ε: (B, d); t, g_t, space, time: (B,); sums: (B, 3) sum dtype ← (Σ res², Σ ε²,
    Σ res·g); space = Σ res² / d, time = ρ²; t and g_t read with their strides. N_BLOCKS = ⌈d/BLOCK⌉ (a constexpr:
    a plain int in the interpreter of every Triton version)."""
    b = tl.program_id(0)
    acc_ty = sums_ptr.dtype.element_ty
    t = tl.load(t_ptr + b * t_stride).to(acc_ty)
    sqrt_t = tl.sqrt(t)
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
    sum_res2, sum_e2 = tl.sum(s1, axis=0), tl.sum(s2, axis=0)
    tl.store(sums_ptr + 3 * b, sum_res2)
    tl.store(sums_ptr + 3 * b + 1, sum_e2)
    tl.store(sums_ptr + 3 * b + 2, tl.sum(s3, axis=0))
    rho = _rho(t, tl.load(gt_ptr + b * gt_stride).to(acc_ty), sum_e2, d)
    tl.store(space_ptr + b, (sum_res2 / d).to(space_ptr.dtype.element_ty))
    tl.store(time_ptr + b, (rho * rho).to(time_ptr.dtype.element_ty))


@triton.jit
def _dual_loss_bwd_kernel(g_ptr, e_ptr, t_ptr, gt_ptr, space_bar_ptr, time_bar_ptr, sums_ptr, grad_g_ptr, grad_e_ptr,
                          grad_gt_ptr, grad_tt_ptr, d, t_stride, gt_stride, space_bar_stride, time_bar_stride,
                          BLOCK: tl.constexpr):
    """Grid (B, ⌈d/BLOCK⌉). g, ε, ḡ, ε̄: (B, d); t, g_t, σ̄, τ̄, ḡ_t, t̄: (B,); sums: (B, 3) from the forward.
    ḡ = (2σ̄√t/d) res, ε̄ = (−2σ̄/d) res + (2τ̄ρ/d) ε with res = √t g − ε; the first block of each image also writes
    ḡ_t = 2τ̄ρt/d and t̄ = σ̄ Σ res·g / (d√t) + 2τ̄ρ g_t / d. The (B,) inputs are read with their strides."""
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    acc_ty = sums_ptr.dtype.element_ty
    t, grad_t = tl.load(t_ptr + b * t_stride).to(acc_ty), tl.load(gt_ptr + b * gt_stride).to(acc_ty)
    space_bar = tl.load(space_bar_ptr + b * space_bar_stride).to(acc_ty)
    time_bar = tl.load(time_bar_ptr + b * time_bar_stride).to(acc_ty)
    sqrt_t = tl.sqrt(t)
    rho2 = 2 * _rho(t, grad_t, tl.load(sums_ptr + 3 * b + 1), d)
    g = tl.load(g_ptr + b.to(tl.int64) * d + offs, mask=mask, other=0.0).to(acc_ty)
    e = tl.load(e_ptr + b.to(tl.int64) * d + offs, mask=mask, other=0.0).to(acc_ty)
    res = sqrt_t * g - e
    grad_g = (2 * space_bar * sqrt_t / d) * res
    grad_e = (-2 * space_bar / d) * res + (time_bar * rho2 / d) * e
    tl.store(grad_g_ptr + b.to(tl.int64) * d + offs, grad_g.to(grad_g_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_e_ptr + b.to(tl.int64) * d + offs, grad_e.to(grad_e_ptr.dtype.element_ty), mask=mask)
    if tl.program_id(1) == 0:
        tl.store(grad_gt_ptr + b, (time_bar * rho2 * t / d).to(grad_gt_ptr.dtype.element_ty))
        grad_tt = space_bar * tl.load(sums_ptr + 3 * b + 2) / (d * sqrt_t) + time_bar * rho2 * grad_t / d
        tl.store(grad_tt_ptr + b, grad_tt.to(grad_tt_ptr.dtype.element_ty))


# --- launchers --------------------------------------------------------------------------------------------------
def _sum_dtype(eps: torch.Tensor) -> torch.dtype:
    return torch.float64 if eps.dtype == torch.float64 else torch.float32


def _block(d: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(d))


def dual_loss_forward_launch(grad_y: torch.Tensor, grad_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(space, time, sums) for contiguous grad_y, eps (B, …) and grad_t, t (B,) of any stride: one launch."""
    b, d = eps.shape[0], eps[0].numel()
    sums = torch.empty(b, 3, device=eps.device, dtype=_sum_dtype(eps))
    space, time = eps.new_empty(b), eps.new_empty(b)
    launch(_dual_loss_fwd_kernel, (b,), grad_y, eps, t, grad_t, space, time, sums, d, t.stride(0), grad_t.stride(0),
           BLOCK=_block(d), N_BLOCKS=triton.cdiv(d, _block(d)))
    return space, time, sums


def dual_loss_backward_launch(grad_y, grad_t, eps, t, space_bar, time_bar, sums):
    """(ḡ, ḡ_t, ε̄, t̄) for incoming (σ̄, τ̄), with the forward's sums: one launch."""
    b, d = eps.shape[0], eps[0].numel()
    grad_g, grad_e = torch.empty_like(grad_y), torch.empty_like(eps)
    grad_gt, grad_tt = grad_t.new_empty(b), t.new_empty(b)
    launch(_dual_loss_bwd_kernel, (b, triton.cdiv(d, _block(d))), grad_y, eps, t, grad_t, space_bar, time_bar, sums,
           grad_g, grad_e, grad_gt, grad_tt, d, t.stride(0), grad_t.stride(0), space_bar.stride(0),
           time_bar.stride(0), BLOCK=_block(d))
    return grad_g, grad_gt, grad_e, grad_tt


# --- custom operators (torch.library): fake implementations for meta/fake tensors, autograd by the next op -----
@torch.library.custom_op("dsm_fast::dual_score_loss", mutates_args=())
def _dual_score_loss_op(grad_y: torch.Tensor, grad_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(space, time, sums) per image; ``sums`` (B, 3) is kept for the backward (no gradient of its own)."""
    return dual_loss_forward_launch(grad_y, grad_t, eps, t)


@torch.library.custom_op("dsm_fast::dual_score_loss_backward", mutates_args=())
def _dual_score_loss_backward_op(grad_y: torch.Tensor, grad_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                                 space_bar: torch.Tensor, time_bar: torch.Tensor, sums: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ḡ, ḡ_t, ε̄, t̄) by the backward kernel."""
    return dual_loss_backward_launch(grad_y, grad_t, eps, t, space_bar, time_bar, sums)


@_dual_score_loss_op.register_fake
def _(grad_y, grad_t, eps, t):
    b = eps.shape[0]
    return eps.new_empty(b), eps.new_empty(b), eps.new_empty(b, 3, dtype=_sum_dtype(eps))


@_dual_score_loss_backward_op.register_fake
def _(grad_y, grad_t, eps, t, space_bar, time_bar, sums):
    b = eps.shape[0]
    return torch.empty_like(grad_y), grad_t.new_empty(b), torch.empty_like(eps), t.new_empty(b)


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
# Per op and call: (kernels launched, all Triton; full passes over a ∇_y U-sized tensor), what dsm-fast profile
# --cost counts for an op it sees only from outside (tests/test_kernels_custom_ops.py recounts the kernels). Forward: read
# ∇_y U and ε; backward: read both, write ḡ and ε̄.
LAUNCHES = {"dsm_fast.dual_score_loss": (1, 2), "dsm_fast.dual_score_loss_backward": (1, 4)}


# --- public function --------------------------------------------------------------------------------------------
def dual_score_loss(grad_y: torch.Tensor, grad_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(space, time) per image (module doc) by the Triton kernels; twice differentiable in every input."""
    space, time, _ = _dual_score_loss_op(grad_y.contiguous(), grad_t, eps.contiguous(), t)
    return space, time
