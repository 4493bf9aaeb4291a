"""Training routes: ways of computing the per-sample objective terms, all differentiable in θ.

Three orthogonal choices, each named once: the route (how ∇_y U and ∂_t U are formed), compilation
(:class:`Compiled`, ``--compile``) and precision (autocast, applied by the caller).

- ``reference``: eager autograd; ∇_y U and ∂_t U by ``autograd.grad(create_graph=True)`` and the loss's
  backward is a double backward through the network (the paper's way, the yardstick of every test). It cannot be
  compiled: torch.compile refuses a create_graph double backward.
- ``functional``: the inner gradient by ``torch.func.grad``: a first-order graph, so one plain backward through
  any engine is the whole double backward (see dsm_fast/engine.py); compiled, it is docs/method.md §6.2's torch.func +
  torch.compile row.
- ``fused``: the explicit adjoint of dsm_fast/model/adjoint.py: U, ∇_y U and ∂_t U from one ordinary forward
  graph (every layer's transposed Jacobian written out), so the loss's backward is a single first-order backward;
  NormAct and the loss terms optionally by the Triton kernels of dsm_fast.kernels.
- ``score``: the plain denoising-score-matching step of the same UNet used as a score network
  (D = y − t f(y, t), no double backward) — what a diffusion trainer pays; for benchmarks.
- ``auto`` (resolved once, by dsm_fast/config.py's ``resolve_route``): fused for the UNet energies with the dual
  or single objective, else reference; compiled on CUDA (``resolve_compile``).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from .config import FIRST_ORDER, ROUTES, ConfigError, resolve_kernels, resolve_route
from .losses import combine_terms, expand_like, objective_terms, space_term
from .model import GaussianStartEnergy, UNetEnergy, adjoint
from .model.energy import energy_and_scores

Terms = dict[str, torch.Tensor]


def noisy(x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """y = x + √t ε."""
    return x + torch.sqrt(expand_like(t, x)) * eps


class ReferenceRoute:
    """Eager double backward: the terms' graph contains autograd.grad(create_graph=True). The only route of
    'diffclf', whose classifier sees y_k = x + √t_k ε at the grid level t_k that t falls in (dsm_fast/diffclf.py)."""

    name = "reference"

    def __init__(self, model: nn.Module, objective: str = "dual", time_weight: float = 1.0):
        self.model, self.objective, self.time_weight = model, objective, time_weight

    def __call__(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> Terms:
        _, grad_y, grad_t = energy_and_scores(self.model, noisy(x, t, eps), t, create_graph=True)
        if self.objective != "diffclf":
            return objective_terms(self.objective, grad_y, grad_t, eps, t, self.time_weight)
        from .diffclf import grid_level

        level = grid_level(t, self.model.levels)
        logits = self.model.logits(noisy(x, self.model.levels[level].to(t.dtype), eps))
        return objective_terms(self.objective, grad_y, grad_t, eps, t, self.time_weight, logits, level)


class FunctionalRoute(ReferenceRoute):
    """The inner gradient by torch.func (a first-order graph)."""

    name = "functional"

    def __call__(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> Terms:
        def total_energy(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.model(y, t).sum()

        grad_y, grad_t = torch.func.grad(total_energy, argnums=(0, 1))(noisy(x, t, eps), t)
        return objective_terms(self.objective, grad_y, grad_t, eps, t, self.time_weight)


class FusedRoute(ReferenceRoute):
    """The explicit-adjoint graph (first-order in θ, no create_graph). ``kernels``: 'torch' (plain PyTorch),
    'triton' (NormAct forward/adjoint and the loss terms by the Triton kernels; interpreted on the CPU, which
    needs TRITON_INTERPRET=1), 'cuda' (NormAct forward/adjoint by the CUDA C++ extension, its second order and the
    loss terms by Triton) or 'auto' (Triton when the model is on CUDA and Triton is installed, else torch)."""

    name = "fused"

    def __init__(self, model: nn.Module, objective: str = "dual", time_weight: float = 1.0, kernels: str = "auto"):
        super().__init__(model, objective, time_weight)
        self.kernels = resolve_kernels(kernels, next(model.parameters()).device)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> Terms:
        _, grad_y, grad_t = adjoint.energy_and_scores(self.model, noisy(x, t, eps), t, self.kernels)
        if self.kernels == "torch":
            return objective_terms(self.objective, grad_y, grad_t, eps, t, self.time_weight)
        from .kernels.dual_score_loss import dual_score_loss

        space, time = dual_score_loss(grad_y, grad_t, eps, t)
        return combine_terms(self.objective, space, time=time, time_weight=self.time_weight)


class ScoreRoute:
    """Plain DSM of the UNet as a score network: loss = ‖√t f(y, t) − ε‖²/d, a single backward."""

    name = "score"

    def __init__(self, unet: nn.Module):
        self.unet = unet

    def __call__(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> Terms:
        space = space_term(self.unet(noisy(x, t, eps), t), eps, t)
        return {"loss": space, "space": space}


class Compiled:
    """torch.compile over a first-order route's whole terms function (network, scores, loss terms; AOTAutograd
    derives the backward). If compiling the forward or the backward fails, the eager route runs from then on, after
    one warning naming the reason (kept in ``fallback``). An error while the compiled step runs (an OOM, a failing
    check in the model) is not a compile failure: it propagates. ``mode`` and ``backend`` are torch.compile's
    ('reduce-overhead': its CUDA graphs; 'aot_eager': Dynamo and AOTAutograd without Inductor's code generation,
    what the CPU tests use; or a backend callable)."""

    def __init__(self, route, mode: str | None = None, backend="inductor"):
        if route.name not in FIRST_ORDER:
            raise ConfigError(f"route {route.name} cannot be compiled (torch.compile refuses its double backward); "
                              f"use --route {' or '.join(FIRST_ORDER[:2])}")
        self.route, self.name, self.fallback = route, route.name, None
        self._compiled = torch.compile(route, mode=mode, backend=backend)

    @property
    def fell_back(self) -> bool:
        return self.fallback is not None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> Terms:
        if self.fallback is None:
            try:
                with backward_compiled_with_forward():
                    return self._compiled(x, t, eps)
            except torch._dynamo.exc.TorchDynamoException as error:  # Dynamo's own, and the backend's (wrapped)
                self.fallback = compile_failure(error)
                warnings.warn(f"torch.compile of route {self.name} failed ({self.fallback}); running it eagerly",
                              RuntimeWarning, stacklevel=2)
        return self.route(x, t, eps)


def backward_compiled_with_forward():
    """AOTAutograd compiles the backward lazily, at the first ``loss.backward()``, outside :class:`Compiled`'s call
    and so outside its fallback; functorch's ``force_non_lazy_backward_lowering`` (torch 2.11 to 2.13 have it)
    compiles it with the forward instead, where a failure is caught. Without it the backward stays lazy."""
    from torch._functorch import config

    if hasattr(config, "force_non_lazy_backward_lowering"):
        return config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def compile_failure(error: Exception) -> str:
    """'Type: first line' of the exception behind a compile failure (a backend's, unwrapped from Dynamo's)."""
    cause = getattr(error, "inner_exception", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:200]}" if lines else type(cause).__name__


def make_route(name: str, model: nn.Module, objective: str = "dual", time_weight: float = 1.0, kernels: str = "auto",
               compile: bool = False, **compile_options):
    """The route called ``name`` ('auto' resolved) for ``model`` (an energy module U(y, t)); ``kernels`` applies
    to 'fused'; ``compile`` wraps it in :class:`Compiled`."""
    name = resolve_route(name, isinstance(model, (UNetEnergy, GaussianStartEnergy)), objective)
    if objective == "diffclf" and name != "reference":
        raise ConfigError(f"objective diffclf runs on the reference route only, not {name!r}")
    if name == "reference":
        route = ReferenceRoute(model, objective, time_weight)
    elif name == "functional":
        route = FunctionalRoute(model, objective, time_weight)
    elif name == "fused":
        route = FusedRoute(model, objective, time_weight, kernels)
    else:
        raise ValueError(f"unknown route {name!r}; choose from auto, {', '.join(ROUTES)}")
    return Compiled(route, **compile_options) if compile else route
