"""NormAct in plain PyTorch: the one formula that the model, its explicit adjoint, the kernels' tests and the profiler
use (docs/method.md §1.4, §4.4). kernels/norm_act.py re-exports it as the reference of its Triton kernels; it lives
in a module of its own because it must import without Triton (an optional dependency), which dsm_fast/model needs.

For image b and channel c over the n = H·W positions (statistics in float32, float64 for float64 inputs):

    x̂_c = h_c − μ_c,  v_c = mean x̂_c²,  V = mean_c v_c,  s_c = sqrt(V / (v_c + eps) + eps),
    k_c = g_c (1 + m_c),  σ_c = s_c k_c,  a_c = x̂_c σ_c,  z_c = GELU(a_c)     (the released code's eps, 1e-5)

Its adjoint (the vector-Jacobian product with an incoming ḡ; derived in docs/method.md §4.4), w_c = 1 / (v_c + eps):

    ā = ḡ GELU'(a),  Q_c = Σ ā x̂_c,  k̄_c = s_c Q_c,  u_c = k_c Q_c / s_c
    h̄_c = σ_c (ā − mean ā) + (−V w_c² u_c + mean_c' w_c' u_c') / n · x̂_c

written with differentiable ops, so that autograd through it gives the second derivatives. s_c ≥ sqrt(eps) and
w_c ≤ 1/eps: nothing divides by zero where V ≪ eps (deep layers at initialization).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

NORM_EPS = 1e-5


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics in float32 at least: float64 stays float64, everything else (bf16, fp16, fp32) becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def modulated_gain(h: torch.Tensor, gain: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
    """k = g (1 + m): (B, C), contiguous, in h's statistics dtype; gain g: (C,), modulation m: (B, C)."""
    dtype = statistics_dtype(h.dtype)
    return (gain.to(dtype) * (1.0 + modulation.to(dtype))).contiguous()


def normalization_scale(var: torch.Tensor) -> torch.Tensor:
    """s_c = sqrt(V / (v_c + eps) + eps), V = mean_c v_c over dim 1 of var (B, C[, 1, 1]); no eps on V."""
    return torch.sqrt(var.mean(dim=1, keepdim=True) / (var + NORM_EPS) + NORM_EPS)


class NormActTerms(NamedTuple):
    """What NormAct's forward computes on its way to z and its adjoint reads again (statistics dtype)."""

    xhat: torch.Tensor  # x̂ = h − μ, (B, C, H, W)
    var: torch.Tensor  # v, (B, C, 1, 1)
    s: torch.Tensor  # s = sqrt(V / (v + eps) + eps), (B, C, 1, 1)
    k: torch.Tensor  # k = g (1 + m), (B, C, 1, 1)
    scale: torch.Tensor  # σ = s k, (B, C, 1, 1)
    a: torch.Tensor  # a = x̂ σ, the GELU's input, (B, C, H, W)


def norm_act_forward_ref(h: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, NormActTerms]:
    """(z = GELU(x̂ s k) in h's dtype, the terms) for h (B, C, H, W) and k = g (1 + m) (B, C)."""
    h32 = h.to(statistics_dtype(h.dtype))
    xhat = h32 - h32.mean(dim=(2, 3), keepdim=True)
    var = xhat.square().mean(dim=(2, 3), keepdim=True)
    s, kk = normalization_scale(var), k.to(h32.dtype)[:, :, None, None]
    scale = s * kk
    a = xhat * scale
    return F.gelu(a).to(h.dtype), NormActTerms(xhat, var, s, kk, scale, a)


def scaled_norm_act_ref(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """z = GELU(x̂ s k) with k = g (1 + m) of shape (B, C)."""
    return norm_act_forward_ref(h, k)[0]


def norm_act_ref(h: torch.Tensor, gain: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
    """z = GELU(Normalization(h) · g · (1 + m)); h: (B, C, H, W), gain g: (C,), modulation m: (B, C)."""
    return scaled_norm_act_ref(h, modulated_gain(h, gain, modulation))


def gelu_derivative(a: torch.Tensor) -> torch.Tensor:
    """GELU'(a) = Φ(a) + a φ(a) for the exact (erf) GELU."""
    return 0.5 * (1.0 + torch.erf(a * (1.0 / math.sqrt(2.0)))) + a * torch.exp(-0.5 * a.square()) / math.sqrt(
        2.0 * math.pi)


def norm_act_adjoint_of_terms(terms: NormActTerms, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h̄ in ḡ's dtype, k̄ (B, C) in the statistics dtype) = Jᵀ ḡ of the forward that computed ``terms``."""
    n = terms.xhat.shape[2] * terms.xhat.shape[3]
    w = 1.0 / (terms.var + NORM_EPS)
    abar = grad_out.to(terms.a.dtype) * gelu_derivative(terms.a)
    q = (abar * terms.xhat).sum(dim=(2, 3), keepdim=True)
    u = terms.k * q / terms.s
    coef_x = (-terms.var.mean(dim=1, keepdim=True) * w.square() * u + (w * u).mean(dim=1, keepdim=True)) / n
    grad_h = terms.scale * (abar - abar.mean(dim=(2, 3), keepdim=True)) + coef_x * terms.xhat
    return grad_h.to(grad_out.dtype), (terms.s * q)[:, :, 0, 0]


def scaled_norm_act_adjoint_ref(h: torch.Tensor, k: torch.Tensor, grad_out: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h̄, k̄) = (∂z/∂h)ᵀ ḡ, (∂z/∂k)ᵀ ḡ of :func:`scaled_norm_act_ref`, differentiable again."""
    return norm_act_adjoint_of_terms(norm_act_forward_ref(h, k)[1], grad_out)


def norm_act_adjoint_ref(h: torch.Tensor, gain: torch.Tensor, modulation: torch.Tensor, grad_out: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h̄, m̄) = (∂z/∂h)ᵀ ḡ, (∂z/∂m)ᵀ ḡ of :func:`norm_act_ref` (m̄ = g k̄, in m's dtype), differentiable again."""
    grad_h, grad_k = scaled_norm_act_adjoint_ref(h, modulated_gain(h, gain, modulation), grad_out)
    return grad_h, (gain.to(grad_k.dtype) * grad_k).to(modulation.dtype)
