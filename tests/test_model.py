"""The paper's UNet, the normalization layer and the energy wrapper."""
import pytest
import torch

from dsm_fast.model import EnergyUNet, RadialEnergy, UNetEnergy, build_model, denoise, energy_and_scores
from dsm_fast.model.layers import normalize_ref


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_preset_has_the_published_parameter_count():
    assert n_params(EnergyUNet(3, "paper")) == 8_649_856


def test_paper_preset_convolutions_are_bias_free_and_grayscale_builds():
    unet = EnergyUNet(1, "paper")
    convs = [m for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert len(convs) == 21 and all(c.bias is None for c in convs)
    assert convs[0].in_channels == 1 and unet.decoder[-1][-1].conv.out_channels == 1
    # 21 convolutions; every one but the last is followed by a normalization
    assert sum(1 for name, _ in unet.named_modules() if name.endswith("norm_act")) == 20


@pytest.mark.parametrize("channels", [1, 3])
def test_energy_is_one_scalar_per_image_and_denoiser_matches_tweedie(channels, seed):
    model = UNetEnergy(channels, "tiny").double()
    y = torch.rand(3, channels, 16, 16, dtype=torch.float64)
    t = torch.tensor([1e-3, 0.5, 20.0], dtype=torch.float64)
    energy, grad_y, grad_t = energy_and_scores(model, y, t)
    assert energy.shape == (3,) and grad_y.shape == y.shape and grad_t.shape == (3,)
    f = model.unet(y, t)
    torch.testing.assert_close(energy, 0.5 * (y * f).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(denoise(model, y, t), y - t[:, None, None, None] * grad_y)
    # ∂_t U by a central finite difference in float64
    h = 1e-6 * t
    fd = (model(y, t + h) - model(y, t - h)) / (2 * h)
    torch.testing.assert_close(grad_t, fd, rtol=1e-5, atol=1e-8)


def test_normalization_matches_its_definition(seed):
    h = torch.randn(2, 5, 6, 7, dtype=torch.float64) * torch.rand(1, 5, 1, 1, dtype=torch.float64) * 3 + 1
    gain, mod = torch.rand(5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    out = normalize_ref(h, gain, mod)
    mean, var = h.mean(dim=(2, 3), keepdim=True), h.var(dim=(2, 3), unbiased=False, keepdim=True)
    expected = (h - mean) / torch.sqrt(var + 1e-5) * torch.sqrt(var.mean(dim=1, keepdim=True) + 1e-5)
    expected = expected * gain[None, :, None, None] * (1 + mod[:, :, None, None])
    torch.testing.assert_close(out, expected)
    # no batch statistics: an image's output does not depend on the others in the batch
    torch.testing.assert_close(normalize_ref(h[:1], gain, mod[:1]), out[:1])


def test_unet_rejects_sizes_it_cannot_downsample():
    with pytest.raises(RuntimeError):
        EnergyUNet(3, "tiny")(torch.rand(1, 3, 12, 12), torch.ones(1))


def test_build_model_names():
    assert isinstance(build_model("radial", dim=10), RadialEnergy)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("huge")
