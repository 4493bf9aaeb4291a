"""Explicit-adjoint formulation of :class:`UNetEnergy`: U, ∇_y U and ∂_t U from one ordinary forward graph.

With f = f_θ(y, t) and U = ½ ⟨y, f⟩:

    ∇_y U = ½ f + ½ J_fᵀ y,        ∂_t U = ½ ⟨y, ∂_t f⟩ = ½ (∂_t emb)ᵀ J_embᵀ y.

Every layer has a forward and an explicit adjoint (its input-Jacobian transpose times an incoming gradient ḡ),
both written with plain differentiable ops on the SAME parameters as the eager network. The adjoint pass runs
backward through the layers with ḡ = y at the output; the modulation branch of every NormAct hands its share to
the noise embedding's adjoint, which ends in ∂_t U. Because nothing here calls autograd, a loss built on these
scores is a first-order graph in θ: its single ordinary backward is the reference route's double backward.

Layer adjoints (W the layer's weights):
    3×3 'same' conv      y = conv(h, W, pad 1)         h̄ = conv_transpose(ḡ, W, pad 1)
    2×2 'down' conv      y = conv(h, W, stride 2)      h̄ = conv_transpose(ḡ, W, stride 2)
    2×2 'up' transposed  y = conv_transpose(h, W, s 2) h̄ = conv(ḡ, W, stride 2)
    concat [h, skip]     split ḡ by channels; the skip's share adds to the encoder output's adjoint
    NormAct              see :func:`norm_act_adjoint`;  m = Linear(emb)  ⇒  ēmb += m̄ W
    noise embedding      see :func:`embedding_adjoint`
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import edm2_adjoint
from .edm2 import EDM2UNet
from .energy import UNetEnergy, sum_per_sample
from .gaussian import T_FLOOR, GaussianStartEnergy, noise_input
from .layers import NORM_EPS, ConvNormAct, NoiseEmbedding, normalization_scale

KERNELS = ("torch", "triton", "cuda")


def conv_forward(layer: ConvNormAct, h: torch.Tensor) -> torch.Tensor:
    """The layer's bias-free convolution: 3×3 'same', 2×2 stride-2 'down' or 2×2 stride-2 transposed 'up'."""
    w = layer.conv.weight
    if layer.kind == "same":
        return F.conv2d(h, w, padding=1)
    if layer.kind == "down":
        return F.conv2d(h, w, stride=2)
    return F.conv_transpose2d(h, w, stride=2)


def conv_adjoint(layer: ConvNormAct, g: torch.Tensor) -> torch.Tensor:
    """Jᵀ ḡ of the (linear) convolution: the transposed convolution with the same weights, and vice versa."""
    w = layer.conv.weight
    if layer.kind == "same":
        return F.conv_transpose2d(g, w, padding=1)
    if layer.kind == "down":
        return F.conv_transpose2d(g, w, stride=2)
    return F.conv2d(g, w, stride=2)


def gelu_derivative(a: torch.Tensor) -> torch.Tensor:
    """GELU'(a) = Φ(a) + a φ(a) for the exact (erf) GELU."""
    return 0.5 * (1.0 + torch.erf(a * (1.0 / math.sqrt(2.0)))) + a * torch.exp(-0.5 * a.square()) / math.sqrt(
        2.0 * math.pi)


def silu_derivative(z: torch.Tensor) -> torch.Tensor:
    """SiLU'(z) = σ(z) (1 + z (1 − σ(z)))."""
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def statistics_dtype(h: torch.Tensor) -> torch.dtype:
    """Statistics in float32 at least (float64 stays float64)."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def norm_act_forward(h: torch.Tensor, gain: torch.Tensor, modulation: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """z = GELU(a),  a_c = (h_c − μ_c) s_c k_c,  s_c = sqrt(V w_c + eps),  w_c = 1 / (v_c + eps),  V = mean_c v_c,
    k = g (1 + m).

    h: (B, C, H, W) conv output; gain g: (C,); modulation m: (B, C). Returns z in h's dtype and what the adjoint
    needs.
    """
    h32 = h.to(statistics_dtype(h))
    k = gain.to(h32.dtype) * (1.0 + modulation.to(h32.dtype))
    xhat = h32 - h32.mean(dim=(2, 3), keepdim=True)
    var = xhat.square().mean(dim=(2, 3), keepdim=True)
    big_v = var.mean(dim=1, keepdim=True)
    w = 1.0 / (var + NORM_EPS)
    s = normalization_scale(var)
    kk = k[:, :, None, None]
    scale = s * kk
    a = xhat * scale
    return F.gelu(a).to(h.dtype), (xhat, w, s, big_v, kk, scale, a, gain)


def norm_act_adjoint(saved: tuple, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h̄, m̄) = Jᵀ ḡ of :func:`norm_act_forward`, per image b and channel c over the n positions.

    Derivation. a_c = x̂_c s_c k_c with s_c² = V w_c + eps, so ∂s_c/∂V = w_c / (2 s_c) and ∂s_c/∂v_c (V fixed)
    = −V w_c² / (2 s_c); V = mean_c v_c, v_c = mean x̂_c², and x̂_c = h_c − μ_c centres (Σ x̂_c = 0, hence
    ∂v_c/∂h_c = 2 x̂_c / n). With ā = ḡ GELU'(a) and Q_c = Σ ā x̂_c:

        k̄_c = s_c Q_c,   m̄_c = g_c k̄_c,   s̄_c = k_c Q_c,   u_c = s̄_c / s_c
        v̄_c = ½ (−V w_c² u_c + mean_c' w_c' u_c')          (the second term: V's share, spread over the C channels)
        h̄_c = s_c k_c (ā − mean ā) + (2 v̄_c / n) x̂_c
            = s_c k_c (ā − mean ā) + (−V w_c² u_c + mean_c' w_c' u_c') / n · x̂_c

    s_c ≥ sqrt(eps) and w_c ≤ 1 / eps: no division by zero, also where V ≪ eps.
    """
    xhat, w, s, big_v, kk, scale, a, gain = saved
    n = xhat.shape[2] * xhat.shape[3]
    abar = g.to(a.dtype) * gelu_derivative(a)
    q = (abar * xhat).sum(dim=(2, 3), keepdim=True)
    grad_k = s * q
    u = kk * q / s
    coef_x = (-big_v * w.square() * u + (w * u).mean(dim=1, keepdim=True)) / n
    grad_h = scale * (abar - abar.mean(dim=(2, 3), keepdim=True)) + coef_x * xhat
    return grad_h.to(g.dtype), gain.to(grad_k.dtype) * grad_k[:, :, 0, 0]


def _kernel_ops(kernels: str) -> tuple:
    """(forward(h, k) → z, adjoint(h, k, ḡ) → (h̄, k̄)): the custom operators of kernels/norm_act.py ('triton') or of
    the CUDA C++ extension ('cuda', its second order by the Triton op); h, ḡ contiguous, k = g (1 + m)."""
    if kernels == "cuda":
        from ..cuda_ext import norm_act_adjoint_cuda_op, norm_act_cuda_op

        return norm_act_cuda_op, norm_act_adjoint_cuda_op
    from ..kernels.norm_act import norm_act_adjoint_op, norm_act_op

    return norm_act_op, norm_act_adjoint_op


def kernel_norm_act_forward(kernels: str, h: torch.Tensor, gain: torch.Tensor, modulation: torch.Tensor
                            ) -> tuple[torch.Tensor, tuple]:
    """:func:`norm_act_forward` by the ``kernels`` ops; k = g (1 + m) is formed once and kept for the adjoint."""
    from ..kernels.norm_act import modulated_gain

    forward, adjoint_op = _kernel_ops(kernels)
    h, k = h.contiguous(), modulated_gain(h, gain, modulation)
    return forward(h, k), (adjoint_op, h, k, gain)


def kernel_norm_act_adjoint(saved: tuple, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`norm_act_adjoint` by the ops of :func:`kernel_norm_act_forward`: (h̄, m̄ = g k̄)."""
    adjoint_op, h, k, gain = saved
    grad_h, grad_k = adjoint_op(h, k, g.contiguous())
    return grad_h, gain.to(grad_k.dtype) * grad_k


NORM_ACT_OPS = {"torch": (norm_act_forward, norm_act_adjoint),
                "triton": (functools.partial(kernel_norm_act_forward, "triton"), kernel_norm_act_adjoint),
                "cuda": (functools.partial(kernel_norm_act_forward, "cuda"), kernel_norm_act_adjoint)}


def embedding_forward(emb: NoiseEmbedding, t: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """e = SiLU(z₂), z₂ = W₂ SiLU(z₁) + b₂, z₁ = W₁ [cos(t f), sin(t f)] + b₁ (as NoiseEmbedding.forward)."""
    freqs = emb.frequencies(t)
    phase = t[:, None] * freqs
    z1 = emb.fc1(torch.cat([torch.cos(phase), torch.sin(phase)], dim=1))
    z2 = emb.fc2(F.silu(z1))
    return F.silu(z2), (freqs, phase, z1, z2)


def embedding_adjoint(emb: NoiseEmbedding, saved: tuple, e_bar: torch.Tensor) -> torch.Tensor:
    """t̄ = (de/dt)ᵀ ē:  z̄₂ = ē SiLU'(z₂),  z̄₁ = (z̄₂ W₂) SiLU'(z₁),  [c̄, s̄] = z̄₁ W₁,
    t̄ = Σ_k f_k (−c̄_k sin(t f_k) + s̄_k cos(t f_k))."""
    freqs, phase, z1, z2 = saved
    z2_bar = e_bar.to(z2.dtype) * silu_derivative(z2)
    z1_bar = (z2_bar @ emb.fc2.weight.to(z2_bar.dtype)) * silu_derivative(z1)
    cos_bar, sin_bar = (z1_bar @ emb.fc1.weight.to(z1_bar.dtype)).chunk(2, dim=1)
    return (freqs * (-cos_bar * torch.sin(phase) + sin_bar * torch.cos(phase))).sum(dim=1)


def gaussian_start_energy_and_scores(model: GaussianStartEnergy, y: torch.Tensor, t: torch.Tensor,
                                     kernels: str = "torch") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, ∇_y U, ∂_t U) of the Gaussian start (model/gaussian.py) by the chain rule around the inner UNet energy V:

        U = ‖c‖² / (2a²) + (d/2) log a² + V(ỹ, τ),   c = y − μ,  a² = t + s²,  ỹ = c / a,  τ = log(1 + t/δ)
        ∇_y U = c / a² + ∇_ỹ V / a
        ∂_t U = −‖c‖² / (2a⁴) + d / (2a²) − ⟨ỹ, ∇_ỹ V⟩ / (2a²) + ∂_τ V / (t + δ)     (∂ỹ/∂t = −ỹ / (2a²))
    """
    a2, centred, whitened = model.whiten(y, t)
    a2_image = a2.view(-1, *([1] * (y.dim() - 1))).to(y.dtype)
    inner_u, inner_grad_y, inner_grad_tau = energy_and_scores(model.inner, whitened, noise_input(t), kernels)
    squares, d = sum_per_sample(centred.square()).to(t.dtype), y[0].numel()
    energy = (squares / (2 * a2) + 0.5 * d * torch.log(a2)).to(y.dtype) + inner_u
    grad_y = centred / a2_image + inner_grad_y / torch.sqrt(a2_image)
    grad_t = (-squares / (2 * a2.square()) + d / (2 * a2) - sum_per_sample(whitened * inner_grad_y).to(t.dtype) / (2 * a2)
              + inner_grad_tau / (t + T_FLOOR))
    return energy, grad_y, grad_t


def energy_and_scores(model: UNetEnergy | GaussianStartEnergy, y: torch.Tensor, t: torch.Tensor,
                      kernels: str = "torch") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, ∇_y U, ∂_t U) of ``model`` at (y, t), all differentiable in θ through one first-order graph.

    U = ½ ⟨y, f⟩, ∇_y U = ½ (f + J_fᵀ y), ∂_t U = ½ t̄ with t̄ the embedding adjoint of the modulations' share (the
    Gaussian start: :func:`gaussian_start_energy_and_scores` around it).
    ``kernels``: 'torch' (the explicit adjoint in plain PyTorch), 'triton' (NormAct by kernels/norm_act.py) or 'cuda'
    (NormAct by csrc/, second order by the Triton op).
    """
    if isinstance(model, GaussianStartEnergy):
        return gaussian_start_energy_and_scores(model, y, t, kernels)
    if isinstance(model, UNetEnergy) and isinstance(model.unet, EDM2UNet):
        return edm2_adjoint.energy_and_scores(model, y, t, kernels)
    if not isinstance(model, UNetEnergy):
        raise TypeError(f"the explicit adjoint needs a UNetEnergy or GaussianStartEnergy, got {type(model).__name__}")
    if kernels not in NORM_ACT_OPS:
        raise ValueError(f"unknown kernels {kernels!r}; choose from {', '.join(KERNELS)}")
    forward, adjoint = NORM_ACT_OPS[kernels]
    unet = model.unet
    emb, emb_saved = embedding_forward(unet.embedding, t)
    tape: list[tuple[ConvNormAct, tuple | None]] = []

    def layer_forward(layer: ConvNormAct, h: torch.Tensor) -> torch.Tensor:
        h = conv_forward(layer, h)
        saved = None
        if layer.norm_act is not None:
            h, saved = forward(h, layer.norm_act.gain, layer.norm_act.modulation(emb))
        tape.append((layer, saved))
        return h

    e_bar = torch.zeros_like(emb)

    def layer_adjoint(g: torch.Tensor) -> torch.Tensor:
        nonlocal e_bar
        layer, saved = tape.pop()
        if saved is not None:  # m = W emb + b  ⇒  ēmb += m̄ W
            g, m_bar = adjoint(saved, g)
            e_bar = torch.addmm(e_bar, m_bar.to(emb.dtype), layer.norm_act.modulation.weight.to(emb.dtype))
        return conv_adjoint(layer, g)

    # forward: encoder (skips saved), middle, decoder (skip concatenated before each scale)
    h, skips, split = y, [], []
    for block in unet.encoder:
        for layer in block:
            h = layer_forward(layer, h)
        skips.append(h)
    for layer in unet.middle:
        h = layer_forward(layer, h)
    for block in unet.decoder:
        skip = skips.pop()
        split.append((h.shape[1], skip.shape[1]))
        h = torch.cat([h, skip], dim=1)
        for layer in block:
            h = layer_forward(layer, h)
    f = h.to(y.dtype)

    # adjoint: ḡ = y at the output, back through decoder (skip shares kept), middle, encoder (skip shares added)
    g, skip_bars = y, []
    for block in reversed(unet.decoder):
        for _ in block:
            g = layer_adjoint(g)
        g, skip_bar = g.split(split.pop(), dim=1)
        skip_bars.append(skip_bar)
    for _ in unet.middle:
        g = layer_adjoint(g)
    for block in reversed(unet.encoder):
        g = g + skip_bars.pop()
        for _ in block:
            g = layer_adjoint(g)

    energy = 0.5 * sum_per_sample(y * f)
    grad_y = 0.5 * (f + g.to(y.dtype))
    grad_t = 0.5 * embedding_adjoint(unet.embedding, emb_saved, e_bar).to(t.dtype)
    return energy, grad_y, grad_t
