"""Restoration against closed forms: the measurement operators' algebra, the GSM posterior (component weights and
means) against dense linear algebra, posterior MALA on the exact GSM energy at the exact posterior weights, the
ascent keeping the measured part, and the untrained Gaussian-start image energy reproducing the Wiener solution."""
import math

import pytest
import torch

from dsm_fast.analysis.inverse import ASCENT_LEVELS, constrained_ascent, likeliest_noise_level, posterior_sampling
from dsm_fast.analysis.measurements import (
    BlockAverage,
    GaussianBlur,
    OrthogonalRows,
    Subsample,
    gaussian_posterior_mean,
    make_measurement,
    mixture_posterior,
)
from dsm_fast.data.gsm import ExactEnergy, GaussianScaleMixture
from dsm_fast.model.gaussian import GaussianStartEnergy


def operators(generator):
    shape = (2, 8, 8)
    q, _ = torch.linalg.qr(torch.randn(128, 40, generator=generator, dtype=torch.float64))
    return [Subsample(torch.rand(shape, generator=generator) < 0.4), OrthogonalRows(q.T.contiguous(), shape),
            BlockAverage(4, shape), GaussianBlur(1.2, shape)]


def dense(op):
    """A as a (k, d) matrix, column j = A e_j."""
    eye = torch.eye(op.dim, dtype=torch.float64).reshape(op.dim, *op.sample_shape)
    return op.apply(eye).reshape(op.dim, -1).T


@pytest.mark.parametrize("index", range(4), ids=["subsample", "orthogonal", "block", "blur"])
def test_operator_algebra(index, seed):
    generator = torch.Generator().manual_seed(seed)
    op = operators(generator)[index]
    x = torch.randn(3, *op.sample_shape, generator=generator, dtype=torch.float64)
    m = op.apply(torch.randn(3, *op.sample_shape, generator=generator, dtype=torch.float64))
    assert torch.allclose((op.apply(x) * m).sum(), (x * op.adjoint(m)).sum(), rtol=1e-10)  # ⟨Ax, m⟩ = ⟨x, Aᵀm⟩
    assert torch.allclose(op.project(op.project(x)), op.project(x), atol=1e-10)  # P² = P
    assert torch.allclose(op.pinv(op.apply(x)), op.project(x), atol=1e-10)  # A⁺A = P
    a = dense(op)
    gram = a @ a.T
    assert torch.allclose(torch.linalg.eigvalsh(gram), op.gram_eigenvalues().sort().values, atol=1e-10)
    solved = op.gram_solve(m, 0.7, 0.09).reshape(3, -1)
    assert torch.allclose(solved @ (0.7 * gram + 0.09 * torch.eye(len(gram), dtype=torch.float64)),
                          m.reshape(3, -1), atol=1e-9)


def test_mixture_posterior_matches_dense_linear_algebra(seed):
    """weight_k ∝ w_k N(m; 0, σ_k² AAᵀ + s² I), mean_k = σ_k² Aᵀ(σ_k² AAᵀ + s² I)⁻¹ m, by explicit matrices."""
    generator = torch.Generator().manual_seed(seed)
    mixture = GaussianScaleMixture(12, (0.5, 1.0, 2.0), (0.2, 0.3, 0.5))
    op = make_measurement("compressive", (12,), seed=seed, fraction=0.4)
    a, noise, t = dense(op), 0.3, 0.05
    m = op.apply(mixture.sample(4, generator, dtype=torch.float64)) + noise * torch.randn(4, op.count,
                                                                                          generator=generator)
    out = mixture_posterior(op, m, mixture.sigmas, mixture.weights, noise, t)
    for b in range(4):
        logs, means = [], []
        for sigma, weight in zip(mixture.sigmas, mixture.weights):
            v = sigma**2 + t
            cov = v * a @ a.T + noise**2 * torch.eye(op.count, dtype=torch.float64)
            logs.append(math.log(weight) + torch.distributions.MultivariateNormal(
                torch.zeros(op.count, dtype=torch.float64), cov).log_prob(m[b]))
            means.append(v * a.T @ torch.linalg.solve(cov, m[b]))
        weights = torch.softmax(torch.stack(logs), 0)
        assert torch.allclose(out["weights"][b], weights, atol=1e-10)
        assert torch.allclose(out["mean"][b], (weights[:, None] * torch.stack(means)).sum(0), atol=1e-10)


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_posterior_samples_land_in_the_components_at_the_exact_weights(noise, seed):
    """Annealed MALA on the exact GSM energy: the mean responsibility p(k | x) over the samples (which is the
    posterior weight of k: k and m are independent given x) within 0.03 of the exact weights, and the samples'
    mean within 4 standard errors (RMS per coordinate, posterior std / √S) of the exact posterior mean."""
    generator = torch.Generator().manual_seed(seed)
    mixture, t_end, samples = GaussianScaleMixture(8, (1.0, 2.0)), 1e-2, 2000
    op = make_measurement("compressive", (8,), seed=seed, fraction=0.5)
    m = op.apply(mixture.sample(3, generator, dtype=torch.float64))
    m = m + noise * torch.randn(m.shape, generator=generator, dtype=torch.float64)
    exact = mixture_posterior(op, m, mixture.sigmas, mixture.weights, noise, t_end)
    out = posterior_sampling(ExactEnergy(mixture), op, m, noise, samples, generator, 1e2, t_end, levels=60,
                             mala_steps=4, progress=False)
    weights = mixture.responsibilities(out["samples"].reshape(-1, 8), t_end).reshape(3, samples, 2).mean(1)
    assert (weights - exact["weights"]).abs().max() < 0.03, (weights, exact["weights"])
    rms = (out["mean"] - exact["mean"]).square().mean(1).sqrt()
    assert (rms < 4 * out["std"].mean(1) / math.sqrt(samples)).all(), rms
    assert 0.4 < sum(level["acceptance"] for level in out["mala"]) / len(out["mala"]) < 0.9


@pytest.mark.parametrize("level", ASCENT_LEVELS)
def test_ascent_keeps_the_measured_coordinates(seed, level):
    generator = torch.Generator().manual_seed(seed)
    mixture = GaussianScaleMixture(16, (1.0, 2.0))
    op = make_measurement("inpaint", (16,), seed=seed, fraction=0.5)
    x = mixture.sample(4, generator, dtype=torch.float64)
    out = constrained_ascent(ExactEnergy(mixture), op, op.apply(x), 0.0, generator, sigma_start=10.0,
                             sigma_end=0.1, t_range=(1e-2, 1e2), level=level, progress=False)
    assert out["converged"] and out["iterations"] > 10
    assert torch.equal(out["restored"][:, op.mask], x[:, op.mask])  # the measured part is A⁺m itself
    assert not torch.allclose(out["restored"][:, ~op.mask], torch.zeros(1, dtype=torch.float64))


def test_untrained_gaussian_start_restores_as_the_wiener_solution(seed):
    """At initialization the image energy is N(μ, (v + t) I): the posterior given block averages is Gaussian with
    mean (I − P)μ + A⁺m (the Wiener solution) and variance v + t_end in each of the d − k = 48 unmeasured directions
    (3 of every 2 × 2 block)."""
    generator = torch.Generator().manual_seed(seed)
    model = GaussianStartEnergy(channels=1, preset="tiny").double()
    model.set_data_statistics(0.4, 0.05)
    op = make_measurement("superres", (1, 8, 8), factor=2)
    x = 0.4 + math.sqrt(0.05) * torch.randn(2, 1, 8, 8, generator=generator, dtype=torch.float64)
    m, samples, t_end = op.apply(x), 16, 1e-3
    out = posterior_sampling(model, op, m, 0.0, samples, generator, 1.0, t_end, levels=12, mala_steps=2,
                             centre=0.5, progress=False)
    wiener = gaussian_posterior_mean(op, m, torch.full((1, 1, 8, 8), 0.4, dtype=torch.float64), 0.05, 0.0)
    null_variance = (out["samples"] - out["samples"].mean(1, keepdim=True)).square().sum((1, 2, 3, 4)) / (
        (samples - 1) * (op.dim - op.count))
    assert torch.allclose(null_variance, torch.tensor(0.05 + t_end, dtype=torch.float64), rtol=0.15), null_variance
    rms = (out["mean"] - wiener).square().mean((1, 2, 3)).sqrt()
    assert (rms < 4 * math.sqrt((0.05 + t_end) * 3 / 4 / samples)).all(), rms
    assert torch.allclose(op.apply(out["mean"]), m, atol=1e-12)


def test_likeliest_noise_level_of_the_gaussian_is_the_unbiased_estimate(seed):
    """For the untrained Gaussian-start energy N(μ, (v + t) I), argmax_t log p_t(y) = ‖y − μ‖²/N − v (clamped to
    the searched range), whatever the noise in y."""
    generator = torch.Generator().manual_seed(seed)
    model = GaussianStartEnergy(channels=1, preset="tiny").double()
    model.set_data_statistics(0.4, 0.05)
    sigmas = torch.tensor([1e-3, 0.03, 0.1, 0.5, 2.0], dtype=torch.float64).view(-1, 1, 1, 1)
    y = 0.4 + torch.sqrt(0.05 + sigmas.square()) * torch.randn(5, 1, 16, 16, generator=generator, dtype=torch.float64)
    exact = ((y - 0.4).square().mean((1, 2, 3)) - 0.05).clamp(1e-6, 1.0)
    found = likeliest_noise_level(model, y, 1e-6, 1.0)
    assert torch.allclose(found, exact, rtol=1e-3), (found, exact)
    # the ascent's tracking: a per-sample bracket [t̂ e⁻², t̂ e] around a guess off by up to e, searched whole
    unclamped = (y - 0.4).square().mean((1, 2, 3)) - 0.05
    inside = unclamped > 0  # a negative estimate has its minimum at the range's end
    guess = unclamped.abs() * torch.exp(torch.empty(5, dtype=torch.float64).uniform_(-1, 1, generator=generator))
    tracked = likeliest_noise_level(model, y, guess * math.exp(-2), guess * math.e, points=2, refinements=30)
    assert inside.sum() >= 3 and torch.allclose(tracked[inside], unclamped[inside], rtol=1e-3), (tracked, unclamped)
