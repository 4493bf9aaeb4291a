"""The optional CUDA C++ extension ``dsm_fast._cuda`` (built from csrc/ by setup.py), behind ``is_available()``.

``resolve('auto')`` falls back quietly when the extension is missing or there is no GPU; ``resolve('on')`` and
``require()`` fail loudly with the reason. The ops take k = g (1 + m) of shape (B, C) in the statistics dtype
(float64 for float64 h, else float32) and contiguous CUDA tensors.

As the fused route's ``kernels='cuda'`` backend they are custom operators (torch.library) like the Triton ones:
dsm_fast::norm_act_cuda, whose backward is dsm_fast::norm_act_adjoint_cuda, whose backward — the second order — is
the Triton op dsm_fast::norm_act_adjoint_backward (kernels/norm_act.py).
"""
from __future__ import annotations

import importlib

import torch

from .config import SWITCH


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
    raise ValueError(f"unknown CUDA extension mode {mode!r}; choose from {', '.join(SWITCH)}")


def norm_act_forward(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """z = GELU(x̂ s k) by csrc/norm_act.cu (s = sqrt(V / (v + eps) + eps))."""
    return require().norm_act_forward(h, k)


def norm_act_adjoint(h: torch.Tensor, k: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h̄, k̄) = Jᵀ ḡ of :func:`norm_act_forward` by csrc/norm_act.cu."""
    grad_h, grad_k = require().norm_act_adjoint(h, k, grad_out)
    return grad_h, grad_k


# --- the fused route's 'cuda' backend: custom operators, second order by the Triton op ---------------------------
@torch.library.custom_op("dsm_fast::norm_act_cuda", mutates_args=(), device_types="cuda")
def norm_act_cuda_op(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return norm_act_forward(h, k)


@torch.library.custom_op("dsm_fast::norm_act_adjoint_cuda", mutates_args=(), device_types="cuda")
def norm_act_adjoint_cuda_op(h: torch.Tensor, k: torch.Tensor, grad_out: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    return norm_act_adjoint(h, k, grad_out)


@norm_act_cuda_op.register_fake
def _(h, k):
    return torch.empty_like(h)


@norm_act_adjoint_cuda_op.register_fake
def _(h, k, grad_out):
    return torch.empty_like(h), torch.empty_like(k)


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _forward_backward(ctx, grad_z):
    h, k = ctx.saved_tensors
    return norm_act_adjoint_cuda_op(h, k, grad_z.contiguous())


def _adjoint_backward(ctx, grad_grad_h, grad_grad_k):
    from .kernels.norm_act import adjoint_second_order, norm_act_statistics_op  # registers the Triton ops

    h, k, grad_out = ctx.saved_tensors
    return adjoint_second_order(h, k, *norm_act_statistics_op(h.detach()), grad_out, grad_grad_h, grad_grad_k)


torch.library.register_autograd("dsm_fast::norm_act_cuda", _forward_backward, setup_context=_save_inputs)
torch.library.register_autograd("dsm_fast::norm_act_adjoint_cuda", _adjoint_backward, setup_context=_save_inputs)
