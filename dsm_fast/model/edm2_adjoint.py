"""Explicit adjoint of the EDM2-style UNet energy (model/edm2.py): U, ∇_y U and ∂_t U from one ordinary forward
graph, as model/adjoint.py does for the paper's UNet (docs/method.md §4, §4.7 for the EDM2 layers):

    ∇_y U = ½ f + ½ J_fᵀ y,        ∂_t U = ½ ⟨y, ∂_t f⟩ = ½ (∂_t emb)ᵀ J_embᵀ y.

The forward runs once with a tape (every layer appends what its adjoint needs, the normalized weights included,
so each weight normalization is formed once per step and shared by both passes); the adjoint pops the tape with
ḡ = y at the output. Layer adjoints, ḡ the incoming gradient:

    weight-normalized conv  y = conv(x, W)                 x̄ = conv_transpose(ḡ, W)   (linear: x̄ = ḡ W)
    pixel norm              y = x / n,  n = ε + r,  r = ‖x‖ / √C      x̄ = ḡ / n − x ⟨ḡ, x⟩ / (n² C r)
    mp_silu                 y = SiLU(x) / 0.596                       x̄ = ḡ SiLU′(x) / 0.596
    mp_sum, mp_cat          linear: the same weights on ḡ (mp_cat: split ḡ by channels)
    modulation              m = h ⊙ c,  c = 1 + g_e W_e emb           h̄ = ḡ c,  c̄ = Σ_pixels ḡ h,  ēmb = Σ_blocks c̄ g_e W_e
    2×2 mean / nearest ×2   each other's adjoint, up to the factor 4
    clip to ±256            ḡ on the forward's mask (|x| ≤ 256), the same mask
    cosine attention        see :func:`attention_adjoint`;   noise embedding: see :func:`embedding_adjoint`

The elementwise chains run in plain PyTorch ('torch' kernels) or as kernels/mp_block.py's Triton custom ops
('triton'): a :class:`~dsm_fast.kernels.mp_block_ref.BlockOps` chosen once per call. No autograd call anywhere: a
loss on these scores is first-order in θ, and its one backward equals the reference route's double backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..kernels.mp_block_ref import TORCH_OPS, BlockOps, mp_silu_derivative, pixel_norm_adjoint
from .edm2 import (
    ATTN_BALANCE,
    CONCAT_BALANCE,
    NOISE_FLOOR,
    RES_BALANCE,
    Block,
    EDM2UNet,
    NoiseEmbedding,
    mp_cat_weights,
    mp_sum_weights,
)
from .energy import UNetEnergy, sum_per_sample

KERNELS = ("torch", "triton")  # 'triton': the blocks' elementwise chains, attention and the loss terms by Triton


def conv_adjoint(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Jᵀ ḡ of x ↦ conv(x, W) ('same' padding) or x ↦ x Wᵀ: the transposed convolution with the same W, or ḡ W."""
    w = w.to(g.dtype)
    return g @ w if w.dim() == 2 else F.conv_transpose2d(g, w, padding=w.shape[-1] // 2)


def resample_adjoint(g: torch.Tensor, mode: str) -> torch.Tensor:
    """Adjoint of 'down' (2×2 mean): nearest ×2 over 4; of 'up' (nearest ×2): the 2×2 sum."""
    if mode == "down":
        return F.interpolate(g, scale_factor=2.0, mode="nearest") / 4
    if mode == "up":
        return 4 * F.avg_pool2d(g, 2)
    return g


def attention_adjoint(saved: tuple, o_bar: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv̄ of :func:`dsm_fast.model.edm2.cosine_attention` given ō (B, hc, H, W): the adjoint of its softmax core
    that the forward chose (kernels/cosine_attention_ref.py or its Triton kernels; per head, P = softmax(S),
    S = q̂ᵀ k̂ / √c, o = v̂ Pᵀ):

        v̂̄ = ō P,   P̄ = ōᵀ v̂,   S̄ = P ⊙ (P̄ − Σ_k P P̄),   q̂̄ = k̂ S̄ᵀ / √c,   k̂̄ = q̂ S̄ / √c,

    then the pixel norm's adjoint over each head's c channels back to the qkv layout.
    """
    y, r, x, core, adjoint = saved
    b, _, height, width = o_bar.shape
    x_bar = adjoint(x, core, o_bar.reshape(x.shape[0], x.shape[1], height * width))
    y_bar = pixel_norm_adjoint(y, r, x_bar.reshape(y.shape), dim=2)
    return y_bar.reshape(b, -1, height, width)


def block_adjoint(block: Block, s: dict, g: torch.Tensor, ops: BlockOps = TORCH_OPS
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̄, c̄) of :meth:`Block.run` given ḡ at its output and its tape entry ``s`` (the forward's order,
    reversed: clip, attention, mp_sum, residual branch with the modulation, skip, pixel norm, resampling). The
    mp_sum weights b on the branches are in w1 and w_proj (Block.run), so conv_adjoint(w1, ḡ) is already b ·."""
    g = ops.masked_sum(g, None, s["inside"], 1.0, 0.0)
    if block.heads:
        a, _ = mp_sum_weights(ATTN_BALANCE)
        o_bar = conv_adjoint(s["w_proj"], g)
        g = ops.masked_sum(g, conv_adjoint(s["w_qkv"], attention_adjoint(s["attention"], o_bar, block.heads)), None,
                           a, 1.0)
    a, _ = mp_sum_weights(RES_BALANCE)
    g_h0, c_bar = ops.mod_silu_adjoint(s["h0"], s["c"], conv_adjoint(s["w1"], g), None, 0.0)
    g_silu = conv_adjoint(s["w0"], g_h0)  # ḡ at mp_silu(x)
    if block.flavor == "enc":  # x̂ = pixnorm(pre_norm) feeds both branches: ḡ_x̂ = a ḡ + ḡ_silu σ′(x̂)
        g_x = ops.pixel_norm_silu_adjoint(s["pre_norm"], s["r"], g, a, g_silu)
        if block.conv_skip is not None:
            g_x = conv_adjoint(s["w_skip"], g_x)
    else:  # x feeds the skip (a ·, after conv_skip if any) and mp_silu
        g_skip = g if block.conv_skip is None else conv_adjoint(s["w_skip"], g)
        g_x, _ = ops.mod_silu_adjoint(s["x"], None, g_silu, g_skip, a)
    return resample_adjoint(g_x, block.resample_mode), c_bar


def block_adjoint_from_tape(block: Block, entry: dict, g: torch.Tensor, ops: BlockOps = TORCH_OPS
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_adjoint` from the block's tape entry; an entry holding only the block's input (activation
    checkpointing, EDM2UNet.run_block) is recomputed, the block's forward and adjoint under one checkpoint: the
    parameter backward keeps x, emb and ḡ per block and runs both again."""
    if "input" not in entry:
        return block_adjoint(block, entry, g, ops)

    def recompute_and_adjoint(x: torch.Tensor, c: torch.Tensor, g: torch.Tensor):
        tape: list[dict] = []
        block.run(x, c, None, tape, ops)
        return block_adjoint(block, tape[0], g, ops)

    return checkpoint(recompute_and_adjoint, entry["input"], entry["c"], g, use_reentrant=False)


def embedding_adjoint(embedding: NoiseEmbedding, s: dict, e_bar: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t̄ = (d emb / dt)ᵀ ē of emb = mp_silu(z), z = W √2 cos(φ), φ = ⅛ ln(t + δ) · f + φ₀:

        z̄ = ē mp_silu′(z),   φ̄ = −√2 sin(φ) ⊙ (z̄ W),   t̄ = Σ_k φ̄_k f_k / (8 (t + δ)).
    """
    z_bar = e_bar.to(s["z"].dtype) * mp_silu_derivative(s["z"])
    phase_bar = -math.sqrt(2.0) * torch.sin(s["phase"]) * (z_bar @ s["w"].to(z_bar.dtype)).to(s["phase"].dtype)
    return (phase_bar * embedding.freqs.to(t.dtype)).sum(dim=1) * 0.125 / (t + NOISE_FLOOR)


def energy_and_scores(model: UNetEnergy, y: torch.Tensor, t: torch.Tensor, kernels: str = "torch"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, ∇_y U, ∂_t U) of an EDM2 UNet energy, all differentiable in θ through one first-order graph.

    ``kernels``: 'torch' runs the layers and their adjoints in plain PyTorch; 'triton' runs the blocks' elementwise
    chains and the weight normalizations by kernels/mp_block.py's custom ops, cosine attention's softmax core
    (forward, adjoint and, under the loss's backward, the adjoint's backward) by kernels/cosine_attention.py's, and
    the fused route's loss terms by the loss kernel; 'cuda' has no EDM2 ops: refused.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels {kernels!r} has no EDM2 ops; choose from {', '.join(KERNELS)}")
    if kernels == "triton":
        from ..kernels.mp_block import TRITON_OPS as ops
    else:
        ops = TORCH_OPS
    unet: EDM2UNet = model.unet
    tape: list[dict] = []
    f = unet.run(y, t, tape, ops).to(y.dtype)

    final = tape.pop()
    g = conv_adjoint(final["w_out"], y)
    c_bars, skip_bars = [], []  # c̄ per block, in reverse order
    for block, concat in zip(reversed(unet.decoder), reversed(unet.concat)):
        g, c_bar = block_adjoint_from_tape(block, tape.pop(), g, ops)
        c_bars.append(c_bar)
        if concat:  # mp_cat([x, skip]): split ḡ by channels, each share times its weight
            channels_x, channels_skip = tape.pop()["cat"]
            a, b = mp_cat_weights(channels_x, channels_skip, CONCAT_BALANCE)
            g, skip_bar = g.split((channels_x, channels_skip), dim=1)
            g = a * g
            skip_bars.append(b * skip_bar)
    for block in reversed(unet.encoder):
        g, c_bar = block_adjoint_from_tape(block, tape.pop(), g + skip_bars.pop(), ops)
        c_bars.append(c_bar)
    g = conv_adjoint(final["w_in"], g + skip_bars.pop())[:, : y.shape[1]]  # the ones channel is constant

    energy = 0.5 * sum_per_sample(y * f)
    grad_y = 0.5 * (f + g.to(y.dtype))
    e_bar = torch.cat(c_bars[::-1], dim=1) @ final["w_mod"].to(c_bars[0].dtype)  # ēmb = Σ_blocks c̄ g_e W_e
    grad_t = 0.5 * embedding_adjoint(unet.embedding, tape.pop(), e_bar, t).to(t.dtype)
    return energy, grad_y, grad_t
