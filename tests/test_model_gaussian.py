"""--energy gaussian: at initialization the model is exactly the energy of N(μ, (s² + t) I), with its scores; the
explicit adjoint's chain rule around it equals autograd; the statistics are the training pixels' and travel with
the checkpoint; the options it cannot take are refused."""
import math

import pytest
import torch

from dsm_fast.config import ConfigError, TrainConfig
from dsm_fast.evaluate import evaluate_nll
from dsm_fast.model import GaussianStartEnergy, adjoint, build_model
from dsm_fast.model.energy import energy_and_scores
from dsm_fast.routes import FusedRoute, ReferenceRoute, make_route
from dsm_fast.tools.testing import TOLERANCES, assert_rel_close, parameter_gradients, perturbed


def test_it_starts_as_the_gaussian_energy_with_its_scores():
    torch.manual_seed(0)
    model = build_model("tiny", channels=1, energy="gaussian").double()
    mean, var = 0.37, 0.055
    model.set_data_statistics(mean, var)
    y = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    t = torch.tensor([1e-9, 1.0, 1e3], dtype=torch.float64)
    energy, grad_y, grad_t = energy_and_scores(model, y, t)
    a2, d, r2 = t + var, y[0].numel(), (y - mean).square().sum(dim=(1, 2, 3))
    torch.testing.assert_close(energy, r2 / (2 * a2) + 0.5 * d * torch.log(a2), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(grad_y, (y - mean) / a2.view(-1, 1, 1, 1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(grad_t, -r2 / (2 * a2 ** 2) + d / (2 * a2), rtol=1e-12, atol=1e-9)


def test_its_initial_nll_is_the_gaussian_nll_of_the_data():
    # log p(x) = log N(x; μ, s² I), up to the t_max protocol's one-draw estimate of the constant
    model = build_model("tiny", channels=1, energy="gaussian").double()
    x = torch.rand(64, 1, 16, 16, dtype=torch.float64) * 0.5 + 0.2
    mean, var = float(x.mean()), float(x.var())
    model.set_data_statistics(mean, var)
    d = x[0].numel()
    exact = ((x - mean).square().sum(dim=(1, 2, 3)) / (2 * var) + 0.5 * d * math.log(2 * math.pi * var)).mean()
    nll = evaluate_nll(model, x, quantized=True, t_max=1e3)["nll_bits_per_dim"]
    assert abs(nll - (8 + float(exact) / (d * math.log(2)))) < 0.03  # one noise draw per image: ≈ 0.01 of MC error


def test_statistics_and_weights_survive_a_state_dict_round_trip():
    model = GaussianStartEnergy(1, "tiny")
    model.set_data_statistics(0.25, 0.01)
    other = GaussianStartEnergy(1, "tiny")
    other.load_state_dict(model.state_dict())
    assert float(other.data_mean) == 0.25 and float(other.data_variance) == pytest.approx(0.01)
    assert other.unet.downsampling == 8


@pytest.mark.parametrize("changes, message", [
    ({"model": "radial", "data": "gsm"}, "UNet preset"),
    ({"energy": "flat"}, "energy must be"),
])
def test_options_it_cannot_take_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(energy=changes.pop("energy", "gaussian"), **changes).validate()


def test_fused_route_equals_the_reference_in_float64(seed):
    """Every weight moved off its initial value (the last convolution off zero), data statistics off the defaults,
    t at 1e-9, 1 and 1e3: U, ∇_y U, ∂_t U and the dual loss's parameter gradients of the explicit adjoint's chain
    rule equal autograd's (the reference route's double backward); the chain rule does not depend on the NormAct
    kernels, whose own equality tests/test_model_adjoint.py checks."""
    model = GaussianStartEnergy(1, "tiny").double()
    model.set_data_statistics(0.41, 0.07)
    perturbed(model)
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    t, eps = torch.tensor([1e-9, 1.0, 1e3], dtype=torch.float64), torch.randn_like(x)
    y = x + t.sqrt().view(-1, 1, 1, 1) * eps
    for name, a, e in zip(("U", "∇_y U", "∂_t U"), adjoint.energy_and_scores(model, y, t),
                          energy_and_scores(model, y, t)):
        assert_rel_close(a, e, TOLERANCES[torch.float64], name, seed)

    assert_rel_close(parameter_gradients(model, FusedRoute(model, kernels="torch"), x, t, eps),
                     parameter_gradients(model, ReferenceRoute(model), x, t, eps),
                     TOLERANCES[torch.float64], "parameter gradients", seed)
    assert make_route("auto", model).name == "fused"
