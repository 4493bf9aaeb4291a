"""An EDM2-style attention UNet f_θ(y, t) (Karras et al. 2024, "magnitude-preserving" layers) for the energy
U = ½ ⟨y, f⟩ (docs/method.md §1.2), and its size presets. Our own code after the published architecture:

- no biases and no group norm; every convolution and linear map is weight-normalized **in the forward**,
  W = g · w / (√N ε + ‖w_o‖) per output row o (N the fan-in, ε = 1e-4): there is no in-place re-normalization
  of the stored weights (EDM2's "forced" one), so the same code runs under ZeRO partitioning and bf16 masters;
- pixel norm x / (ε + ‖x‖_c / √C) over channels (per position: no spatial statistics), mp_silu = SiLU / 0.596,
  magnitude-preserving sums and concatenations, cosine attention (q, k, v pixel-normed per head);
- the noise embedding enters each block as a per-channel factor (1 + e), e = a gain times a linear map of it;
- the noise input is EDM2's c_noise = ¼ ln σ with σ = √t, floored: c = ⅛ ln(t + 1e-12) (finite at t = 0, where
  the NLL reads log p), fed to fixed random Fourier features √2 cos(2π f c + φ) (f ~ N(0, 1), φ ~ U[0, 2π),
  buffers): over t ∈ [1e-9, 1e3] c spans [−2.6, 0.86], a feature's period being ~1.3 in ln t — resolved;
- the output and every embedding gain start at zero (EDM2's init): f ≡ 0 and U ≡ 0 at initialization;
- no class embedding, no dropout (so a recomputed block, under activation checkpointing, is the same block);
  activations clipped to ±256 as in EDM2 (its mask is the adjoint's too).

Every layer's forward can record what its explicit adjoint needs on a ``tape`` (dsm_fast/model/edm2_adjoint.py
runs it backwards); the eager forward is the same code with no tape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels.cosine_attention_ref import cosine_attention_adjoint_ref, cosine_attention_ref
from ..kernels.mp_block_ref import (  # noqa: F401 (EPS, MP_SILU_SCALE, mp_silu_derivative: re-exported)
    EPS,
    MP_SILU_SCALE,
    TORCH_OPS,
    BlockOps,
    mp_silu,
    mp_silu_derivative,
    pixel_norm,
    weight_norm_ref,
)

NOISE_FLOOR = 1e-12  # c = ⅛ ln(t + floor): finite at t = 0, far below t_min = 1e-9
RES_BALANCE, ATTN_BALANCE, CONCAT_BALANCE = 0.3, 0.3, 0.5


@dataclass(frozen=True)
class EDM2Preset:
    channels: int  # base width; level l has channels · mults[l]
    mults: tuple[int, ...] = (1, 2, 3, 4)
    blocks: int = 3  # residual blocks per resolution (the decoder has one more per level)
    attention_levels: tuple[int, ...] = (2, 3)  # levels with self-attention (16² and 8² at 64×64); the deepest
    # decoder's first block has it too
    head_channels: int = 64

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.channels * m for m in self.mults)


PRESETS: dict[str, EDM2Preset] = {
    "edm2-s": EDM2Preset(channels=192),
    "edm2-xs": EDM2Preset(channels=128),
    "edm2-tiny": EDM2Preset(channels=8, head_channels=8),
}


def mp_sum_weights(balance: float) -> tuple[float, float]:
    """(w_a, w_b) of mp_sum(a, b) = w_a a + w_b b = ((1 − β) a + β b) / √((1 − β)² + β²)."""
    norm = math.sqrt((1 - balance) ** 2 + balance ** 2)
    return (1 - balance) / norm, balance / norm


def mp_cat_weights(channels_a: int, channels_b: int, balance: float) -> tuple[float, float]:
    """(w_a, w_b) of mp_cat(a, b) = [w_a a, w_b b] along channels: w_a = s (1 − β) / √N_a, w_b = s β / √N_b,
    s = √((N_a + N_b) / ((1 − β)² + β²))."""
    scale = math.sqrt((channels_a + channels_b) / ((1 - balance) ** 2 + balance ** 2))
    return scale * (1 - balance) / math.sqrt(channels_a), scale * balance / math.sqrt(channels_b)


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """'down': 2×2 mean (EDM2's [1, 1] filter), 'up': nearest ×2, 'keep': x."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class MPConv(nn.Module):
    """A bias-free, weight-normalized convolution (kernel k×k, 'same' padding) or linear map (kernel ()).

    W = g · w / (√N ε + ‖w_o‖) per output row, N = fan-in: unit-magnitude rows times the gain g, formed anew in
    every forward from the stored w (initialized N(0, 1)) — never written back.
    """

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, *kernel))

    def normalized_weight(self, gain: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        """W times ``scale`` (a constant folded into the weight: an mp_sum's weight on this layer's output)."""
        return weight_norm_ref(self.weight, gain, scale)

    def apply_weight(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        w = w.to(x.dtype)
        return x @ w.t() if w.dim() == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)

    def forward(self, x: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
        return self.apply_weight(x, self.normalized_weight(gain))


def attention_ops(kernels: str) -> tuple:
    """(forward, adjoint) of cosine attention's softmax core, x = (q̂, k̂, v̂) (N, c, 3, L) ↦ (o, saved) and
    (x, saved, ō) ↦ x̄: kernels/cosine_attention_ref.py's PyTorch form ('torch'), or its Triton kernels
    (kernels/cosine_attention.py, 'triton')."""
    if kernels == "triton":
        from ..kernels import cosine_attention as ops

        return ops.cosine_attention, ops.cosine_attention_adjoint
    return cosine_attention_ref, cosine_attention_adjoint_ref


def cosine_attention(qkv: torch.Tensor, heads: int, kernels: str = "torch") -> tuple[torch.Tensor, tuple]:
    """o = v Pᵀ per head, P = softmax_k(q̂ᵀ k̂ / √c), q̂, k̂, v̂ the pixel-normed (over the c channels of a head)
    thirds of qkv: (B, 3hc, H, W) → (B, hc, H, W), channel (head, c, q|k|v) as EDM2 lays it out. Returns o and
    (y, r, x, saved, adjoint) for the adjoint: x = (q̂, k̂, v̂) per head and ``kernels``' adjoint of the core."""
    b, _, height, width = qkv.shape
    y = qkv.reshape(b, heads, -1, 3, height * width)
    normed, r = pixel_norm(y, dim=2)
    x = normed.flatten(0, 1)  # (B·h, c, 3, L)
    forward, adjoint = attention_ops(kernels)
    o, saved = forward(x)
    return o.reshape(b, -1, height, width), (y, r, x, saved, adjoint)


def normalized_weights(specs: list[tuple[MPConv, torch.Tensor | None, float]], ops: BlockOps = TORCH_OPS
                       ) -> dict[MPConv, torch.Tensor]:
    """Layer → its normalized weight for (layer, gain, scale) ``specs``, all formed in one ``ops.weight_norms``."""
    layers, gains, scales = zip(*specs)
    return dict(zip(layers, ops.weight_norms([layer.weight for layer in layers], list(gains), list(scales))))


class Block(nn.Module):
    """EDM2's residual block, flavour 'enc' (skip 1×1 and pixel norm on the main branch first) or 'dec' (skip 1×1
    after the residual branch), with optional 'down'/'up' resampling and cosine self-attention:

        x ← resample(x);  enc: x ← pixnorm(skip(x))
        r = conv₁(mp_silu(conv₀(mp_silu(x)) ⊙ c));   dec: x ← skip(x)
        x ← mp_sum(x, r, 0.3);  attention: x ← mp_sum(x, proj(attn(qkv(x))), 0.3);  x ← clip(x, ±256)

    with the modulation c = 1 + g_e W_e emb (B, C) formed for every block at once by EDM2UNet.modulations (its
    weights emb_gain and emb_linear live here).
    """

    def __init__(self, c_in: int, c_out: int, emb_channels: int, flavor: str, resample_mode: str = "keep",
                 heads: int = 0):
        super().__init__()
        self.flavor, self.resample_mode, self.heads = flavor, resample_mode, heads
        self.emb_gain = nn.Parameter(torch.zeros(1))  # shape (1,), not (): DeepSpeed broadcasts no 0-dim weight
        self.conv_res0 = MPConv(c_out if flavor == "enc" else c_in, c_out, (3, 3))
        self.emb_linear = MPConv(emb_channels, c_out, ())
        self.conv_res1 = MPConv(c_out, c_out, (3, 3))
        self.conv_skip = MPConv(c_in, c_out, (1, 1)) if c_in != c_out else None
        self.attn_qkv = MPConv(c_out, 3 * c_out, (1, 1)) if heads else None
        self.attn_proj = MPConv(c_out, c_out, (1, 1)) if heads else None

    def weight_specs(self) -> list[tuple[MPConv, torch.Tensor | None, float]]:
        """(layer, gain, scale) of each weight normalization of :meth:`run` (emb_linear's is the network's, in
        EDM2UNet.modulations): the mp_sum weights b on the residual and attention branches are folded into
        conv_res1's and attn_proj's weights."""
        specs = [(self.conv_res0, None, 1.0), (self.conv_res1, None, mp_sum_weights(RES_BALANCE)[1])]
        if self.conv_skip is not None:
            specs.append((self.conv_skip, None, 1.0))
        if self.heads:
            specs += [(self.attn_qkv, None, 1.0), (self.attn_proj, None, mp_sum_weights(ATTN_BALANCE)[1])]
        return specs

    def run(self, x: torch.Tensor, c: torch.Tensor, w: dict | None = None, tape: list | None = None,
            ops: BlockOps = TORCH_OPS) -> torch.Tensor:
        """The block's output; with a ``tape``, appends the dict its adjoint (edm2_adjoint.block_adjoint) needs.
        ``w``: layer → normalized weight (:meth:`weight_specs`; None: formed here, by one ``ops.weight_norms``);
        ``ops``: the elementwise chains in PyTorch or by kernels/mp_block.py's kernels."""
        w = normalized_weights(self.weight_specs(), ops) if w is None else w
        s: dict = {"w0": w[self.conv_res0], "w1": w[self.conv_res1]}
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                s["w_skip"] = w[self.conv_skip]
                x = self.conv_skip.apply_weight(x, s["w_skip"])
            s["pre_norm"] = x
            x, silu_x, s["r"] = ops.pixel_norm_silu(x)
        else:
            silu_x = ops.mod_silu(x, None)
        s["x"], s["h0"], s["c"] = x, self.conv_res0.apply_weight(silu_x, s["w0"]), c
        r = self.conv_res1.apply_weight(ops.mod_silu(s["h0"], c), s["w1"])  # b · conv₁(mp_silu(h₀ ⊙ c))
        if self.flavor == "dec" and self.conv_skip is not None:
            s["w_skip"] = w[self.conv_skip]
            x = self.conv_skip.apply_weight(x, s["w_skip"])
        a, _ = mp_sum_weights(RES_BALANCE)
        if self.heads:
            x = ops.masked_sum(x, r, None, a, 1.0)
            a, _ = mp_sum_weights(ATTN_BALANCE)
            s["w_qkv"], s["w_proj"] = w[self.attn_qkv], w[self.attn_proj]
            o, s["attention"] = cosine_attention(self.attn_qkv.apply_weight(x, s["w_qkv"]), self.heads, ops.name)
            r = self.attn_proj.apply_weight(o, s["w_proj"])
        x, s["inside"] = ops.mp_sum_clip(x, r, a, 1.0)  # the clamp's mask, shared by the adjoint
        if tape is not None:
            tape.append(s)
        return x

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.run(x, c)


class NoiseEmbedding(nn.Module):
    """emb(t) = mp_silu(W · √2 cos(f c + φ)),  c = ⅛ ln(t + 1e-12)  (EDM2's c_noise = ¼ ln σ, σ = √t, floored);
    f = 2π N(0, 1) and φ ~ U[0, 2π) fixed buffers, W weight-normalized. t: (B,) → (B, emb_channels)."""

    def __init__(self, noise_channels: int, emb_channels: int):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(noise_channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(noise_channels))
        self.linear = MPConv(noise_channels, emb_channels, ())

    def run(self, t: torch.Tensor, tape: list | None = None, w: torch.Tensor | None = None) -> torch.Tensor:
        """emb(t); ``w``: the linear map's normalized weight, if formed already."""
        phase = 0.125 * torch.log(t + NOISE_FLOOR)[:, None] * self.freqs.to(t.dtype) + self.phases.to(t.dtype)
        w = self.linear.normalized_weight() if w is None else w
        z = self.linear.apply_weight(math.sqrt(2.0) * torch.cos(phase), w)
        if tape is not None:
            tape.append({"phase": phase, "w": w, "z": z})
        return mp_silu(z)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.run(t)


class EDM2UNet(nn.Module):
    """f_θ(y, t): (B, C, H, W) × (B,) → (B, C, H, W), EDM2's layout: level l (resolution H / 2^l) has ``blocks``
    encoder blocks (levels ≥ 1 start with a 'down' block); the decoder has two blocks at the deepest level (the
    first with attention), an 'up' block at the others, then ``blocks`` + 1 blocks each taking an encoder output
    by mp_cat. The input carries a constant ones channel. H and W: multiples of 2^(levels − 1).

    Attention sits at the preset's levels (EDM2's 16² and 8² at 64×64 are levels 2 and 3), so one network runs
    at every image size the levels allow.
    """

    def __init__(self, channels: int = 3, preset: EDM2Preset | str = "edm2-s"):
        super().__init__()
        p = PRESETS[preset] if isinstance(preset, str) else preset
        self.channels, self.preset = channels, p
        widths, emb_channels = p.widths, max(p.widths)
        self.out_gain = nn.Parameter(torch.zeros(1))  # shape (1,), not (): DeepSpeed broadcasts no 0-dim weight
        self.embedding = NoiseEmbedding(widths[0], emb_channels)
        self.conv_in = MPConv(channels + 1, widths[0], (3, 3))

        def heads(level: int, width: int) -> int:
            return width // p.head_channels if level in p.attention_levels else 0

        self.encoder, self.decoder = nn.ModuleList(), nn.ModuleList()
        skips, c = [widths[0]], widths[0]
        for level, width in enumerate(widths):
            if level > 0:
                self.encoder.append(Block(c, c, emb_channels, "enc", "down"))
                skips.append(c)
            for _ in range(p.blocks):
                self.encoder.append(Block(c, width, emb_channels, "enc", heads=heads(level, width)))
                c = width
                skips.append(c)
        self.concat: list[bool] = []  # per decoder block: whether it takes an encoder output by mp_cat first
        for level in reversed(range(len(widths))):
            if level == len(widths) - 1:
                self.decoder.extend([Block(c, c, emb_channels, "dec", heads=c // p.head_channels),
                                     Block(c, c, emb_channels, "dec")])
                self.concat += [False, False]
            else:
                self.decoder.append(Block(c, c, emb_channels, "dec", "up"))
                self.concat.append(False)
            for _ in range(p.blocks + 1):
                c_in, c = c + skips.pop(), widths[level]
                self.decoder.append(Block(c_in, c, emb_channels, "dec", heads=heads(level, c)))
                self.concat.append(True)
        self.conv_out = MPConv(c, channels, (3, 3))
        self.checkpoint = "none"  # 'block': a taped forward keeps only each block's input (see run_block)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.preset.widths) - 1)

    def zero_output(self) -> None:
        """f ≡ 0 (so already at initialization: the output gain starts at zero)."""
        with torch.no_grad():
            self.out_gain.zero_()

    def run(self, y: torch.Tensor, t: torch.Tensor, tape: list | None = None, ops: BlockOps = TORCH_OPS
            ) -> torch.Tensor:
        """f(y, t); with a ``tape``, every layer appends what its adjoint needs, in forward order; ``ops`` as in
        :meth:`Block.run`."""
        if y.shape[-1] % self.downsampling or y.shape[-2] % self.downsampling:
            raise ValueError(f"image size {tuple(y.shape[-2:])} is not a multiple of {self.downsampling}")
        w = normalized_weights(self.weight_specs(blocks=self.checkpoint == "none" or tape is None), ops)
        emb = self.embedding.run(t, tape, w[self.embedding.linear]).to(y.dtype)
        w_mod, mods = self.modulations(emb, w)
        w_in = w[self.conv_in]
        x = self.conv_in.apply_weight(torch.cat([y, torch.ones_like(y[:, :1])], dim=1), w_in)
        skips, mods = [x], iter(mods)
        for block in self.encoder:
            x = self.run_block(block, x, next(mods), w, tape, ops)
            skips.append(x)
        for block, concat in zip(self.decoder, self.concat):
            if concat:
                skip = skips.pop()
                a, b = mp_cat_weights(x.shape[1], skip.shape[1], CONCAT_BALANCE)
                if tape is not None:
                    tape.append({"cat": (x.shape[1], skip.shape[1])})
                x = torch.cat([a * x, b * skip], dim=1)
            x = self.run_block(block, x, next(mods), w, tape, ops)
        w_out = w[self.conv_out]
        if tape is not None:
            tape.append({"emb": emb, "w_mod": w_mod, "w_in": w_in, "w_out": w_out})
        return self.conv_out.apply_weight(x, w_out)

    @property
    def blocks(self) -> list[Block]:
        """The encoder's blocks, then the decoder's: the forward's order."""
        return [*self.encoder, *self.decoder]

    def weight_specs(self, blocks: bool = True) -> list[tuple[MPConv, torch.Tensor | None, float]]:
        """(layer, gain, scale) of the network's weight normalizations, the blocks' own included if ``blocks``
        (activation checkpointing forms those inside each recomputed block instead)."""
        return [(self.embedding.linear, None, 1.0), (self.conv_in, None, 1.0), (self.conv_out, self.out_gain, 1.0),
                *((b.emb_linear, b.emb_gain, 1.0) for b in self.blocks),
                *(spec for b in self.blocks if blocks for spec in b.weight_specs())]

    def modulations(self, emb: torch.Tensor, w: dict) -> tuple[torch.Tensor, tuple]:
        """(W = [g_e W_e] of every block stacked (ΣC, E), each block's c = 1 + g_e W_e emb (B, C)): one matrix
        product for all blocks; the c are column slices of one (B, ΣC) result (:attr:`blocks` order)."""
        blocks = self.blocks
        w_mod = torch.cat([w[b.emb_linear] for b in blocks])
        c = 1.0 + emb @ w_mod.t().to(emb.dtype)
        return w_mod, c.split([b.emb_linear.weight.shape[0] for b in blocks], dim=1)

    def run_block(self, block: Block, x: torch.Tensor, c: torch.Tensor, w: dict, tape: list | None,
                  ops: BlockOps = TORCH_OPS) -> torch.Tensor:
        """``block.run``; with a tape and ``checkpoint == 'block'`` (activation checkpointing of the explicit
        adjoint's graph) the tape holds only the block's input, the block runs under torch.utils.checkpoint, and
        the adjoint recomputes the block's entry from that input (edm2_adjoint.block_adjoint_from_tape)."""
        if tape is None or self.checkpoint == "none":
            return block.run(x, c, w, tape, ops)
        tape.append({"input": x, "c": c})
        return checkpoint(block.run, x, c, None, None, ops, use_reentrant=False)

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.run(y, t)
