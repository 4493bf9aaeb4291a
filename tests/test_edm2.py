"""The EDM2-style attention UNet energy (dsm_fast/model/edm2.py): preset sizes, and its explicit adjoint
(dsm_fast/model/edm2_adjoint.py) against eager double backward in float64 on every route the CPU runs."""
import math

import pytest
import torch

from dsm_fast.model import GaussianStartEnergy, UNetEnergy, adjoint, build_model, energy_and_scores, parameter_count
from dsm_fast.routes import ReferenceRoute, make_route, noisy
from dsm_fast.tools.testing import assert_rel_close

TOL = 1e-10  # float64, relative

# Parameter counts (the meta device: no memory); EDM2's own XS / S at 64×64 with its 1,000-class embedding and 4
# latent channels count 124.7M / 280.2M, i.e. these plus 512·1000 / 768·1000 embedding weights and a few input ones.
COUNTS = {("edm2-tiny", 1): 485_373, ("edm2-tiny", 3): 485_661, ("edm2-xs", 3): 124_198_821,
          ("edm2-s", 1): 279_434_341, ("edm2-s", 3): 279_441_253}


@pytest.mark.parametrize("preset, channels", list(COUNTS))
def test_preset_parameter_counts(preset, channels):
    with torch.device("meta"):
        model = build_model(preset, channels)
    assert parameter_count(model) == COUNTS[preset, channels]


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Float64, every parameter moved off its initial value: the zero-initialized output and embedding gains too
    (at initialization f ≡ 0 and U ≡ 0, where every adjoint test passes trivially)."""
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def draw(n: int, channels: int, size: int = 16):
    """Images in [0, 1], t spanning 1e-9 … 1e3 (both ends and log-uniform draws between), noise."""
    x = torch.rand(n, channels, size, size, dtype=torch.float64)
    middle = torch.exp(math.log(1e-9) + torch.rand(n - 2, dtype=torch.float64) * math.log(1e12))
    t = torch.cat([torch.tensor([1e-9], dtype=torch.float64), middle, torch.tensor([1e3], dtype=torch.float64)])
    return x, t, torch.randn_like(x)


def parameter_gradients(model, route, x, t, eps):
    model.zero_grad(set_to_none=True)
    route(x, t, eps)["loss"].mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_output_is_zero_at_initialization_and_attention_is_placed():
    model = UNetEnergy(1, "edm2-tiny").double()
    x, t, _ = draw(2, 1)
    assert torch.equal(model(x, t), torch.zeros(2, dtype=torch.float64))
    heads = [block.heads for block in model.unet.encoder]
    # levels 2 and 3 (16² and 8² at 64×64) after their 'down' block, 8 channels per head
    assert heads == [0] * 3 + [0] * 4 + [0] + [3] * 3 + [0] + [4] * 3
    assert model.unet.decoder[0].heads == 4 and model.unet.decoder[1].heads == 0


@pytest.mark.parametrize("channels, energy", [(1, "paper"), (3, "paper"), (3, "gaussian")])
def test_energy_and_scores_equal_autograd(channels, energy, seed):
    model = perturbed(build_model("edm2-tiny", channels, energy=energy))
    x, t, eps = draw(4, channels)
    y = noisy(x, t, eps)
    expected = energy_and_scores(model, y, t)
    actual = adjoint.energy_and_scores(model, y, t)
    for name, a, e in zip(("U", "∇_y U", "∂_t U"), actual, expected):
        assert_rel_close(a, e, TOL, name, seed)
        assert e.abs().min() > 0  # a vanishing reference would prove nothing


@pytest.mark.parametrize("route, kernels, objective, energy", [
    ("fused", "torch", "dual", "paper"), ("fused", "torch", "single", "paper"), ("fused", "torch", "dual", "gaussian"),
    ("functional", "torch", "dual", "paper"), ("fused", "triton", "dual", "paper")])
def test_routes_parameter_gradients_equal_reference(route, kernels, objective, energy, seed):
    """Every route and kernel choice the CPU runs (triton: the loss terms by the interpreted Triton kernel, the
    network in PyTorch: there are no NormAct layers in this net) against the eager double backward."""
    model = perturbed(build_model("edm2-tiny", 3, energy=energy))
    x, t, eps = draw(3, 3)
    expected = parameter_gradients(model, ReferenceRoute(model, objective), x, t, eps)
    actual = parameter_gradients(model, make_route(route, model, objective, kernels=kernels), x, t, eps)
    assert_rel_close(actual, expected, TOL, f"{route} ({kernels}) gradients", seed)
    assert all(e.abs().max() > 0 for e in expected)  # every parameter, every gain included, carries gradient


def test_auto_route_is_fused_and_cuda_kernels_refused():
    model = UNetEnergy(1, "edm2-tiny")
    assert make_route("auto", model).name == "fused"
    x, t, eps = draw(2, 1)
    with pytest.raises(ValueError, match="no EDM2 ops"):  # the CUDA extension holds NormAct only
        adjoint.energy_and_scores(model, noisy(x, t, eps).float(), t.float(), kernels="cuda")
    with pytest.raises(ValueError, match="not a multiple of 8"):
        model(torch.rand(1, 1, 12, 12), torch.ones(1))


def test_gaussian_start_is_the_gaussian_energy():
    model = GaussianStartEnergy(1, "edm2-tiny").double()
    x, t, _ = draw(2, 1)
    assert torch.equal(model.inner(x, t), torch.zeros(2, dtype=torch.float64))


def test_demo_data_trains_with_edm2_tiny(tmp_path):
    """The demo preset with --model edm2-tiny on 16×16 patches: the held-out NLL falls below its step-0 value (the
    Gaussian start's) within 30 steps of batch 8."""
    from dsm_fast.cli.train import held_out_nll
    from dsm_fast.config import resolve_config
    from dsm_fast.train import Trainer

    cfg = resolve_config(overrides={"model": "edm2-tiny", "steps": 30, "batch_size": 8, "image_size": 16,
                                    "eval_images": 32, "progress": False, "plots": False, "log_every": 10,
                                    "checkpoint_every": 30, "out": str(tmp_path / "run"), "device": "cpu"},
                         preset="demo")
    trainer = Trainer(cfg)
    assert trainer.cfg.route == "fused"
    before = held_out_nll(trainer, cfg)["nll_bits_per_dim"]
    trainer.run()
    after = held_out_nll(trainer, cfg)["nll_bits_per_dim"]
    assert math.isfinite(before) and after < before - 0.05, (before, after)
