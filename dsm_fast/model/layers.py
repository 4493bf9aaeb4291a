"""Building blocks of the paper's energy UNet (docs/method.md §1.3–§1.5).

Every convolution is bias-free; every convolution but the last is followed by
:class:`NormAct` = Normalization × (1 + modulation(emb(t))) → GELU, whose formula is kernels/norm_act_ref.py's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.norm_act_ref import norm_act_ref


class NoiseEmbedding(nn.Module):
    """emb(t) = SiLU(W2 · SiLU(W1 · [cos(t f_k), sin(t f_k)]_k)),  f = exp(−linspace(log 1, log 100, n)).

    ``t`` is the raw noise variance (not log t), shape (B,); returns (B, dim).
    """

    def __init__(self, n_freqs: int = 32, dim: int = 256):
        super().__init__()
        self.n_freqs = n_freqs
        self.fc1 = nn.Linear(2 * n_freqs, dim)
        self.fc2 = nn.Linear(dim, dim)

    def frequencies(self, t: torch.Tensor) -> torch.Tensor:
        """f_k = exp(−linspace(log 1, log 100, n)_k), computed in float32 on t's device at each call as the released
        code does (torch.logspace(0, −2, n) differs from it by one float32 ulp in some f_k), then cast to t's dtype."""
        grid = torch.linspace(0.0, math.log(100.0), self.n_freqs, dtype=torch.float32, device=t.device)
        return torch.exp(-grid).to(t.dtype)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        phase = t[:, None] * self.frequencies(t)
        features = torch.cat([torch.cos(phase), torch.sin(phase)], dim=1)
        return F.silu(self.fc2(F.silu(self.fc1(features))))


class NormAct(nn.Module):
    """GELU(Normalization(h) · g · (1 + Linear(emb))): the layer every hidden convolution feeds (docs/method.md §1.4),

        z_c = GELU(x̂_c · sqrt(V / (v_c + eps) + eps) · g_c · (1 + m_c)),   x̂_c = h_c − μ_c,  v_c = mean x̂_c²,
        V = mean_c v_c,

    per image and channel c over the spatial positions, statistics in float32 at least (:func:`norm_act_ref`).

    Initialization as in the released code: gains 1, the modulation Linear with PyTorch's default init (not zero).
    """

    def __init__(self, channels: int, emb_dim: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(channels))
        self.modulation = nn.Linear(emb_dim, channels)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return norm_act_ref(h, self.gain, self.modulation(emb))


class ConvNormAct(nn.Module):
    """A bias-free convolution (3×3 'same', 2×2 stride-2 'down' or 2×2 stride-2 transposed 'up') then NormAct.

    With ``act=False`` it is the network's last layer: the convolution alone.
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, kind: str = "same", act: bool = True):
        super().__init__()
        self.kind = kind
        if kind == "same":
            self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        elif kind == "down":
            self.conv = nn.Conv2d(c_in, c_out, 2, stride=2, bias=False)
        elif kind == "up":
            self.conv = nn.ConvTranspose2d(c_in, c_out, 2, stride=2, bias=False)
        else:
            raise ValueError(f"unknown convolution kind {kind!r}")
        self.norm_act = NormAct(c_out, emb_dim) if act else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv(h)
        return h if self.norm_act is None else self.norm_act(h, emb)
