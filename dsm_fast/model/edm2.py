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

from ..kernels.cosine_attention_ref import attention_adjoint_ref, attention_ref

EPS = 1e-4  # weight and pixel normalization
MP_SILU_SCALE = 0.596  # E[SiLU(x)²]^½ for x ~ N(0, 1): SiLU / 0.596 keeps unit magnitude
CLIP = 256.0  # |activations| clipped after every block
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


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / MP_SILU_SCALE


def mp_silu_derivative(x: torch.Tensor) -> torch.Tensor:
    """d/dx SiLU(x) / 0.596 = σ(x) (1 + x (1 − σ(x))) / 0.596."""
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s)) / MP_SILU_SCALE


def mp_sum_weights(balance: float) -> tuple[float, float]:
    """(w_a, w_b) of mp_sum(a, b) = w_a a + w_b b = ((1 − β) a + β b) / √((1 − β)² + β²)."""
    norm = math.sqrt((1 - balance) ** 2 + balance ** 2)
    return (1 - balance) / norm, balance / norm


def mp_cat_weights(channels_a: int, channels_b: int, balance: float) -> tuple[float, float]:
    """(w_a, w_b) of mp_cat(a, b) = [w_a a, w_b b] along channels: w_a = s (1 − β) / √N_a, w_b = s β / √N_b,
    s = √((N_a + N_b) / ((1 − β)² + β²))."""
    scale = math.sqrt((channels_a + channels_b) / ((1 - balance) ** 2 + balance ** 2))
    return scale * (1 - balance) / math.sqrt(channels_a), scale * balance / math.sqrt(channels_b)


def statistics_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pixel_norm(x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / (ε + r), r),  r = ‖x‖_dim / √C_dim: unit magnitude along ``dim`` (norms in float32 at least)."""
    r = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=statistics_dtype(x)) / math.sqrt(x.shape[dim])
    return x / (EPS + r).to(x.dtype), r


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

    def normalized_weight(self, gain: torch.Tensor | float = 1.0) -> torch.Tensor:
        w = self.weight
        fan_in = w[0].numel()
        norm = torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True)
        return w * (gain / (math.sqrt(fan_in) * EPS + norm))

    def apply_weight(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        w = w.to(x.dtype)
        return x @ w.t() if w.dim() == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)

    def forward(self, x: torch.Tensor, gain: torch.Tensor | float = 1.0) -> torch.Tensor:
        return self.apply_weight(x, self.normalized_weight(gain))


def attention_ops(kernels: str) -> tuple:
    """(forward, adjoint) of cosine attention's softmax core, x = (q̂, k̂, v̂) (N, c, 3, L) ↦ (o, saved) and
    (x, saved, ō) ↦ x̄: kernels/cosine_attention_ref.py's PyTorch form ('torch'), or its Triton kernels
    (kernels/cosine_attention.py, 'triton')."""
    if kernels == "triton":
        from ..kernels.cosine_attention import attention, attention_adjoint

        return attention, attention_adjoint
    return attention_ref, attention_adjoint_ref


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


class Block(nn.Module):
    """EDM2's residual block, flavour 'enc' (skip 1×1 and pixel norm on the main branch first) or 'dec' (skip 1×1
    after the residual branch), with optional 'down'/'up' resampling and cosine self-attention:

        x ← resample(x);  enc: x ← pixnorm(skip(x))
        r = conv₁(mp_silu(conv₀(mp_silu(x)) ⊙ (1 + g_e W_e emb)));   dec: x ← skip(x)
        x ← mp_sum(x, r, 0.3);  attention: x ← mp_sum(x, proj(attn(qkv(x))), 0.3);  x ← clip(x, ±256)
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

    def run(self, x: torch.Tensor, emb: torch.Tensor, tape: list | None = None, kernels: str = "torch"
            ) -> torch.Tensor:
        """The block's output; with a ``tape``, appends the dict its adjoint (edm2_adjoint.block_adjoint) needs.
        ``kernels``: the attention's ('torch', 'triton': see :func:`attention_ops`)."""
        s: dict = {}
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                s["w_skip"] = self.conv_skip.normalized_weight()
                x = self.conv_skip.apply_weight(x, s["w_skip"])
            s["pre_norm"] = x
            x, s["r"] = pixel_norm(x)
        s["x"] = x
        s["w0"], s["w1"] = self.conv_res0.normalized_weight(), self.conv_res1.normalized_weight()
        s["w_emb"] = self.emb_linear.normalized_weight(self.emb_gain)
        s["h0"] = self.conv_res0.apply_weight(mp_silu(x), s["w0"])
        s["c"] = (1.0 + self.emb_linear.apply_weight(emb, s["w_emb"])).to(x.dtype)[:, :, None, None]
        s["m"] = s["h0"] * s["c"]
        r = self.conv_res1.apply_weight(mp_silu(s["m"]), s["w1"])
        if self.flavor == "dec" and self.conv_skip is not None:
            s["w_skip"] = self.conv_skip.normalized_weight()
            x = self.conv_skip.apply_weight(x, s["w_skip"])
        a, b = mp_sum_weights(RES_BALANCE)
        x = a * x + b * r
        if self.heads:
            s["w_qkv"], s["w_proj"] = self.attn_qkv.normalized_weight(), self.attn_proj.normalized_weight()
            o, s["attention"] = cosine_attention(self.attn_qkv.apply_weight(x, s["w_qkv"]), self.heads, kernels)
            a, b = mp_sum_weights(ATTN_BALANCE)
            x = a * x + b * self.attn_proj.apply_weight(o, s["w_proj"])
        s["inside"] = (x >= -CLIP) & (x <= CLIP)  # the clamp's mask, shared by the adjoint
        if tape is not None:
            tape.append(s)
        return x.clamp(-CLIP, CLIP)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.run(x, emb)


class NoiseEmbedding(nn.Module):
    """emb(t) = mp_silu(W · √2 cos(f c + φ)),  c = ⅛ ln(t + 1e-12)  (EDM2's c_noise = ¼ ln σ, σ = √t, floored);
    f = 2π N(0, 1) and φ ~ U[0, 2π) fixed buffers, W weight-normalized. t: (B,) → (B, emb_channels)."""

    def __init__(self, noise_channels: int, emb_channels: int):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(noise_channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(noise_channels))
        self.linear = MPConv(noise_channels, emb_channels, ())

    def run(self, t: torch.Tensor, tape: list | None = None) -> torch.Tensor:
        phase = 0.125 * torch.log(t + NOISE_FLOOR)[:, None] * self.freqs.to(t.dtype) + self.phases.to(t.dtype)
        w = self.linear.normalized_weight()
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

    def run(self, y: torch.Tensor, t: torch.Tensor, tape: list | None = None, kernels: str = "torch") -> torch.Tensor:
        """f(y, t); with a ``tape``, every layer appends what its adjoint needs, in forward order. ``kernels``: the
        attention's (:func:`attention_ops`)."""
        if y.shape[-1] % self.downsampling or y.shape[-2] % self.downsampling:
            raise ValueError(f"image size {tuple(y.shape[-2:])} is not a multiple of {self.downsampling}")
        emb = self.embedding.run(t, tape).to(y.dtype)
        w_in = self.conv_in.normalized_weight()
        x = self.conv_in.apply_weight(torch.cat([y, torch.ones_like(y[:, :1])], dim=1), w_in)
        skips = [x]
        for block in self.encoder:
            x = self.run_block(block, x, emb, tape, kernels)
            skips.append(x)
        for block, concat in zip(self.decoder, self.concat):
            if concat:
                skip = skips.pop()
                a, b = mp_cat_weights(x.shape[1], skip.shape[1], CONCAT_BALANCE)
                if tape is not None:
                    tape.append({"cat": (x.shape[1], skip.shape[1])})
                x = torch.cat([a * x, b * skip], dim=1)
            x = self.run_block(block, x, emb, tape, kernels)
        w_out = self.conv_out.normalized_weight(self.out_gain)
        if tape is not None:
            tape.append({"emb": emb, "w_in": w_in, "w_out": w_out})
        return self.conv_out.apply_weight(x, w_out)

    def run_block(self, block: Block, x: torch.Tensor, emb: torch.Tensor, tape: list | None, kernels: str = "torch"
                  ) -> torch.Tensor:
        """``block.run``; with a tape and ``checkpoint == 'block'`` (activation checkpointing of the explicit
        adjoint's graph) the tape holds only the block's input (and ``kernels``), the block runs under
        torch.utils.checkpoint, and the adjoint recomputes the block's entry from that input
        (edm2_adjoint.block_adjoint_from_tape)."""
        if tape is None or self.checkpoint == "none":
            return block.run(x, emb, tape, kernels)
        tape.append({"input": x, "kernels": kernels})
        return checkpoint(block.run, x, emb, None, kernels, use_reentrant=False)

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.run(y, t)
