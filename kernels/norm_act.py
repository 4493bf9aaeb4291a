"""NormAct as Triton kernels: per-image, per-channel normalization × gain × (1 + modulation) → GELU.

For image b and channel c over the n = H·W positions (statistics in float32, float64 for float64 inputs):

    x̂_c = h_c − μ_c,  v_c = mean x̂_c²,  V = mean_c v_c,  w_c = 1 / (v_c + eps),  s_c = sqrt(V w_c + eps),
    k_c = g_c (1 + m_c),  z_c = GELU(a_c),  a_c = x̂_c s_c k_c          (the released code's normalization, eps = 1e-5)

The adjoint (vector-Jacobian product with an incoming ḡ, what the explicit-adjoint network needs; derived in
docs/method.md §4.4) is

    ā = ḡ GELU'(a),  Q_c = Σ ā x̂_c,  k̄_c = s_c Q_c,  m̄_c = g_c k̄_c,  u_c = k_c Q_c / s_c
    h̄_c = s_c k_c (ā − mean ā) + (−V w_c² u_c + mean_c' w_c' u_c') / n · x̂_c

s_c ≥ sqrt(eps) and w_c ≤ 1/eps: nothing divides by zero where V ≪ eps (deep layers at initialization).

The plain-PyTorch reference of both, ``norm_act_ref`` and ``norm_act_adjoint_ref``, is kernels/norm_act_ref.py
(re-exported here): the model builds on it and must import without Triton.

Custom operators (torch.library, so torch.compile traces them without graph breaks and meta/fake tensors flow):
dsm_fast::norm_act (z and h's statistics μ, v), whose backward is dsm_fast::norm_act_adjoint, whose backward — the
second derivatives of the forward, which a dual-score loss needs for its parameter gradient — is
dsm_fast::norm_act_adjoint_backward, two Triton passes (formulas at its launcher). Both take μ and v from the
forward rather than reducing h again (docs/method.md §4.4). A third derivative raises instead of coming out silently wrong.
Storage may be bfloat16/float16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from .norm_act_ref import (  # noqa: F401 (re-exported)
    NORM_EPS,
    modulated_gain,
    norm_act_adjoint_ref,
    norm_act_ref,
    scaled_norm_act_adjoint_ref,
    scaled_norm_act_ref,
    statistics_dtype,
)

MAX_BLOCK = 1024
SUMS_WARPS = 8  # warps of the adjoint backward's ten-sum pass: ten float64 accumulators of 1024 spill with four
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
NORM_EPS_C = tl.constexpr(NORM_EPS)


# --- Triton kernels ---------------------------------------------------------------------------------------------
@triton.jit
def _row_load(ptr, row, offs, mask, n, acc_ty: tl.constexpr):
    """Positions ``offs`` of ``row`` of an (R, n) array, in acc_ty, zero where masked."""
    return tl.load(ptr + row.to(tl.int64) * n + offs, mask=mask, other=0.0).to(acc_ty)


@triton.jit
def _slice_row(ptr, row, C, n, batch_stride):
    """Row (b, c) = (row // C, row % C) of an array whose images' (C, n) blocks are contiguous and batch_stride
    elements apart: C·n when the array is contiguous, more for a channel slice of a larger one (no copy needed)."""
    return ptr + (row // C).to(tl.int64) * batch_stride + (row % C).to(tl.int64) * n


@triton.jit
def _row_stats_kernel(h_ptr, mean_ptr, var_ptr, n, BLOCK: tl.constexpr, N_BLOCKS: tl.constexpr):
    """One program per row (image b, channel c). h: (R, n) contiguous rows; mean, var: (R,) statistics dtype;
    N_BLOCKS = ⌈n/BLOCK⌉. One pass over the row: each block's count m_j, mean μ_j and M_j = Σ (h − μ_j)² (exact, two
    passes over the block in registers), merged in order (Chan, Golub & LeVeque): with δ = μ_j − μ,
    μ ← μ + δ m_j / (m + m_j),  M ← M + M_j + δ² m m_j / (m + m_j),  m ← m + m_j;  v = M / n."""
    row = tl.program_id(0)
    base = h_ptr + row.to(tl.int64) * n
    acc_ty = mean_ptr.dtype.element_ty
    mean = tl.zeros([1], dtype=acc_ty)
    m2 = tl.zeros([1], dtype=acc_ty)
    for i in range(N_BLOCKS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(base + offs, mask=mask, other=0.0).to(acc_ty)
        count = tl.minimum(n - i * BLOCK, BLOCK).to(acc_ty)
        block_mean = tl.sum(x, axis=0) / count
        centred = tl.where(mask, x - block_mean, 0.0)
        delta = block_mean - mean
        weight = count / (i * BLOCK + count)
        mean += delta * weight
        m2 += tl.sum(centred * centred, axis=0) + delta * delta * (i * BLOCK) * weight
    tl.store(mean_ptr + row + tl.arange(0, 1), mean)
    tl.store(var_ptr + row + tl.arange(0, 1), m2 / n)


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
def _adjoint_abar(h_ptr, g_row, row, offs, mask, n, mean, scale, acc_ty: tl.constexpr):
    """x̂ = h − μ and ā = ḡ GELU'(x̂ · scale) at positions ``offs`` of ``row`` (zero where masked); g_row → ḡ's row."""
    xhat = tl.where(mask, _row_load(h_ptr, row, offs, mask, n, acc_ty) - mean, 0.0)
    g = tl.load(g_row + offs, mask=mask, other=0.0).to(acc_ty)
    a = xhat * scale
    gelu_prime = 0.5 * (1.0 + tl.math.erf(a * SQRT_HALF)) + a * tl.exp(-0.5 * a * a) * INV_SQRT_2PI
    return xhat, g * gelu_prime


@triton.jit
def _norm_act_adj_reduce_kernel(h_ptr, g_ptr, mean_ptr, scale_ptr, sum_abar_ptr, q_ptr, n, C, g_batch_stride,
                                BLOCK: tl.constexpr, N_BLOCKS: tl.constexpr):
    """One program per row. h: (R, n); ḡ: R = B·C rows of n, images g_batch_stride apart; mean, scale: (R,).
    Writes Σ ā and Q = Σ ā x̂, each (R,)."""
    row = tl.program_id(0)
    g_row = _slice_row(g_ptr, row, C, n, g_batch_stride)
    acc_ty = mean_ptr.dtype.element_ty
    mean, scale = tl.load(mean_ptr + row), tl.load(scale_ptr + row)
    sum_abar = tl.zeros([BLOCK], dtype=acc_ty)
    q = tl.zeros([BLOCK], dtype=acc_ty)
    for i in range(N_BLOCKS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        xhat, abar = _adjoint_abar(h_ptr, g_row, row, offs, offs < n, n, mean, scale, acc_ty)
        sum_abar += abar
        q += abar * xhat
    tl.store(sum_abar_ptr + row, tl.sum(sum_abar, axis=0))
    tl.store(q_ptr + row, tl.sum(q, axis=0))


@triton.jit
def _norm_act_adj_apply_kernel(h_ptr, g_ptr, mean_ptr, scale_ptr, abar_mean_ptr, coef_x_ptr, addend_ptr, grad_h_ptr,
                               n, C, g_batch_stride, BLOCK: tl.constexpr, HAS_ADDEND: tl.constexpr):
    """Grid (R, ⌈n/BLOCK⌉). h, addend, h̄: (R, n); ḡ as in the reduce kernel; mean, scale, mean ā, coef_x: (R,).
    h̄ = scale · (ā − mean ā) + coef_x · x̂ (+ addend where HAS_ADDEND; addend_ptr unread otherwise)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc_ty = mean_ptr.dtype.element_ty
    scale = tl.load(scale_ptr + row)
    xhat, abar = _adjoint_abar(h_ptr, _slice_row(g_ptr, row, C, n, g_batch_stride), row, offs, mask, n,
                               tl.load(mean_ptr + row), scale, acc_ty)
    grad_h = scale * (abar - tl.load(abar_mean_ptr + row)) + tl.load(coef_x_ptr + row) * xhat
    if HAS_ADDEND:
        grad_h += _row_load(addend_ptr, row, offs, mask, n, acc_ty)
    tl.store(grad_h_ptr + row.to(tl.int64) * n + offs, grad_h.to(grad_h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_derivatives(a):
    """(GELU'(a), GELU''(a)) = (Φ(a) + a φ(a), φ(a) (2 − a²)) of the exact (erf) GELU."""
    phi = tl.exp(-0.5 * a * a) * INV_SQRT_2PI
    return 0.5 * (1.0 + tl.math.erf(a * SQRT_HALF)) + a * phi, phi * (2.0 - a * a)


@triton.jit
def _adj_bwd_reduce_kernel(h_ptr, g_ptr, hh_ptr, mean_ptr, scale_ptr, sums_ptr, n, C, g_batch_stride,
                           BLOCK: tl.constexpr, N_BLOCKS: tl.constexpr):
    """One program per row. h, H (the cotangent of h̄): (R, n); ḡ: rows of n, images g_batch_stride apart; mean,
    scale: (R,); sums: (R, 10) ←
    (Σ ā, Σ ā x̂, Σ H, Σ H ā, Σ H x̂, Σ r H x̂, Σ r x̂², Σ r x̂, Σ r H, Σ r), r = ḡ GELU''(a): the last five give
    Σ da x̂ and Σ da of the launcher's pass 2 without a pass of their own, da being linear in H, x̂ and 1."""
    row = tl.program_id(0)
    g_row = _slice_row(g_ptr, row, C, n, g_batch_stride)
    acc_ty = mean_ptr.dtype.element_ty
    mean, scale = tl.load(mean_ptr + row), tl.load(scale_ptr + row)
    s_a = tl.zeros([BLOCK], dtype=acc_ty)
    s_ax = tl.zeros([BLOCK], dtype=acc_ty)
    s_h = tl.zeros([BLOCK], dtype=acc_ty)
    s_ha = tl.zeros([BLOCK], dtype=acc_ty)
    s_hx = tl.zeros([BLOCK], dtype=acc_ty)
    s_rhx = tl.zeros([BLOCK], dtype=acc_ty)
    s_rxx = tl.zeros([BLOCK], dtype=acc_ty)
    s_rx = tl.zeros([BLOCK], dtype=acc_ty)
    s_rh = tl.zeros([BLOCK], dtype=acc_ty)
    s_r = tl.zeros([BLOCK], dtype=acc_ty)
    for i in range(N_BLOCKS):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        xhat = tl.where(mask, _row_load(h_ptr, row, offs, mask, n, acc_ty) - mean, 0.0)
        g = tl.load(g_row + offs, mask=mask, other=0.0).to(acc_ty)
        hh = _row_load(hh_ptr, row, offs, mask, n, acc_ty)
        d1, d2 = _gelu_derivatives(xhat * scale)
        abar, r = g * d1, g * d2
        s_a += abar
        s_ax += abar * xhat
        s_h += hh
        s_ha += hh * abar
        s_hx += hh * xhat
        s_rhx += r * hh * xhat
        s_rxx += r * xhat * xhat
        s_rx += r * xhat
        s_rh += r * hh
        s_r += r
    base = sums_ptr + 10 * row
    tl.store(base, tl.sum(s_a, axis=0))
    tl.store(base + 1, tl.sum(s_ax, axis=0))
    tl.store(base + 2, tl.sum(s_h, axis=0))
    tl.store(base + 3, tl.sum(s_ha, axis=0))
    tl.store(base + 4, tl.sum(s_hx, axis=0))
    tl.store(base + 5, tl.sum(s_rhx, axis=0))
    tl.store(base + 6, tl.sum(s_rxx, axis=0))
    tl.store(base + 7, tl.sum(s_rx, axis=0))
    tl.store(base + 8, tl.sum(s_rh, axis=0))
    tl.store(base + 9, tl.sum(s_r, axis=0))


@triton.jit
def _second_order_gelu(x, c, mask):
    """(x̂ = x − μ, zero where masked; GELU'(a); GELU''(a)) at a = x̂ σ, with c → this row's coef (μ, σ, …)."""
    xhat = tl.where(mask, x - tl.load(c), 0.0)
    d1, d2 = _gelu_derivatives(xhat * tl.load(c + 1))
    return xhat, d1, d2


@triton.jit
def _second_order_dabar(xhat, hh, c, mask):
    """dā = σ H + dQ x̂ + dS, zero where masked, with c → this row's coef (μ, σ, dQ, dS, …)."""
    return tl.where(mask, tl.load(c + 1) * hh + tl.load(c + 2) * xhat + tl.load(c + 3), 0.0)


@triton.jit
def _adj_bwd_apply_kernel(h_ptr, g_ptr, hh_ptr, coef_ptr, grad_h_ptr, grad_g_ptr, n, C, g_batch_stride,
                          BLOCK: tl.constexpr):
    """Grid (R, ⌈n/BLOCK⌉). dḡ = dā GELU'(a) and dh = coef_x H + dQ ā + σ da + e x̂ − mean, da = dā ḡ GELU''(a),
    coef (R, 7) = (μ, σ, dQ, dS, coef_x, e, mean); h, H, dh, dḡ: (R, n), ḡ as in the reduce kernel."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc_ty = coef_ptr.dtype.element_ty
    c = coef_ptr + 7 * row
    g = tl.load(_slice_row(g_ptr, row, C, n, g_batch_stride) + offs, mask=mask, other=0.0).to(acc_ty)
    hh = _row_load(hh_ptr, row, offs, mask, n, acc_ty)
    xhat, d1, d2 = _second_order_gelu(_row_load(h_ptr, row, offs, mask, n, acc_ty), c, mask)
    dabar = _second_order_dabar(xhat, hh, c, mask)
    da = dabar * g * d2
    grad_h = (tl.load(c + 4) * hh + tl.load(c + 2) * g * d1 + tl.load(c + 1) * da + tl.load(c + 5) * xhat
              - tl.load(c + 6))
    tl.store(grad_h_ptr + row.to(tl.int64) * n + offs, grad_h.to(grad_h_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_g_ptr + row.to(tl.int64) * n + offs, (dabar * d1).to(grad_g_ptr.dtype.element_ty), mask=mask)


# Per-image kernels over the C channels of one image (one program per image b; (B, C) arrays contiguous): the
# (B, C)-sized algebra between the row passes, so that each op launches a handful of kernels, not dozens.
@triton.jit
def _channel_load(ptr, b, C, BLOCK_C: tl.constexpr):
    """Row b of a (B, C) array, zero beyond C, and the mask."""
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    return tl.load(ptr + b * C + offs, mask=mask, other=0.0), mask


@triton.jit
def _channel_store(ptr, b, C, value, BLOCK_C: tl.constexpr):
    offs = tl.arange(0, BLOCK_C)
    tl.store(ptr + b * C + offs, value, mask=offs < C)


@triton.jit
def _sums_column(sums_ptr, b, C, column, width, BLOCK_C: tl.constexpr):
    """Column ``column`` of image b's rows of a (B, C, width) array, zero beyond C."""
    offs = tl.arange(0, BLOCK_C)
    return tl.load(sums_ptr + (b * C + offs) * width + column, mask=offs < C, other=0.0)


@triton.jit
def _channel_stats(var_ptr, b, C, BLOCK_C: tl.constexpr):
    """(V, w, s) of image b: V = mean_c v (a scalar), w = 1/(v + eps) and s = sqrt(V w + eps) (each (C,))."""
    v, _ = _channel_load(var_ptr, b, C, BLOCK_C)
    big_v = tl.sum(v, axis=0) / C
    w = 1.0 / (v + NORM_EPS_C)
    return big_v, w, tl.sqrt(big_v * w + NORM_EPS_C)


@triton.jit
def _scale_kernel(var_ptr, k_ptr, scale_ptr, C, BLOCK_C: tl.constexpr):
    """σ = s k, (B, C), s = sqrt(V / (v + eps) + eps)."""
    b = tl.program_id(0)
    _, _, s = _channel_stats(var_ptr, b, C, BLOCK_C)
    k, _ = _channel_load(k_ptr, b, C, BLOCK_C)
    _channel_store(scale_ptr, b, C, s * k, BLOCK_C)


@triton.jit
def _adjoint_coef_x(var_ptr, k_ptr, q, b, C, n, BLOCK_C: tl.constexpr):
    """(u = k Q / s, coef_x = (−V w² u + mean_c w u) / n) of image b, Q its (C,) row of Σ ā x̂."""
    big_v, w, s = _channel_stats(var_ptr, b, C, BLOCK_C)
    k, mask = _channel_load(k_ptr, b, C, BLOCK_C)
    u = k * q / s
    return u, (-big_v * w * w * u + tl.sum(tl.where(mask, w * u, 0.0), axis=0) / C) / n


@triton.jit
def _adj_coef_kernel(var_ptr, k_ptr, q_ptr, sum_abar_ptr, grad_k_ptr, coef_x_ptr, abar_mean_ptr, C, n,
                     BLOCK_C: tl.constexpr):
    """k̄ = s Q, coef_x and mean ā = Σ ā / n, each (B, C), from v, k, Q, Σ ā."""
    b = tl.program_id(0)
    _, _, s = _channel_stats(var_ptr, b, C, BLOCK_C)
    q, _ = _channel_load(q_ptr, b, C, BLOCK_C)
    sum_abar, _ = _channel_load(sum_abar_ptr, b, C, BLOCK_C)
    _, coef_x = _adjoint_coef_x(var_ptr, k_ptr, q, b, C, n, BLOCK_C)
    _channel_store(grad_k_ptr, b, C, s * q, BLOCK_C)
    _channel_store(coef_x_ptr, b, C, coef_x, BLOCK_C)
    _channel_store(abar_mean_ptr, b, C, sum_abar / n, BLOCK_C)


@triton.jit
def _bwd_dq(var_ptr, k_ptr, kk_ptr, sum_hx, b, C, n, BLOCK_C: tl.constexpr):
    """(dM, du, dQ) of image b, the cotangents of M = mean_c w u, u and Q, from Σ H x̂ and K (kk, the cotangent of
    k̄): dM = Σ_c Σ H x̂ / n, du = −V w² Σ H x̂ / n + dM w / C, dQ = K s + du k / s."""
    big_v, w, s = _channel_stats(var_ptr, b, C, BLOCK_C)
    k, _ = _channel_load(k_ptr, b, C, BLOCK_C)
    kk, _ = _channel_load(kk_ptr, b, C, BLOCK_C)
    d_m = tl.sum(sum_hx, axis=0) / n
    du = -big_v * w * w * sum_hx / n + d_m * w / C
    return d_m, du, kk * s + du * k / s


@triton.jit
def _adj_bwd_coef_kernel(mean_ptr, var_ptr, k_ptr, kk_ptr, sums_ptr, coef_ptr, grad_k_ptr, C, n,
                         BLOCK_C: tl.constexpr):
    """From pass 1's sums (B, C, 10): dk (B, C) and coef (B, C, 7) = (μ, σ, dQ, dS = −σ ΣH / n, coef_x, 2 dv / n,
    mean of dx) for the last pass; Σ da x̂ and Σ da from the r-sums (launcher's formulas)."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    sum_a, q = _sums_column(sums_ptr, b, C, 0, 10, BLOCK_C), _sums_column(sums_ptr, b, C, 1, 10, BLOCK_C)
    sum_h, sum_ha = _sums_column(sums_ptr, b, C, 2, 10, BLOCK_C), _sums_column(sums_ptr, b, C, 3, 10, BLOCK_C)
    sum_hx = _sums_column(sums_ptr, b, C, 4, 10, BLOCK_C)
    big_v, w, s = _channel_stats(var_ptr, b, C, BLOCK_C)
    k, _ = _channel_load(k_ptr, b, C, BLOCK_C)
    kk, _ = _channel_load(kk_ptr, b, C, BLOCK_C)
    mean, _ = _channel_load(mean_ptr, b, C, BLOCK_C)
    u, coef_x = _adjoint_coef_x(var_ptr, k_ptr, q, b, C, n, BLOCK_C)
    d_m, du, dq = _bwd_dq(var_ptr, k_ptr, kk_ptr, sum_hx, b, C, n, BLOCK_C)
    scale, d_s_term = s * k, -s * k * sum_h / n
    sum_dax = (scale * _sums_column(sums_ptr, b, C, 5, 10, BLOCK_C) + dq * _sums_column(sums_ptr, b, C, 6, 10, BLOCK_C)
               + d_s_term * _sums_column(sums_ptr, b, C, 7, 10, BLOCK_C))
    sum_da = (scale * _sums_column(sums_ptr, b, C, 8, 10, BLOCK_C) + dq * _sums_column(sums_ptr, b, C, 7, 10, BLOCK_C)
              + d_s_term * _sums_column(sums_ptr, b, C, 9, 10, BLOCK_C))
    d_scale = sum_ha - sum_h * sum_a / n + sum_dax
    d_s = kk * q - du * u / s + d_scale * k
    _channel_store(grad_k_ptr, b, C, du * q / s + d_scale * s, BLOCK_C)
    d_big_v = tl.sum(tl.where(mask, -w * w * u * sum_hx / n + d_s * w / (2 * s), 0.0), axis=0)
    d_w = -2 * big_v * w * u * sum_hx / n + d_m * u / C + d_s * big_v / (2 * s)
    d_var = -w * w * d_w + d_big_v / C
    base = coef_ptr + (b * C + offs) * 7
    tl.store(base, mean, mask=mask)
    tl.store(base + 1, scale, mask=mask)
    tl.store(base + 2, dq, mask=mask)
    tl.store(base + 3, d_s_term, mask=mask)
    tl.store(base + 4, coef_x, mask=mask)
    tl.store(base + 5, 2 * d_var / n, mask=mask)
    tl.store(base + 6, (coef_x * sum_h + dq * sum_a + scale * sum_da) / n, mask=mask)


# --- launchers --------------------------------------------------------------------------------------------------
def _block(n: int) -> int:
    """Block size of a row of n; row loops run over ⌈n/BLOCK⌉ blocks, a constexpr (a plain int in the interpreter
    of every Triton version)."""
    return min(MAX_BLOCK, triton.next_power_of_2(n))


def _row_loop(n: int) -> dict[str, int]:
    """Constexprs of a kernel that loops over a whole row of n: BLOCK and N_BLOCKS = ⌈n/BLOCK⌉."""
    return {"BLOCK": _block(n), "N_BLOCKS": triton.cdiv(n, _block(n))}


def _row_grid(rows: int, n: int) -> tuple[int, int]:
    """Grid of a kernel with one program per block of a row: (rows, ⌈n/BLOCK⌉)."""
    return rows, triton.cdiv(n, _block(n))


def _channel_rows(g: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(g, its batch stride) for a kernel that reads g (B, C, H, W) as B·C rows of H·W: g itself when each image's
    (C, H, W) block is contiguous — a channel slice of a larger tensor, as the explicit adjoint's skip split and
    its gradient give, is read in place — else a contiguous copy."""
    c, height, width = g.shape[1:]
    if not g.is_contiguous() and g.stride()[1:] != (height * width, width, 1):
        g = g.contiguous()
    return g, g.stride(0) if g.shape[0] > 1 else c * height * width


def _channels(c: int) -> dict[str, int]:
    """Constexprs of a per-image kernel over c channels."""
    return {"BLOCK_C": triton.next_power_of_2(c)}


def norm_act_statistics_launch(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, v) of contiguous h (B, C, H, W), each (B, C) in the statistics dtype: one launch, one pass over h."""
    b, c, n = h.shape[0], h.shape[1], h.shape[2] * h.shape[3]
    mean = torch.empty(b, c, device=h.device, dtype=statistics_dtype(h.dtype))
    var = torch.empty_like(mean)
    launch(_row_stats_kernel, (b * c,), h, mean, var, n, **_row_loop(n))
    return mean, var


def _scale(var: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """σ = s k (B, C) from v and k (B, C) (one per-image launch)."""
    scale = torch.empty_like(var)
    launch(_scale_kernel, (var.shape[0],), var, k, scale, var.shape[1], **_channels(var.shape[1]))
    return scale


def norm_act_forward_launch(h: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z = GELU(x̂ s k), μ, v) for contiguous h (B, C, H, W) and k (B, C) in the statistics dtype; μ and v (B, C)
    are what the adjoint and its backward take instead of reducing h again."""
    n = h.shape[2] * h.shape[3]
    mean, var = norm_act_statistics_launch(h)
    out = torch.empty_like(h)
    launch(_norm_act_fwd_kernel, _row_grid(h.shape[0] * h.shape[1], n), h, mean, _scale(var, k), out, n,
           BLOCK=_block(n))
    return out, mean, var


def norm_act_adjoint_launch(h: torch.Tensor, k: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                            grad_out: torch.Tensor, addend: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h̄, k̄) for contiguous h (B, C, H, W), ḡ like h (a channel slice read in place, :func:`_channel_rows`), k (B, C)
    in the statistics dtype and h's statistics μ, v (B, C) (formulas in the module doc); with a contiguous ``addend``
    like h, h̄ + addend instead of h̄ (read in the last pass). Four launches: σ, Σ ā and Q, channel terms, h̄."""
    b, c, n = h.shape[0], h.shape[1], h.shape[2] * h.shape[3]
    grad_out, g_stride = _channel_rows(grad_out)
    scale = _scale(var, k)
    sum_abar, q, grad_k = torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean)
    coef_x, abar_mean = torch.empty_like(mean), torch.empty_like(mean)
    launch(_norm_act_adj_reduce_kernel, (b * c,), h, grad_out, mean, scale, sum_abar, q, n, c, g_stride,
           **_row_loop(n))
    launch(_adj_coef_kernel, (b,), var, k, q, sum_abar, grad_k, coef_x, abar_mean, c, n, **_channels(c))
    grad_h = torch.empty_like(h)
    launch(_norm_act_adj_apply_kernel, _row_grid(b * c, n), h, grad_out, mean, scale, abar_mean, coef_x,
           grad_h if addend is None else addend, grad_h, n, c, g_stride, BLOCK=_block(n),
           HAS_ADDEND=addend is not None)
    return grad_h, grad_k


def norm_act_adjoint_backward_launch(h: torch.Tensor, k: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                                     grad_out: torch.Tensor, grad_grad_h: torch.Tensor, grad_grad_k: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adjoint's vector-Jacobian product: for cotangents (H, K) of (h̄, k̄), the gradients (dh, dk, dḡ) — the
    second derivatives of the forward. Reverse mode through the module doc's adjoint, per image over channels c:

        pass 1:  S = Σ ā, Q = Σ ā x̂, Σ H, Σ H ā, Σ H x̂, and with r = ḡ GELU''(a): Σ r H x̂, Σ r x̂², Σ r x̂, Σ r H, Σ r
        coef_x = (−V w² u + M)/n, M = mean_c w u
        dcoef = Σ H x̂;  dM = Σ_c dcoef / n;  du = −V w² dcoef / n + dM w / C;  dQ = K s + du k / s;  dS = −σ Σ H / n
        dā = σ H + dQ x̂ + dS,  dḡ = dā GELU'(a),  da = dā r, so (no pass of their own)
        Σ da x̂ = σ Σ r H x̂ + dQ Σ r x̂² + dS Σ r x̂,  Σ da = σ Σ r H + dQ Σ r x̂ + dS Σ r
        dσ = Σ H ā − Σ H · S / n + Σ da x̂;  ds = K Q − du u / s + dσ k;  dk = du Q / s + dσ s
        dV = Σ_c (−w² u dcoef / n + ds w / (2s));  dw = −2 V w u dcoef / n + dM u / C + ds V / (2s)
        dv = −w² dw + dV / C
        pass 2:  dḡ, and dh = coef_x H + dQ ā + σ da + (2 dv / n) x̂ − mean of the same (Σ x̂ = 0)

    h, H contiguous (B, C, H, W), ḡ as in :func:`norm_act_adjoint_launch`, dḡ contiguous; k, K and h's statistics
    μ, v (B, C) in the statistics dtype. dh is the whole
    derivative, through μ and v included (their own gradients are not returned: see the custom operators). Four
    launches: σ, pass 1, channel terms, pass 2."""
    b, c, n = h.shape[0], h.shape[1], h.shape[2] * h.shape[3]
    grad_g = torch.empty(h.shape, device=h.device, dtype=grad_out.dtype)
    grad_out, g_stride = _channel_rows(grad_out)
    scale = _scale(var, k)
    sums = torch.empty(b, c, 10, device=h.device, dtype=k.dtype)
    launch(_adj_bwd_reduce_kernel, (b * c,), h, grad_out, grad_grad_h, mean, scale, sums, n, c, g_stride,
           **_row_loop(n), num_warps=SUMS_WARPS)
    coef, grad_k = torch.empty(b, c, 7, device=h.device, dtype=k.dtype), torch.empty_like(mean)
    launch(_adj_bwd_coef_kernel, (b,), mean, var, k, grad_grad_k, sums, coef, grad_k, c, n, **_channels(c))
    grad_h = torch.empty_like(h)
    launch(_adj_bwd_apply_kernel, _row_grid(b * c, n), h, grad_out, grad_grad_h, coef, grad_h, grad_g, n, c, g_stride,
           BLOCK=_block(n))
    return grad_h, grad_k, grad_g


# --- custom operators (torch.library): fake implementations for meta/fake tensors, autograd by the next op -----
# The forward also returns h's statistics μ, v (B, C); the adjoint and its backward take them instead of reducing h
# again. They are a cache of h, not free inputs: each op's derivative in h is the whole one, through μ and v, so the
# statistics come out non-differentiable and the ops return no gradient for them. Whoever has no forward at hand
# takes them from dsm_fast::norm_act_statistics of h.
@torch.library.custom_op("dsm_fast::norm_act", mutates_args=())
def norm_act_op(h: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z = GELU(x̂ s k), μ, v); backward = dsm_fast::norm_act_adjoint."""
    return norm_act_forward_launch(h, k)


@torch.library.custom_op("dsm_fast::norm_act_statistics", mutates_args=())
def norm_act_statistics_op(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, v) of h, non-differentiable (call it on h.detach())."""
    return norm_act_statistics_launch(h)


@torch.library.custom_op("dsm_fast::norm_act_adjoint", mutates_args=())
def norm_act_adjoint_op(h: torch.Tensor, k: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                        grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h̄, k̄) = Jᵀ ḡ, μ and v h's statistics; backward = dsm_fast::norm_act_adjoint_backward."""
    return norm_act_adjoint_launch(h, k, mean, var, grad_out)


@torch.library.custom_op("dsm_fast::norm_act_backward", mutates_args=())
def norm_act_backward_op(h: torch.Tensor, k: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                         grad_out: torch.Tensor, grad_h_other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Jᵀ ḡ + the gradient h has from its other consumers, k̄): NormAct's backward when h is also used elsewhere
    (:class:`NormActHandingOn`); differentiating it raises."""
    return norm_act_adjoint_launch(h, k, mean, var, grad_out, grad_h_other)


@torch.library.custom_op("dsm_fast::norm_act_adjoint_backward", mutates_args=())
def norm_act_adjoint_backward_op(h: torch.Tensor, k: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                                 grad_out: torch.Tensor, grad_grad_h: torch.Tensor, grad_grad_k: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dk, dḡ): the second derivatives; differentiating it again raises."""
    return norm_act_adjoint_backward_launch(h, k, mean, var, grad_out, grad_grad_h, grad_grad_k)


def _statistics_like(h: torch.Tensor) -> torch.Tensor:
    return h.new_empty(h.shape[:2], dtype=statistics_dtype(h.dtype))


@norm_act_op.register_fake
def _(h, k):
    return torch.empty_like(h), _statistics_like(h), _statistics_like(h)


@norm_act_statistics_op.register_fake
def _(h):
    return _statistics_like(h), _statistics_like(h)


@norm_act_adjoint_op.register_fake
def _(h, k, mean, var, grad_out):
    return torch.empty_like(h), torch.empty_like(k)


@norm_act_backward_op.register_fake
def _(h, k, mean, var, grad_out, grad_h_other):
    return torch.empty_like(h), torch.empty_like(k)


@norm_act_adjoint_backward_op.register_fake
def _(h, k, mean, var, grad_out, grad_grad_h, grad_grad_k):
    return torch.empty_like(h), torch.empty_like(k), h.new_empty(h.shape, dtype=grad_out.dtype)


def _save_forward(ctx, inputs, output) -> None:
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.save_for_backward(*inputs, mean, var)


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _norm_act_backward(ctx, grad_z, grad_mean, grad_var):
    h, k, mean, var = ctx.saved_tensors
    return norm_act_adjoint_op(h, k, mean, var, grad_z)


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def adjoint_second_order(h: torch.Tensor, k: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                         grad_out: torch.Tensor, grad_grad_h: torch.Tensor | None, grad_grad_k: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dk, dḡ) for cotangents (H, K) of (h̄, k̄), either of which may be None (zero)."""
    return norm_act_adjoint_backward_op(h, k, mean, var, grad_out, _or_zeros(grad_grad_h, h),
                                        _or_zeros(grad_grad_k, k))


def _norm_act_adjoint_backward(ctx, grad_grad_h, grad_grad_k):
    h, k, mean, var, grad_out = ctx.saved_tensors
    grad_h, grad_k, grad_g = adjoint_second_order(h, k, mean, var, grad_out, grad_grad_h, grad_grad_k)
    return grad_h, grad_k, None, None, grad_g


def _third_order(ctx, *grads):
    raise RuntimeError("dsm_fast::norm_act has no third derivative: its adjoint's backward is differentiable once")


torch.library.register_autograd("dsm_fast::norm_act", _norm_act_backward, setup_context=_save_forward)
torch.library.register_autograd("dsm_fast::norm_act_adjoint", _norm_act_adjoint_backward, setup_context=_save_inputs)
torch.library.register_autograd("dsm_fast::norm_act_adjoint_backward", _third_order, setup_context=_save_inputs)
torch.library.register_autograd("dsm_fast::norm_act_backward", _third_order, setup_context=_save_inputs)
# Per op and call: (kernels launched, all Triton; full passes over an h-sized tensor, each read or write), what
# dsm-fast profile --cost counts for an op it sees only from outside (tests/test_kernels_custom_ops.py recounts
# the kernels).
# Statistics read h once; forward: statistics, σ, + read h, write z; adjoint (statistics given): σ, read h, ḡ
# twice, write h̄ (NormAct's backward: the same, and read h's other gradient); the adjoint's backward (statistics
# given): σ, read h, ḡ, H twice, write dḡ and dh.
LAUNCHES = {"dsm_fast.norm_act": (3, 3), "dsm_fast.norm_act_statistics": (1, 1), "dsm_fast.norm_act_adjoint": (4, 5),
            "dsm_fast.norm_act_adjoint_backward": (4, 8), "dsm_fast.norm_act_backward": (4, 6)}


class NormActHandingOn(torch.autograd.Function):
    """(z, μ, v, h) = dsm_fast::norm_act(h, k) with h handed on (a view, no copy) for a second consumer — the explicit
    adjoint of the same layer. Its gradient then reaches this backward beside z's, and dsm_fast::norm_act_backward
    adds it inside the adjoint's last pass: one read of it instead of a separate sum (read both, write one) of
    h's two gradients (docs/method.md §4.4). Differentiable once (what a first-order route needs)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, k: torch.Tensor):
        z, mean, var = norm_act_op(h, k)
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(h, k, mean, var)
        return z, mean, var, h.view_as(h)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z, grad_mean, grad_var, grad_h_other):
        h, k, mean, var = ctx.saved_tensors
        grad_z = torch.zeros_like(h) if grad_z is None else grad_z
        if grad_h_other is None:
            return norm_act_adjoint_op(h, k, mean, var, grad_z)
        return norm_act_backward_op(h, k, mean, var, grad_z, grad_h_other.contiguous())


# --- public functions -------------------------------------------------------------------------------------------
def norm_act(h: torch.Tensor, gain: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
    """GELU(Normalization(h) · g · (1 + m)) by the Triton kernels; h: (B, C, H, W), g: (C,), m: (B, C)."""
    return norm_act_op(h.contiguous(), modulated_gain(h, gain, modulation))[0]


def norm_act_adjoint(h: torch.Tensor, gain: torch.Tensor, modulation: torch.Tensor, grad_out: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h̄, m̄) = Jᵀ ḡ of :func:`norm_act` w.r.t. h and m (m̄ = g k̄), differentiable in h, g, m and ḡ."""
    h = h.contiguous()
    grad_h, grad_k = norm_act_adjoint_op(h, modulated_gain(h, gain, modulation), *norm_act_statistics_op(h.detach()),
                                         grad_out)
    return grad_h, (gain.to(grad_k.dtype) * grad_k).to(modulation.dtype)
