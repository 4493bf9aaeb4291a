"""NormAct as Triton kernels: per-image, per-channel normalization × gain × (1 + modulation) → GELU.

For image b and channel c over the n = H·W positions (statistics in float32, float64 for float64 inputs):

    x̂_c = h_c − μ_c,  v_c = mean x̂_c²,  V = mean_c v_c,  w_c = 1 / (v_c + eps),  s_c = sqrt(V w_c + eps),
    k_c = g_c (1 + m_c),  z_c = GELU(a_c),  a_c = x̂_c s_c k_c          (the released code's normalization, eps = 1e-5)

The adjoint (vector-Jacobian product with an incoming ḡ, what the explicit-adjoint network needs; derived in
dsm_fast/model/adjoint.py's norm_act_adjoint) is

    ā = ḡ GELU'(a),  Q_c = Σ ā x̂_c,  k̄_c = s_c Q_c,  m̄_c = g_c k̄_c,  u_c = k_c Q_c / s_c
    h̄_c = s_c k_c (ā − mean ā) + (−V w_c² u_c + mean_c' w_c' u_c') / n · x̂_c

s_c ≥ sqrt(eps) and w_c ≤ 1/eps: nothing divides by zero where V ≪ eps (deep layers at initialization).

Autograd: the forward's backward is the adjoint Function (Triton); the adjoint's backward (the second derivatives
of the forward, which a dual-score loss needs for its parameter gradient) is the autograd of the plain-PyTorch
reference, recomputed, and marked once-differentiable: a third derivative raises instead of coming out silently
wrong. Storage may be bfloat16/float16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

NORM_EPS = 1e-5
MAX_BLOCK = 1024
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# --- reference (plain PyTorch, the same math) -----------------------------------------------------------------
def norm_scale_ref(var: torch.Tensor) -> torch.Tensor:
    """s_c = sqrt(V / (v_c + eps) + eps), V = mean_c v_c over dim 1 of var (B, C[, 1, 1])."""
    return torch.sqrt(var.mean(dim=1, keepdim=True) / (var + NORM_EPS) + NORM_EPS)


def scaled_norm_act_ref(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """z = GELU(x̂ s k) with k = g (1 + m) of shape (B, C); statistics in float32 at least."""
    h32 = h.to(torch.float64 if h.dtype == torch.float64 else torch.float32)
    xhat = h32 - h32.mean(dim=(2, 3), keepdim=True)
    var = xhat.square().mean(dim=(2, 3), keepdim=True)
    return F.gelu(xhat * norm_scale_ref(var) * k.to(h32.dtype)[:, :, None, None]).to(h.dtype)


def norm_act_ref(h: torch.Tensor, gain: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
    """z = GELU(Normalization(h) · g · (1 + m)); h: (B, C, H, W), gain g: (C,), modulation m: (B, C)."""
    return scaled_norm_act_ref(h, gain * (1.0 + modulation))


def norm_act_adjoint_ref(h: torch.Tensor, gain: torch.Tensor, modulation: torch.Tensor, grad_out: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h̄, m̄) = (∂z/∂h)ᵀ ḡ, (∂z/∂m)ᵀ ḡ by autograd of :func:`norm_act_ref`, differentiable again."""
    with torch.enable_grad():
        h_, m_ = (x if x.requires_grad else x.detach().requires_grad_() for x in (h, modulation))
        grad_h, grad_m = torch.autograd.grad(norm_act_ref(h_, gain, m_), (h_, m_), grad_out, create_graph=True)
    return grad_h, grad_m


def scaled_norm_act_adjoint_ref(h: torch.Tensor, k: torch.Tensor, grad_out: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h̄, k̄) = (∂z/∂h)ᵀ ḡ, (∂z/∂k)ᵀ ḡ by autograd of :func:`scaled_norm_act_ref`, differentiable again."""
    with torch.enable_grad():
        h_, k_ = (x if x.requires_grad else x.detach().requires_grad_() for x in (h, k))
        grad_h, grad_k = torch.autograd.grad(scaled_norm_act_ref(h_, k_), (h_, k_), grad_out, create_graph=True)
    return grad_h, grad_k


# --- Triton kernels ---------------------------------------------------------------------------------------------
@triton.jit
def _row_stats_kernel(h_ptr, mean_ptr, var_ptr, n, BLOCK: tl.constexpr, N_BLOCKS: tl.constexpr):
    """One program per row (image b, channel c). h: (R, n) contiguous rows; mean, var: (R,) statistics dtype;
    N_BLOCKS = ⌈n/BLOCK⌉. Two passes over the row: μ = mean h, then v = mean (h − μ)²."""
    row = tl.program_id(0)
    base = h_ptr + row.to(tl.int64) * n
    acc_ty = mean_ptr.dtype.element_ty
    total = tl.zeros([BLOCK], dtype=acc_ty)
    for i in range(N_BLOCKS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        total += tl.load(base + offs, mask=offs < n, other=0.0).to(acc_ty)
    mean = tl.sum(total, axis=0) / n
    squares = tl.zeros([BLOCK], dtype=acc_ty)
    for i in range(N_BLOCKS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        centred = tl.where(mask, tl.load(base + offs, mask=mask, other=0.0).to(acc_ty) - mean, 0.0)
        squares += centred * centred
    tl.store(mean_ptr + row, mean)
    tl.store(var_ptr + row, tl.sum(squares, axis=0) / n)


@triton.jit
def _norm_act_fwd_kernel(h_ptr, mean_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Grid (R, ⌈n/BLOCK⌉). h, out: (R, n); mean, scale = s k: (R,). out = GELU((h − μ) · scale)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc_ty = mean_ptr.dtype.element_ty
    x = tl.load(h_ptr + row.to(tl.int64) * n + offs, mask=mask, other=0.0).to(acc_ty)
    a = (x - tl.load(mean_ptr + row)) * tl.load(scale_ptr + row)
    z = 0.5 * a * (1.0 + tl.math.erf(a * SQRT_HALF))
    tl.store(out_ptr + row.to(tl.int64) * n + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adjoint_abar(h_ptr, g_ptr, row, offs, mask, n, mean, scale, acc_ty: tl.constexpr):
    """x̂ = h − μ and ā = ḡ GELU'(x̂ · scale) at positions ``offs`` of ``row`` (zero where masked)."""
    x = tl.load(h_ptr + row.to(tl.int64) * n + offs, mask=mask, other=0.0).to(acc_ty)
    g = tl.load(g_ptr + row.to(tl.int64) * n + offs, mask=mask, other=0.0).to(acc_ty)
    xhat = tl.where(mask, x - mean, 0.0)
    a = xhat * scale
    gelu_prime = 0.5 * (1.0 + tl.math.erf(a * SQRT_HALF)) + a * tl.exp(-0.5 * a * a) * INV_SQRT_2PI
    return xhat, g * gelu_prime


@triton.jit
def _norm_act_adj_reduce_kernel(h_ptr, g_ptr, mean_ptr, scale_ptr, sum_abar_ptr, q_ptr, n, BLOCK: tl.constexpr,
                                N_BLOCKS: tl.constexpr):
    """One program per row. h, ḡ: (R, n); mean, scale: (R,). Writes Σ ā and Q = Σ ā x̂, each (R,)."""
    row = tl.program_id(0)
    acc_ty = mean_ptr.dtype.element_ty
    mean, scale = tl.load(mean_ptr + row), tl.load(scale_ptr + row)
    sum_abar = tl.zeros([BLOCK], dtype=acc_ty)
    q = tl.zeros([BLOCK], dtype=acc_ty)
    for i in range(N_BLOCKS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        xhat, abar = _adjoint_abar(h_ptr, g_ptr, row, offs, offs < n, n, mean, scale, acc_ty)
        sum_abar += abar
        q += abar * xhat
    tl.store(sum_abar_ptr + row, tl.sum(sum_abar, axis=0))
    tl.store(q_ptr + row, tl.sum(q, axis=0))


@triton.jit
def _norm_act_adj_apply_kernel(h_ptr, g_ptr, mean_ptr, scale_ptr, abar_mean_ptr, coef_x_ptr, grad_h_ptr, n,
                               BLOCK: tl.constexpr):
    """Grid (R, ⌈n/BLOCK⌉). h, ḡ, h̄: (R, n); mean, scale, mean ā, coef_x: (R,).
    h̄ = scale · (ā − mean ā) + coef_x · x̂."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc_ty = mean_ptr.dtype.element_ty
    scale = tl.load(scale_ptr + row)
    xhat, abar = _adjoint_abar(h_ptr, g_ptr, row, offs, mask, n, tl.load(mean_ptr + row), scale, acc_ty)
    grad_h = scale * (abar - tl.load(abar_mean_ptr + row)) + tl.load(coef_x_ptr + row) * xhat
    tl.store(grad_h_ptr + row.to(tl.int64) * n + offs, grad_h.to(grad_h_ptr.dtype.element_ty), mask=mask)


# --- launchers --------------------------------------------------------------------------------------------------
def _block(n: int) -> int:
    """Block size of a row of n; row loops run over ⌈n/BLOCK⌉ blocks, a constexpr (a plain int in the interpreter
    of every Triton version)."""
    return min(MAX_BLOCK, triton.next_power_of_2(n))


def _statistics(h: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Row statistics of contiguous h (B, C, H, W): μ, v, s (each (B, C)) and scale = s k."""
    b, c, n = h.shape[0], h.shape[1], h.shape[2] * h.shape[3]
    mean = torch.empty(b, c, device=h.device, dtype=k.dtype)
    var = torch.empty_like(mean)
    _row_stats_kernel[(b * c,)](h, mean, var, n, BLOCK=_block(n), N_BLOCKS=triton.cdiv(n, _block(n)))
    s = norm_scale_ref(var)
    return mean, var, s, s * k


def norm_act_forward_launch(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """z = GELU(x̂ s k) for contiguous h (B, C, H, W) and k (B, C) in the statistics dtype."""
    n = h.shape[2] * h.shape[3]
    mean, _, _, scale = _statistics(h, k)
    out = torch.empty_like(h)
    _norm_act_fwd_kernel[(h.shape[0] * h.shape[1], triton.cdiv(n, _block(n)))](h, mean, scale, out, n,
                                                                                 BLOCK=_block(n))
    return out


def norm_act_adjoint_launch(h: torch.Tensor, k: torch.Tensor, grad_out: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h̄, k̄) for contiguous h, ḡ (B, C, H, W) and k (B, C) in the statistics dtype (formulas in the module doc)."""
    n = h.shape[2] * h.shape[3]
    rows, block = h.shape[0] * h.shape[1], _block(n)
    mean, var, s, scale = _statistics(h, k)
    sum_abar, q = torch.empty_like(mean), torch.empty_like(mean)
    _norm_act_adj_reduce_kernel[(rows,)](h, grad_out, mean, scale, sum_abar, q, n, BLOCK=block,
                                         N_BLOCKS=triton.cdiv(n, block))
    grad_k = s * q
    w, u = 1.0 / (var + NORM_EPS), k * q / s
    coef_x = (-var.mean(dim=1, keepdim=True) * w.square() * u + (w * u).mean(dim=1, keepdim=True)) / n
    grad_h = torch.empty_like(h)
    _norm_act_adj_apply_kernel[(rows, triton.cdiv(n, block))](h, grad_out, mean, scale, sum_abar / n, coef_x,
                                                               grad_h, n, BLOCK=block)
    return grad_h, grad_k


# --- autograd Functions -----------------------------------------------------------------------------------------
class _NormAct(torch.autograd.Function):
    """z = GELU(x̂ s k); backward = the adjoint Function, itself differentiable."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, k)
        return norm_act_forward_launch(h, k)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, k = ctx.saved_tensors
        return _NormActAdjoint.apply(h, k, grad_out.contiguous())


class _NormActAdjoint(torch.autograd.Function):
    """(h̄, k̄) = Jᵀ ḡ by the kernels; backward by autograd of the recomputed reference, once-differentiable."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, k: torch.Tensor, grad_out: torch.Tensor):
        ctx.save_for_backward(h, k, grad_out)
        return norm_act_adjoint_launch(h, k, grad_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_grad_h: torch.Tensor, grad_grad_k: torch.Tensor):
        with torch.enable_grad():  # partial derivatives: every input detached (ḡ may itself depend on h)
            inputs = [x.detach().requires_grad_() for x in ctx.saved_tensors]
            outputs = scaled_norm_act_adjoint_ref(*inputs)
            return torch.autograd.grad(outputs, inputs, (grad_grad_h, grad_grad_k))


# --- public functions -------------------------------------------------------------------------------------------
def _scale(h: torch.Tensor, gain: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
    """k = g (1 + m): (B, C) in the statistics dtype (float64 for float64 h, else float32)."""
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    return (gain.to(dtype) * (1.0 + modulation.to(dtype))).contiguous()


def norm_act(h: torch.Tensor, gain: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
    """GELU(Normalization(h) · g · (1 + m)) by the Triton kernels; h: (B, C, H, W), g: (C,), m: (B, C)."""
    return _NormAct.apply(h.contiguous(), _scale(h, gain, modulation))


def norm_act_adjoint(h: torch.Tensor, gain: torch.Tensor, modulation: torch.Tensor, grad_out: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h̄, m̄) = Jᵀ ḡ of :func:`norm_act` w.r.t. h and m (m̄ = g k̄), differentiable in h, g, m and ḡ."""
    grad_h, grad_k = _NormActAdjoint.apply(h.contiguous(), _scale(h, gain, modulation), grad_out.contiguous())
    return grad_h, (gain.to(grad_k.dtype) * grad_k).to(modulation.dtype)
