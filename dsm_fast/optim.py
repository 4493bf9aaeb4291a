"""Optimizer, learning-rate schedule and EMA of the weights.

Adam with the paper's defaults; torch's fused implementation on CUDA, NVIDIA apex's FusedAdam when it
is installed and asked for (apex is not on the package registry, so it is never required).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError


def apex_available() -> bool:
    try:
        from apex.optimizers import FusedAdam  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def make_optimizer(params, lr: float, choice: str, device: torch.device, capturable: bool = False
                   ) -> tuple[torch.optim.Optimizer, str]:
    """(optimizer, a label saying which ran). ``choice``: auto | torch | apex (apex fails loudly if absent).
    torch's Adam is the fused one (CPU and CUDA): it skips a non-finite step on the device. ``capturable``: its
    learning rate is a device tensor and its step can be captured in a CUDA graph (not with apex)."""
    params = list(params)
    use_apex = choice == "apex" or (choice == "auto" and device.type == "cuda" and apex_available() and not capturable)
    if use_apex:
        if not apex_available():
            raise ConfigError("--optimizer apex asked for, but apex.optimizers.FusedAdam is not importable on CUDA")
        from apex.optimizers import FusedAdam

        return FusedAdam(params, lr=lr, adam_w_mode=False), "apex FusedAdam"
    if capturable:
        lr_tensor = torch.tensor(lr, device=device)
        return torch.optim.Adam(params, lr=lr_tensor, fused=True, capturable=True), "torch Adam (fused, capturable)"
    return torch.optim.Adam(params, lr=lr, fused=True), "torch Adam (fused)"


def learning_rate(step: int, base_lr: float, halve_every: int, warmup_steps: int) -> float:
    """lr(s) = base · 2^(−⌊s / halve_every⌋) · min(1, (s + 1) / warmup)."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return base_lr * 0.5 ** (step // halve_every) * warmup


class EMA:
    """θ_ema ← β θ_ema + (1 − β) θ after every optimizer step (``ok`` false on the device: left as it is)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, ok: torch.Tensor) -> None:
        names, current = zip(*model.named_parameters())
        weight = (1.0 - self.decay) * ok.to(current[0].dtype)
        torch._foreach_lerp_([self.params[n] for n in names], [p.detach() for p in current], weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.params)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.params[name].copy_(value)
