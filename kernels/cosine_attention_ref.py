"""Cosine attention's softmax core in plain PyTorch: the one formula that the EDM2 model (dsm_fast/model/edm2.py),
its explicit adjoint (edm2_adjoint.py), the Triton kernels' tests and the profiler use (docs/method.md §4.7).
kernels/cosine_attention.py re-exports it as the reference of its Triton kernels; it lives in a module of its own
because it must import without Triton, which dsm_fast/model needs.

Per head (N = batch · heads of them), x = (q̂, k̂, v̂) the pixel-normed (the model's pixel norm over the c channels
of a head) queries, keys and values, each (c, L) over L = H·W tokens, stacked as x: (N, c, 3, L):

    S = q̂ᵀ k̂ / √c,   P = softmax_k(S),   o = v̂ Pᵀ                                       (N, c, L)

and its adjoint (the vector-Jacobian product with ō), with D = Σ_k P ⊙ P̄ = Σ_c ō ⊙ o per query:

    v̂̄ = ō P,   P̄ = ōᵀ v̂,   S̄ = P ⊙ (P̄ − D),   q̂̄ = k̂ S̄ᵀ / √c,   k̂̄ = q̂ S̄ / √c

written with differentiable ops, so that autograd through it gives the second derivatives (the kernels' reference).
"""
from __future__ import annotations

import math

import torch


def cosine_attention_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, P) of x = (q̂, k̂, v̂): (N, c, 3, L) → o (N, c, L), P (N, L_q, L_k); P is what the adjoint takes."""
    q, k, v = x.unbind(2)
    p = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(x.shape[1]), dim=-1)
    return v @ p.transpose(-1, -2), p


def cosine_attention_adjoint_ref(x: torch.Tensor, p: torch.Tensor, o_bar: torch.Tensor) -> torch.Tensor:
    """x̄ = (q̂̄, k̂̄, v̂̄): (N, c, 3, L) of :func:`cosine_attention_ref` given ō (N, c, L) and the forward's P."""
    q, k, v = x.unbind(2)
    v_bar = o_bar @ p
    p_bar = o_bar.transpose(-1, -2) @ v
    s_bar = p * (p_bar - (p * p_bar).sum(dim=-1, keepdim=True))
    scale = 1.0 / math.sqrt(x.shape[1])
    return torch.stack([(k @ s_bar.transpose(-1, -2)) * scale, (q @ s_bar) * scale, v_bar], dim=2)
