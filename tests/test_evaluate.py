"""The NLL protocol, checked on an energy whose normalization is known exactly."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from dsm_fast.data import GaussianScaleMixture
from dsm_fast.data.gsm import ExactEnergy as ExactMixtureEnergy
from dsm_fast.evaluate import (
    bootstrap_interval,
    denoising_psnr,
    energies,
    evaluate_nll,
    nll_bits_per_dim,
    uniform_dequantize,
    variance_per_dim,
)


def test_protocol_recovers_the_exact_nll_whatever_the_offset(seed):
    mixture = GaussianScaleMixture(dim=200, sigmas=(0.5, 1.0))
    n, d = 400, 200
    x = mixture.sample(n, torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = mixture.log_prob(x)
    # C is a mean of U(y, t_max) over n draws, whose spread is ≈ √(d/2) nats: allow five standard errors
    tolerance_bits = 5 * math.sqrt(d / 2) / math.sqrt(n) / (d * math.log(2))
    for offset in (0.0, 1234.5):  # 1234.5 nats = 8.9 bits/dim that the protocol must remove
        model = ExactMixtureEnergy(mixture, offset)
        result = evaluate_nll(model, x, quantized=False, t_max=1e3, data_variance=mixture.variance_per_dim,
                              seed=seed, exact_log_p=exact)
        assert abs(result["nll_bits_per_dim"] - result["exact_nll_bits_per_dim"]) < tolerance_bits
        shift = result["log_p"] - exact.numpy()
        assert shift.std() < 1e-9  # the learned log p differs from the exact one by the constant only
        low, high = result["ci95"]
        assert low < result["nll_bits_per_dim"] < high


def test_quantized_offset_dequantization_and_bootstrap():
    values = np.random.default_rng(0).normal(3.0, 1.0, 5000)
    low, high = bootstrap_interval(values)
    assert low < 3.0 < high and high - low < 0.1
    x = torch.randint(0, 256, (10, 3, 4, 4)).double() / 255
    deq = uniform_dequantize(x, torch.Generator().manual_seed(0))
    assert torch.equal(torch.floor(deq * 256), torch.round(x * 255))


def test_denoising_psnr_of_the_exact_gaussian_denoiser():
    """For x ~ N(0, s² I), D = s²/(s² + t)·y and the output MSE is s² t/(s² + t) per dimension."""
    s2 = 0.04
    mixture = GaussianScaleMixture(dim=4096, sigmas=(math.sqrt(s2),))
    model = ExactMixtureEnergy(mixture, 0.0)
    x = mixture.sample(8, torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = denoising_psnr(model, x, torch.Generator().manual_seed(2), input_psnrs=(30, 10, -10))
    for row in rows:
        expected = -10 * math.log10(s2 * row["t"] / (s2 + row["t"]))
        assert abs(row["output_psnr"] - expected) < 0.2


class QuadraticEnergy(nn.Module):
    """U(y, t) = ‖y − 0.5‖² / (2 (s² + t)) + w·t: cheap, and every sample's U differs."""

    def __init__(self, s2: float = 0.05):
        super().__init__()
        self.s2 = s2
        self.w = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, y, t):
        return (y - 0.5).reshape(len(y), -1).square().sum(1) / (2 * (self.s2 + t)) + self.w * t


def test_uint8_arrays_and_float_images_give_the_same_protocol():
    """A uint8 array read batch by batch (how eval reads a memory-mapped split) = the float images at once."""
    images = np.random.default_rng(0).integers(0, 256, (70, 1, 8, 8), dtype=np.uint8)
    model = QuadraticEnergy()
    floats = torch.from_numpy(images).double() / 255
    for dequantize in (False, True):
        a = evaluate_nll(model, images, True, 1e3, dequantize, seed=4, batch_size=16)
        b = evaluate_nll(model, floats, True, 1e3, dequantize, seed=4, batch_size=32)
        assert a["log_normalizer"] == pytest.approx(b["log_normalizer"], rel=1e-12)
        np.testing.assert_allclose(a["log_p"], b["log_p"], rtol=1e-12)
    deq = uniform_dequantize(floats, torch.Generator().manual_seed(5))  # the same dequantized x in C and log p
    expected = -(energies(model, deq, 0.0) + a["log_normalizer"]).numpy()
    np.testing.assert_allclose(a["log_p"], expected, rtol=1e-12)


def test_train_nll_uses_the_constant_of_the_test_samples(seed):
    mixture = GaussianScaleMixture(dim=100, sigmas=(0.5, 1.0))
    g = torch.Generator().manual_seed(seed)
    test, train = mixture.sample(300, g, dtype=torch.float64), mixture.sample(200, g, dtype=torch.float64)
    model = ExactMixtureEnergy(mixture, 321.0)
    result = evaluate_nll(model, test, False, 1e3, data_variance=mixture.variance_per_dim, seed=seed, train_x=train)
    log_p_train = -(energies(model, train, 0.0) + result["log_normalizer"])
    want = float(nll_bits_per_dim(log_p_train, 100, False).mean())
    assert result["train"]["n"] == 200 and result["train"]["nll_bits_per_dim"] == pytest.approx(want, rel=1e-12)
    alone = evaluate_nll(model, train, False, 1e3, data_variance=mixture.variance_per_dim, seed=seed + 1)
    assert alone["log_normalizer"] != result["log_normalizer"]  # its own C would differ: the test's C is used
    exact = float(nll_bits_per_dim(mixture.log_prob(train), 100, False).mean())
    assert abs(result["train"]["nll_bits_per_dim"] - exact) < 5 * math.sqrt(50 / 300) / (100 * math.log(2))


def test_blocked_bootstrap_and_streamed_variance_match_the_direct_formulas():
    values = np.random.default_rng(1).normal(2.0, 1.0, 20_000)  # blocks of 500 resamples
    rng = np.random.default_rng(0)
    means = values[rng.integers(0, len(values), size=(2000, len(values)))].mean(axis=1)
    assert bootstrap_interval(values) == (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))
    images = np.random.default_rng(2).integers(0, 256, (50, 3, 4, 4), dtype=np.uint8)
    direct = float((torch.from_numpy(images).double() / 255).var(dim=0).mean())
    assert variance_per_dim(images, batch_size=7) == pytest.approx(direct, rel=1e-10)


def test_eval_command_all_images_train_nll_and_gray_from_colour(tmp_path, capsys):
    """eval --images all --train-images all on a grayscale run whose data is a colour .npy (read through the luma)."""
    import json

    from dsm_fast.cli import main
    from dsm_fast.data.images import holdout_split

    colour = np.random.default_rng(3).integers(0, 256, (60, 3, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "colour.npy", colour)
    run = tmp_path / "run"
    main(["train", "--data", str(tmp_path / "colour.npy"), "--channels", "1", "--image-size", "16", "--model", "tiny",
          "--steps", "0", "--eval-images", "0", "--device", "cpu", "--progress", "false", "--out", str(run)])
    main(["eval", str(run), "--images", "all", "--train-images", "all", "--json", str(tmp_path / "e.json")])
    result = json.loads((tmp_path / "e.json").read_text())
    train_rows, test_rows = holdout_split(60)
    assert result["n"] == len(test_rows) and result["train"]["n"] == len(train_rows) and result["dim"] == 256
    assert np.isfinite(result["train"]["nll_bits_per_dim"]) and "train NLL" in capsys.readouterr().out
    main(["eval", str(run), "--images", "2", "--train-images", "3", "--json", str(tmp_path / "f.json")])
    assert json.loads((tmp_path / "f.json").read_text())["train"]["n"] == 3
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(run), "--images", "0"])
    assert exit_info.value.code == 2 and "expected a positive number or 'all'" in capsys.readouterr().err
