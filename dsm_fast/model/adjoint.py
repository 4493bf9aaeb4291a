"""Explicit-adjoint formulation of :class:`UNetEnergy`: U, ∇_y U and ∂_t U from one ordinary forward graph
(docs/method.md §4).

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
    NormAct              kernels/norm_act_ref.py's norm_act_adjoint_of_terms (or its kernels): (h̄, k̄);
                         k = g (1 + m), m = Linear(emb)  ⇒  m̄ = g k̄,  ēmb += m̄ W
    noise embedding      see :func:`embedding_adjoint`
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..kernels.norm_act_ref import modulated_gain, norm_act_adjoint_of_terms, norm_act_forward_ref
from . import edm2_adjoint
from .edm2 import EDM2UNet
from .energy import UNetEnergy, sum_per_sample
from .gaussian import T_FLOOR, GaussianStartEnergy, noise_input
from .layers import ConvNormAct, NoiseEmbedding

# layer kind → (its convolution, that convolution's transpose), both taking (input, weight) (docs/method.md §4.3):
# a bias-free convolution is linear, so Jᵀ ḡ is the transposed operator with the same weights, and vice versa.
CONVOLUTIONS = {"same": (functools.partial(F.conv2d, padding=1), functools.partial(F.conv_transpose2d, padding=1)),
                "down": (functools.partial(F.conv2d, stride=2), functools.partial(F.conv_transpose2d, stride=2)),
                "up": (functools.partial(F.conv_transpose2d, stride=2), functools.partial(F.conv2d, stride=2))}


def conv_forward(layer: ConvNormAct, h: torch.Tensor) -> torch.Tensor:
    """The layer's bias-free convolution: 3×3 'same', 2×2 stride-2 'down' or 2×2 stride-2 transposed 'up'."""
    return CONVOLUTIONS[layer.kind][0](h, layer.conv.weight)


def conv_adjoint(layer: ConvNormAct, g: torch.Tensor) -> torch.Tensor:
    """Jᵀ ḡ of the layer's convolution: its transpose with the same weights."""
    return CONVOLUTIONS[layer.kind][1](g, layer.conv.weight)


def silu_derivative(z: torch.Tensor) -> torch.Tensor:
    """SiLU'(z) = σ(z) (1 + z (1 − σ(z)))."""
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _kernel_ops(kernels: str) -> tuple:
    """(forward(h, k) → (z, h for the adjoint, h's statistics), adjoint(h, k, statistics, ḡ) → (h̄, k̄)): the custom
    operators of kernels/norm_act.py ('triton': the forward hands h on to the adjoint, so that its backward adds h's
    two gradients in one pass, and the adjoint takes the forward's μ, v instead of reducing h again, and reads a
    channel slice ḡ in place) or of the CUDA C++ extension ('cuda': it reduces h itself, statistics empty; its
    second order by the Triton op); h contiguous, k = g (1 + m)."""
    if kernels == "cuda":
        from ..cuda_ext import norm_act_adjoint_cuda_op, norm_act_cuda_op

        return (lambda h, k: (norm_act_cuda_op(h, k), h, ()),
                lambda h, k, statistics, g: norm_act_adjoint_cuda_op(h, k, g.contiguous()))
    from ..kernels.norm_act import NormActHandingOn, norm_act_adjoint_op

    def forward(h, k):
        z, mean, var, h_on = NormActHandingOn.apply(h, k)
        return z, h_on, (mean, var)

    return forward, lambda h, k, statistics, g: norm_act_adjoint_op(h, k, *statistics, g)


def kernel_norm_act_forward(kernels: str, h: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """(z, what :func:`kernel_norm_act_adjoint` needs): :func:`norm_act_forward_ref` by the ``kernels`` ops."""
    forward, adjoint_op = _kernel_ops(kernels)
    z, h, statistics = forward(h.contiguous(), k)
    return z, (adjoint_op, h, k, statistics)


def kernel_norm_act_adjoint(saved: tuple, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h̄, k̄): :func:`norm_act_adjoint_of_terms` by the ops of :func:`kernel_norm_act_forward`."""
    adjoint_op, h, k, statistics = saved
    return adjoint_op(h, k, statistics, g)


# kernels → (forward(h, k) → (z, saved), adjoint(saved, ḡ) → (h̄, k̄)) of NormAct, k = g (1 + m) of shape (B, C)
NORM_ACT_OPS = {"torch": (norm_act_forward_ref, norm_act_adjoint_of_terms),
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
    """t̄ = (de/dt)ᵀ ē (docs/method.md §4.5):  z̄₂ = ē SiLU'(z₂),  z̄₁ = (z̄₂ W₂) SiLU'(z₁),  [c̄, s̄] = z̄₁ W₁,
    t̄ = Σ_k f_k (−c̄_k sin(t f_k) + s̄_k cos(t f_k))."""
    freqs, phase, z1, z2 = saved
    z2_bar = e_bar.to(z2.dtype) * silu_derivative(z2)
    z1_bar = (z2_bar @ emb.fc2.weight.to(z2_bar.dtype)) * silu_derivative(z1)
    cos_bar, sin_bar = (z1_bar @ emb.fc1.weight.to(z1_bar.dtype)).chunk(2, dim=1)
    return (freqs * (-cos_bar * torch.sin(phase) + sin_bar * torch.cos(phase))).sum(dim=1)


def gaussian_start_energy_and_scores(model: GaussianStartEnergy, y: torch.Tensor, t: torch.Tensor,
                                     kernels: str = "torch") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, ∇_y U, ∂_t U) of the Gaussian start (docs/method.md §1.6) by the chain rule around the inner UNet energy V:

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
    grad_t = (-squares / (2 * a2.square()) + d / (2 * a2)
              - sum_per_sample(whitened * inner_grad_y).to(t.dtype) / (2 * a2) + inner_grad_tau / (t + T_FLOOR))
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
        raise ValueError(f"unknown kernels {kernels!r}; choose from {', '.join(NORM_ACT_OPS)}")
    forward, adjoint = NORM_ACT_OPS[kernels]
    unet = model.unet
    emb, emb_saved = embedding_forward(unet.embedding, t)
    tape: list[tuple[ConvNormAct, tuple | None]] = []

    def layer_forward(layer: ConvNormAct, h: torch.Tensor) -> torch.Tensor:
        h = conv_forward(layer, h)
        saved = None
        if layer.norm_act is not None:
            h, saved = forward(h, modulated_gain(h, layer.norm_act.gain, layer.norm_act.modulation(emb)))
        tape.append((layer, saved))
        return h

    e_bar = torch.zeros_like(emb)

    def layer_adjoint(g: torch.Tensor) -> torch.Tensor:
        nonlocal e_bar
        layer, saved = tape.pop()
        if saved is not None:  # k = g (1 + m), m = W emb + b  ⇒  m̄ = g k̄,  ēmb += m̄ W
            g, k_bar = adjoint(saved, g)
            m_bar = layer.norm_act.gain.to(k_bar.dtype) * k_bar
            e_bar = torch.addmm(e_bar, m_bar.to(emb.dtype), layer.norm_act.modulation.weight.to(emb.dtype))
        return conv_adjoint(layer, g)

    f = unet.walk(y, layer_forward).to(y.dtype)  # the layers taped in the network's order

    # adjoint: ḡ = y at the output, back through decoder (skip shares kept), middle, encoder (skip shares added)
    g, skip_bars = y, []
    for block, skip_channels in zip(reversed(unet.decoder), unet.skip_channels()):
        for _ in block:
            g = layer_adjoint(g)
        g, skip_bar = g.split([g.shape[1] - skip_channels, skip_channels], dim=1)
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
