"""The paper's bias-free UNet f_θ(y, t) (docs/method.md §1.3) and its size presets.

Scale s of the encoder holds ``convs_per_block`` layers (the first of scales ≥ 1 is the 2×2 stride-2
down convolution); the middle is down → convs → up; each decoder scale takes the concatenated skip,
and all but the outermost end with a 2×2 transposed 'up' convolution. The outermost ends with a plain
3×3 convolution to C channels.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .layers import ConvNormAct, NoiseEmbedding


@dataclass(frozen=True)
class UNetPreset:
    widths: tuple[int, ...]  # channels at scale 0, 1, …, the last one is the middle block
    convs_per_block: int = 3
    emb_dim: int = 256
    n_freqs: int = 32


PRESETS: dict[str, UNetPreset] = {
    "paper": UNetPreset(widths=(64, 128, 256, 512)),
    "small": UNetPreset(widths=(32, 64, 128, 256), emb_dim=128),
    "tiny": UNetPreset(widths=(8, 16, 16, 32), convs_per_block=2, emb_dim=16, n_freqs=8),
}


class EnergyUNet(nn.Module):
    """f_θ(y, t): (B, C, H, W) × (B,) → (B, C, H, W); H and W must be multiples of 2^(len(widths) − 1).

    Layers are built in the released code's order (embedding, encoder, middle, decoder deepest first, each block
    first layer first) with PyTorch's default inits, so one seed gives the release's initial weights.
    """

    def __init__(self, channels: int = 3, preset: UNetPreset | str = "paper"):
        super().__init__()
        p = PRESETS[preset] if isinstance(preset, str) else preset
        if p.convs_per_block < 2:
            raise ValueError("convs_per_block must be at least 2")
        self.channels, self.preset = channels, p
        e, n = p.emb_dim, p.convs_per_block
        *enc_widths, mid_width = p.widths
        self.embedding = NoiseEmbedding(p.n_freqs, e)

        self.encoder = nn.ModuleList()
        c_prev = channels
        for scale, w in enumerate(enc_widths):
            first = ConvNormAct(c_prev, w, e, kind="same" if scale == 0 else "down")
            self.encoder.append(nn.ModuleList([first] + [ConvNormAct(w, w, e) for _ in range(n - 1)]))
            c_prev = w

        self.middle = nn.ModuleList(
            [ConvNormAct(c_prev, mid_width, e, kind="down")]
            + [ConvNormAct(mid_width, mid_width, e) for _ in range(n - 2)]
            + [ConvNormAct(mid_width, c_prev, e, kind="up")]
        )

        self.decoder = nn.ModuleList()
        for scale in reversed(range(len(enc_widths))):
            w = enc_widths[scale]
            layers = [ConvNormAct(2 * w, w, e)] + [ConvNormAct(w, w, e) for _ in range(n - 2)]
            layers.append(ConvNormAct(w, enc_widths[scale - 1], e, kind="up") if scale > 0
                          else ConvNormAct(w, channels, e, act=False))
            self.decoder.append(nn.ModuleList(layers))

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.preset.widths) - 1)

    def zero_output(self) -> None:
        """f ≡ 0: the last convolution's weights zeroed."""
        nn.init.zeros_(self.decoder[-1][-1].conv.weight)

    def walk(self, y: torch.Tensor, layer_fn: Callable[[ConvNormAct, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The network's order, h = layer_fn(layer, h) for each layer: the encoder (each scale's output kept as a
        skip), the middle, the decoder (the skip of its scale concatenated before each of its blocks)."""
        h, skips = y, []
        for block in self.encoder:
            for layer in block:
                h = layer_fn(layer, h)
            skips.append(h)
        for layer in self.middle:
            h = layer_fn(layer, h)
        for block in self.decoder:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in block:
                h = layer_fn(layer, h)
        return h

    def skip_channels(self) -> list[int]:
        """Channels of the skip each encoder scale hands to the decoder, outermost first."""
        return [block[-1].conv.out_channels for block in self.encoder]

    def forward(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(t)
        return self.walk(y, lambda layer, h: layer(h, emb))
