"""The EDM2-style block's elementwise chains in plain PyTorch (docs/method.md §4.7): the one formula that the model
(dsm_fast/model/edm2.py), its explicit adjoint ('torch' kernels), the Triton kernels' tests and kernels/mp_block.py
use. A module of its own because the model must import it without Triton (an optional dependency).

    weight normalization    W = s · g · w / (√N ε + ‖w_o‖) per output row o, N the fan-in, ε = 1e-4 (one weight, or
                            every weight of a network at once)
    pixel norm              x̂ = x / n,  n = ε + r,  r = ‖x‖_c / √C over the channels at each position
    mp_silu                 σ(x) = SiLU(x) / 0.596,  σ′(x) = S (1 + x (1 − S)) / 0.596,  S = sigmoid(x)
    modulated mp_silu       σ(h ⊙ c), c (B, C) broadcast over the positions
    magnitude-preserving sum with the clip:  v = a x + b y,  clip(v, ±256) and its mask |v| ≤ 256

and the adjoints the explicit adjoint runs (ḡ the incoming gradient):

    pixel norm ∘ mp_silu    Nᵀ(α p + v ⊙ σ′(x̂)),   Nᵀ q = q / n − x ⟨q, x⟩ / (n² C r)   (enc blocks, ⟨·⟩ over channels)
    modulated mp_silu       (α p + u ⊙ σ′(h c) ⊙ c,   c̄ = Σ_positions u ⊙ σ′(h c) ⊙ h)
    masked sum              (a x + b y) ⊙ mask   (the clip's adjoint, the attention branch's mp_sum)

Statistics (r, the channel sums) in float32 at least; x̂ = x / n, so where r = 0 (x = 0) the second term of Nᵀ is 0
(r clamped to the smallest normal number there).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .norm_act_ref import statistics_dtype

EPS = 1e-4  # weight and pixel normalization
MP_SILU_SCALE = 0.596  # E[SiLU(x)²]^½ for x ~ N(0, 1): SiLU / 0.596 keeps unit magnitude
CLIP = 256.0  # |activations| clipped after every block


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / MP_SILU_SCALE


def mp_silu_derivative(x: torch.Tensor) -> torch.Tensor:
    """d/dx SiLU(x) / 0.596 = S (1 + x (1 − S)) / 0.596, S = sigmoid(x)."""
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s)) / MP_SILU_SCALE


def pixel_norm(x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / (ε + r), r),  r = ‖x‖_dim / √C_dim: unit magnitude along ``dim`` (norms in float32 at least)."""
    r = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=statistics_dtype(x.dtype)) / math.sqrt(x.shape[dim])
    return x / (EPS + r).to(x.dtype), r


def pixel_norm_adjoint(x: torch.Tensor, r: torch.Tensor, g: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x̄ = ḡ / n − x ⟨ḡ, x⟩ / (n² C r) of y = x / n, n = ε + r, r = ‖x‖ / √C along ``dim`` (∂r/∂x = x / (C r));
    where r = 0, x = 0 and the second term is 0 (r clamped to the smallest normal number)."""
    n = EPS + r
    dot = (g * x).sum(dim=dim, keepdim=True).to(r.dtype)
    coef = dot / (n.square() * x.shape[dim] * r.clamp_min(torch.finfo(r.dtype).tiny))
    return g / n.to(g.dtype) - x * coef.to(x.dtype)


def weight_norm_ref(w: torch.Tensor, gain: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """W = s · g · w / (√N ε + ‖w_o‖) per output row o (N = w[0].numel(); g = 1 when ``gain`` is None)."""
    norm = torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True)
    factor = scale if gain is None else gain * scale
    return w * (factor / (math.sqrt(w[0].numel()) * EPS + norm))


def weight_norms_ref(weights: list[torch.Tensor], gains: list[torch.Tensor | None], scales: list[float]
                     ) -> list[torch.Tensor]:
    """Every weight normalization of a network in one call: [weight_norm_ref(w, g, s) for each (w, g, s)]."""
    return [weight_norm_ref(w, g, s) for w, g, s in zip(weights, gains, scales)]


def pixel_norm_silu_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x̂, σ(x̂), r) of x (B, C, H, W): the pixel norm over channels, its mp_silu, r (B, 1, H, W)."""
    xn, r = pixel_norm(x)
    return xn, mp_silu(xn), r


def pixel_norm_silu_adjoint_ref(x: torch.Tensor, r: torch.Tensor, p: torch.Tensor | None, alpha: float,
                                v: torch.Tensor) -> torch.Tensor:
    """Nᵀ(α p + v ⊙ σ′(x̂)) at x (x̂ = x / (ε + r)): the gradient at the pixel norm's input given α p at x̂ and v at
    σ(x̂); p None counts as zero."""
    q = v * mp_silu_derivative(x / (EPS + r).to(x.dtype))
    return pixel_norm_adjoint(x, r, q if p is None else alpha * p + q)


def mod_silu_ref(h: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """σ(h ⊙ c) of h (B, C, H, W) and c (B, C) (None: σ(h))."""
    return mp_silu(h if c is None else h * c[:, :, None, None])


def mod_silu_adjoint_ref(h: torch.Tensor, c: torch.Tensor | None, u: torch.Tensor, p: torch.Tensor | None,
                         alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(α p + u ⊙ σ′(h c) ⊙ c,  c̄ = Σ_positions u ⊙ σ′(h c) ⊙ h (B, C)) for c (B, C); c None: (α p + u ⊙ σ′(h), an
    empty c̄); p None counts as zero."""
    if c is None:
        gm, c_bar = u * mp_silu_derivative(h), h.new_empty(0)
    else:
        cc = c[:, :, None, None]
        gm = u * mp_silu_derivative(h * cc)
        c_bar = (gm * h).sum(dim=(2, 3)).to(c.dtype)
        gm = gm * cc
    return (gm if p is None else alpha * p + gm), c_bar


def mp_sum_clip_ref(x: torch.Tensor, y: torch.Tensor, a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip(a x + b y, ±256), the mask |a x + b y| ≤ 256): the block's last mp_sum and clip."""
    v = a * x + (y if b == 1.0 else b * y)
    return v.clamp(-CLIP, CLIP), (v >= -CLIP) & (v <= CLIP)


def masked_sum_ref(x: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor | None, a: float, b: float
                   ) -> torch.Tensor:
    """(a x + b y) ⊙ mask (y None: a x; mask None: no mask)."""
    v = x if a == 1.0 else a * x
    if y is not None:
        v = v + (y if b == 1.0 else b * y)
    return v if mask is None else v * mask


@dataclass(frozen=True)
class BlockOps:
    """The EDM2 block's elementwise chains, one implementation each: these plain-PyTorch ones (``TORCH_OPS``) or
    kernels/mp_block.py's Triton custom ops (``TRITON_OPS`` there), same signatures and formulas; ``name`` the
    kernels choice ('torch', 'triton'), which the attention's core follows too."""

    name: str
    weight_norms: Callable
    pixel_norm_silu: Callable
    pixel_norm_silu_adjoint: Callable
    mod_silu: Callable
    mod_silu_adjoint: Callable
    mp_sum_clip: Callable
    masked_sum: Callable


TORCH_OPS = BlockOps("torch", weight_norms_ref, pixel_norm_silu_ref, pixel_norm_silu_adjoint_ref, mod_silu_ref,
                     mod_silu_adjoint_ref, mp_sum_clip_ref, masked_sum_ref)
