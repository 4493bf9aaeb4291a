"""Parity with the paper's released code: seeded weights and inputs, what every dsm_fast route computes from them,
a compact digest of it, and the comparison of two digests.

The recipe (``RECIPE``), regenerated identically from torch's CPU generator wherever it runs:
- weights: for each tensor of ``UNetEnergy(channels, 'paper')`` in state-dict order, one draw of
  ``randn(shape)`` from a generator seeded ``weight_seed``, scaled per kind so that no normalization sits at its
  eps (every layer's V between 0.01 and 0.3 at small t, ≫ 1e-5 at every t): convolutions √(3 / fan_in) (fan_in = shape[1]·k·k), gains 1 + 0.2·n,
  modulation weights 0.3/√fan_in, modulation biases 0.1·n, embedding weights 1.5/√fan_in, embedding biases 0.1·n;
- inputs: x = rand(B, C, H, W) in [0, 1] and ε = randn(B, C, H, W) from a generator seeded ``input_seed``;
- at each t of ``levels`` all B images share that t: y = x + √t ε, then U, ∇_y U, ∂_t U, the dual-score terms
  (space = ‖D − x‖²/(d t), time = (t ∂_t U/d − ½ + ‖y − x‖²/(2 d t))², λ = 1) and the gradient of their batch
  mean with respect to every weight.

The digest keeps, per t: U, ∂_t U, the space and time terms (B each); ‖∇_y U‖ and four projections ⟨∇_y U, P_k⟩
per image; ‖∂L/∂θ_i‖ and one projection ⟨∂L/∂θ_i, P_i⟩ per weight tensor i — the P drawn from a generator seeded
``projection_seed``. A projection's error is measured against ‖a‖‖P‖ (its largest possible size), every other
entry's against its own size.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..model import UNetEnergy, adjoint, energy_and_scores
from ..routes import FusedRoute, make_route, noisy
from .release import RELEASE_COMMIT, RELEASE_REPOSITORY

RECIPE = {"preset": "paper", "channels": 3, "images": 2, "size": 16, "levels": [1e-9, 1e-4, 1e-2, 1.0, 1e3],
          "weight_seed": 12, "input_seed": 1212, "projection_seed": 2024, "projections": 4, "dtype": "float64"}
SCALARS = ("energy", "grad_t", "space", "time")


def release_source() -> dict:
    """Where the golden values come from."""
    return {"repository": RELEASE_REPOSITORY, "commit": RELEASE_COMMIT}


def perturbed_state_dict(recipe: dict = RECIPE) -> dict[str, torch.Tensor]:
    """The recipe's weights (float64), in UNetEnergy's names and order."""
    g = torch.Generator().manual_seed(recipe["weight_seed"])
    out = {}
    for name, shape in weight_shapes(recipe).items():
        n = torch.randn(shape, generator=g, dtype=torch.float64)
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        if len(shape) == 4:
            out[name] = n * math.sqrt(3.0 / fan_in)
        elif name.endswith("gain"):
            out[name] = 1.0 + 0.2 * n
        elif "modulation" in name:
            out[name] = n * 0.3 / math.sqrt(fan_in) if name.endswith("weight") else 0.1 * n
        else:  # the noise embedding's two linears
            out[name] = n * 1.5 / math.sqrt(fan_in) if name.endswith("weight") else 0.1 * n
    return out


def inputs(recipe: dict = RECIPE) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, ε), each (B, C, H, W) float64."""
    g = torch.Generator().manual_seed(recipe["input_seed"])
    shape = (recipe["images"], recipe["channels"], recipe["size"], recipe["size"])
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    return x, torch.randn(shape, generator=g, dtype=torch.float64)


def weight_shapes(recipe: dict = RECIPE) -> dict[str, tuple[int, ...]]:
    """UNetEnergy's tensor shapes for the recipe (meta device: no memory)."""
    with torch.device("meta"):
        model = UNetEnergy(recipe["channels"], recipe["preset"])
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def projections(recipe: dict = RECIPE) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """P_k for ∇_y U ((K, C, H, W)) and one P_i per weight tensor, float64, from the projection seed."""
    g = torch.Generator().manual_seed(recipe["projection_seed"])
    image = (recipe["projections"], recipe["channels"], recipe["size"], recipe["size"])
    p_image = torch.randn(image, generator=g, dtype=torch.float64)
    return p_image, {name: torch.randn(shape, generator=g, dtype=torch.float64)
                     for name, shape in weight_shapes(recipe).items()}


# Evaluate(x, ε, t) → (U, ∇_y U, ∂_t U, space, time, {weight name: ∂L/∂θ}) for one level t (B,).
Evaluate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]


def digest(evaluate: Evaluate, recipe: dict = RECIPE, levels: list[float] | None = None,
           device: torch.device | str = "cpu") -> dict:
    """The recipe's digest of one implementation (inputs moved to ``device``), per level (all of
    ``recipe['levels']`` unless given); keys are the levels' repr."""
    x, eps = (v.to(device) for v in inputs(recipe))
    p_image, p_weights = projections(recipe)
    out = {}
    for level in recipe["levels"] if levels is None else levels:
        t = torch.full((x.shape[0],), level, dtype=torch.float64, device=device)
        energy, grad_y, grad_t, space, time, grads = (_cpu(v) for v in evaluate(x, eps, t))
        entry = {k: v.tolist() for k, v in zip(SCALARS, (energy, grad_t, space, time))}
        entry["grad_y_norm"] = grad_y.flatten(1).norm(dim=1).tolist()
        entry["grad_y_projection"] = torch.einsum("bchw,kchw->bk", grad_y, p_image).tolist()
        entry["weight_grad_norm"] = {k: grads[k].norm().item() for k in p_weights}
        entry["weight_grad_projection"] = {k: (grads[k] * p_weights[k]).sum().item() for k in p_weights}
        out[repr(level)] = entry
    return out


def _cpu(value):
    """Detached float64 CPU copies of a tensor or of a dict's tensors."""
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    return value.detach().double().cpu()


def _relative(actual: float, expected: float, scale: float | None = None) -> float:
    scale = abs(expected) if scale is None else scale
    return abs(actual - expected) / scale if scale else abs(actual - expected)


def compare(actual: dict, expected: dict, recipe: dict = RECIPE) -> dict[str, dict[str, tuple[float, str]]]:
    """Per level of ``actual``: {quantity: (worst relative error, where)} against ``expected``. Projections are
    measured against ‖a‖‖P‖, everything else against its own size."""
    p_image, p_weights = projections(recipe)
    p_image_norm = p_image.flatten(1).norm(dim=1).tolist()
    p_weight_norm = {k: v.norm().item() for k, v in p_weights.items()}
    report = {}
    for level, a in actual.items():
        e = expected[level]
        errors: dict[str, list[tuple[float, str]]] = {}
        for key in (*SCALARS, "grad_y_norm"):
            errors[key] = [(_relative(u, v), f"image {b}") for b, (u, v) in enumerate(zip(a[key], e[key]))]
        errors["grad_y_projection"] = [
            (_relative(a["grad_y_projection"][b][k], v, e["grad_y_norm"][b] * p_image_norm[k]), f"image {b}, P{k}")
            for b, row in enumerate(e["grad_y_projection"]) for k, v in enumerate(row)]
        errors["weight_grad_norm"] = [(_relative(a["weight_grad_norm"][k], v), k)
                                      for k, v in e["weight_grad_norm"].items()]
        errors["weight_grad_projection"] = [
            (_relative(a["weight_grad_projection"][k], v, e["weight_grad_norm"][k] * p_weight_norm[k]), k)
            for k, v in e["weight_grad_projection"].items()]
        report[level] = {key: max(rows) for key, rows in errors.items()}
    return report


def worst(report: dict) -> tuple[float, str]:
    """The largest error of a :func:`compare` report and where it is."""
    return max((err, f"t={level} {key} ({where})") for level, rows in report.items()
               for key, (err, where) in rows.items())


PARITY_ROUTES = ("reference", "functional", "fused-torch", "fused-triton")


def recipe_model(recipe: dict = RECIPE, device: torch.device | str = "cpu") -> UNetEnergy:
    """UNetEnergy in float64 holding the recipe's weights."""
    model = UNetEnergy(recipe["channels"], recipe["preset"]).to(device, torch.float64)
    model.load_state_dict(perturbed_state_dict(recipe))
    return model


def route_evaluator(model: UNetEnergy, route: str) -> Evaluate:
    """What dsm_fast's ``route`` computes at (x, ε, t): the scores by the route's own means (autograd, torch.func,
    or the explicit adjoint with torch or Triton ops), the terms and ∂L/∂θ by the training route itself."""
    if route not in PARITY_ROUTES:
        raise ValueError(f"unknown route {route!r}; choose from {', '.join(PARITY_ROUTES)}")
    name, _, kernels = route.partition("-")
    trainer = FusedRoute(model, kernels=kernels) if name == "fused" else make_route(name, model)

    def scores(y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if name == "reference":
            return energy_and_scores(model, y, t)
        if name == "functional":
            grad_y, grad_t = torch.func.grad(lambda y_, t_: model(y_, t_).sum(), argnums=(0, 1))(y, t)
            return model(y, t), grad_y, grad_t
        with torch.no_grad():
            return adjoint.energy_and_scores(model, y, t, kernels)

    def evaluate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple:
        energy, grad_y, grad_t = scores(noisy(x, t, eps), t)
        model.zero_grad(set_to_none=True)
        terms = trainer(x, t, eps)
        terms["loss"].mean().backward()
        grads = {k: p.grad for k, p in model.named_parameters()}
        return energy, grad_y, grad_t, terms["space"], terms["time"], grads

    return evaluate
