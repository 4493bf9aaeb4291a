"""The paper's UNet, the normalization layer and the energy wrapper."""
import pytest
import torch
import torch.nn.functional as F
from dsm_fast.kernels.norm_act_ref import modulated_gain, norm_act_forward_ref, norm_act_ref

from dsm_fast.model import EnergyUNet, RadialEnergy, UNetEnergy, build_model, denoise, energy_and_scores


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
    # ∂_t U by a five-point central difference in float64: truncation O(h⁴), h = 1e-4 t; its round-off is that of U's
    # sum, ε Σ|y ⊙ f| / h (U itself may cancel to ~1e-4 of that sum, so a fixed atol fails where ∂_t U is tiny)
    h = 1e-4 * t
    fd = (8 * (model(y, t + h) - model(y, t - h)) - (model(y, t + 2 * h) - model(y, t - 2 * h))) / (12 * h)
    assert grad_t.abs().min() > 0  # the modulations (default init) make U depend on t
    roundoff = torch.finfo(torch.float64).eps * (y * f).abs().sum(dim=(1, 2, 3)) / h
    assert ((grad_t - fd).abs() <= 1e-5 * fd.abs() + roundoff).all(), (grad_t, fd, roundoff)


def test_normalization_matches_its_definition(seed):
    h = torch.randn(2, 5, 6, 7, dtype=torch.float64) * torch.rand(1, 5, 1, 1, dtype=torch.float64) * 3 + 1
    gain, mod = torch.rand(5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    out, terms = norm_act_forward_ref(h, modulated_gain(h, gain, mod))
    mean, var = h.mean(dim=(2, 3), keepdim=True), h.var(dim=(2, 3), unbiased=False, keepdim=True)
    # the released code's scale: sqrt(V / (v_c + eps) + eps), V the channel mean of v_c without eps
    expected = (h - mean) * torch.sqrt(var.mean(dim=1, keepdim=True) / (var + 1e-5) + 1e-5)
    expected = expected * gain[None, :, None, None] * (1 + mod[:, :, None, None])
    torch.testing.assert_close(terms.a, expected, rtol=1e-14, atol=0)  # the normalization, before the GELU
    torch.testing.assert_close(out, F.gelu(terms.a), rtol=0, atol=0)
    torch.testing.assert_close(norm_act_ref(h, gain, mod), out, rtol=0, atol=0)
    # no batch statistics: an image's output does not depend on the others in the batch
    torch.testing.assert_close(norm_act_ref(h[:1], gain, mod[:1]), out[:1])


@pytest.mark.parametrize("spread", [1e-22, 1e-3], ids=["V<<eps, denormal V", "V~eps"])
def test_normalization_in_float32_where_the_variance_is_tiny(spread, seed):
    """Deep layers at initialization have V ≪ eps (1e-44 in the release): float32 statistics stay finite and
    follow the float64 result to float32 precision (s_c → sqrt(eps), no division by zero)."""
    h = torch.randn(2, 6, 5, 7, dtype=torch.float64) * torch.rand(1, 6, 1, 1, dtype=torch.float64) * spread
    gain, mod = 1 + 0.3 * torch.randn(6, dtype=torch.float64), 0.3 * torch.randn(2, 6, dtype=torch.float64)
    out32 = norm_act_ref(h.float(), gain.float(), mod.float()).double()
    out64 = norm_act_ref(h.float().double(), gain.float().double(), mod.float().double())
    assert torch.isfinite(out32).all()
    assert ((out32 - out64).abs().max() / out64.abs().max()).item() < 1e-6


def test_initialization_follows_the_release():
    """Modulation linears keep PyTorch's default init (uniform ±1/sqrt(fan_in), not zero), gains start at 1, and the
    embedding frequencies are exp(−linspace(log 1, log 100, 32)) in float32."""
    unet = EnergyUNet(3, "paper")
    norm = unet.encoder[0][0].norm_act
    bound = 1 / 256 ** 0.5
    assert norm.modulation.weight.abs().max() <= bound and norm.modulation.weight.std() > 0.8 * bound / 3 ** 0.5
    assert norm.modulation.bias.abs().max() <= bound and norm.modulation.bias.abs().max() > 0
    assert torch.equal(norm.gain, torch.ones(64))
    t = torch.ones(1)
    freqs = torch.exp(-torch.linspace(0.0, float(torch.log(torch.tensor(100.0, dtype=torch.float64))), 32))
    assert torch.equal(unet.embedding.frequencies(t), freqs) and freqs[0] == 1
    assert unet.embedding.frequencies(t.double()).dtype == torch.float64


def test_unet_rejects_sizes_it_cannot_downsample():
    with pytest.raises(RuntimeError):
        EnergyUNet(3, "tiny")(torch.rand(1, 3, 12, 12), torch.ones(1))


def test_build_model_names():
    assert isinstance(build_model("radial", dim=10), RadialEnergy)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("huge")
