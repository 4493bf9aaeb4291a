"""Building blocks of the paper's energy UNet (method.md §1).

Every convolution is bias-free; every convolution but the last is followed by
:class:`NormAct` = Normalization × (1 + modulation(emb(t))) → GELU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-5


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


def normalization_scale(var: torch.Tensor) -> torch.Tensor:
    """s_c = sqrt(V / (v_c + eps) + eps), V = mean_c v_c (no eps on V): the released normalization's scale.

    var: (B, C, 1, 1) per-channel variances v_c, in the statistics dtype. s_c ≥ sqrt(eps) and v_c + eps ≥ eps, so
    nothing divides by zero, even where V ≪ eps (deep layers at initialization; V underflows to 0 harmlessly).
    """
    return torch.sqrt(var.mean(dim=1, keepdim=True) / (var + NORM_EPS) + NORM_EPS)


def normalize_ref(h: torch.Tensor, gain: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
    """The paper's Normalization (the released code's), per image and channel c over the spatial positions:

        out_c = x̂_c · sqrt(V / (v_c + eps) + eps) · g_c · (1 + m_c),   x̂_c = h_c − μ_c,  v_c = mean x̂_c²,  V = mean_c v_c

    h: (B, C, H, W); gain g: (C,); modulation m: (B, C). Statistics in float32 at least.
    """
    dtype = h.dtype
    h32 = h.float() if dtype in (torch.float16, torch.bfloat16) else h
    mean = h32.mean(dim=(2, 3), keepdim=True)
    centred = h32 - mean
    var = centred.square().mean(dim=(2, 3), keepdim=True)
    scale = normalization_scale(var) * gain.to(h32.dtype)[None, :, None, None]
    scale = scale * (1.0 + modulation.to(h32.dtype))[:, :, None, None]
    return (centred * scale).to(dtype)


class NormAct(nn.Module):
    """GELU(Normalization(h) · g · (1 + Linear(emb))): the layer every hidden convolution feeds.

    Initialization as in the released code: gains 1, the modulation Linear with PyTorch's default init (not zero).
    """

    def __init__(self, channels: int, emb_dim: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(channels))
        self.modulation = nn.Linear(emb_dim, channels)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return F.gelu(normalize_ref(h, self.gain, self.modulation(emb)))


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
