"""The optional CUDA C++ extension ``dsm_fast._cuda`` (built from csrc/ by setup.py), behind ``is_available()``.

``resolve('auto')`` falls back quietly when the extension is missing or there is no GPU; ``resolve('on')`` and
``require()`` fail loudly with the reason. The ops take k = g (1 + m) of shape (B, C) in the statistics dtype
(float64 for float64 h, else float32) and contiguous CUDA tensors; they are plain (non-autograd) kernels.
"""
from __future__ import annotations

import importlib

import torch

MODES = ("auto", "on", "off")


def _import():
    try:
        return importlib.import_module("dsm_fast._cuda"), None
    except ImportError as error:
        return None, (f"the CUDA extension dsm_fast._cuda is not built ({error}); reinstall on a machine with nvcc "
                      "and a CUDA build of torch: DSM_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .")


def unavailable_reason() -> str | None:
    """Why the extension cannot run here, or None when it can."""
    module, reason = _import()
    if module is None:
        return reason
    if not torch.cuda.is_available():
        return "the CUDA extension is built but no CUDA device is visible"
    return None


def is_available() -> bool:
    return unavailable_reason() is None


def require():
    """The extension module; RuntimeError with the reason when it cannot run here."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return _import()[0]


def resolve(mode: str) -> bool:
    """Whether to use the extension: 'auto' (if available, quietly), 'on' (required, loud), 'off'."""
    if mode == "auto":
        return is_available()
    if mode == "on":
        require()
        return True
    if mode == "off":
        return False
    raise ValueError(f"unknown CUDA extension mode {mode!r}; choose from {', '.join(MODES)}")


def norm_act_forward(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """z = GELU(x̂ s k) by csrc/norm_act.cu (s = sqrt(V / (v + eps) + eps))."""
    return require().norm_act_forward(h, k)


def norm_act_adjoint(h: torch.Tensor, k: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h̄, k̄) = Jᵀ ḡ of :func:`norm_act_forward` by csrc/norm_act.cu."""
    grad_h, grad_k = require().norm_act_adjoint(h, k, grad_out)
    return grad_h, grad_k
