"""Linear measurements m = A x (+ s n, n ~ N(0, I)) of images (B, C, H, W) or vectors (B, d), and the Gaussian
posteriors they give in closed form (docs/method.md §3.6).

Each operator offers A, Aᵀ, the pseudo-inverse A⁺ = Aᵀ(AAᵀ)⁻¹, the projector P = A⁺A onto the measured (row)
space, and (v AAᵀ + s² I)⁻¹ with the eigenvalues of AAᵀ. For x ~ N(μ, v I) the posterior mean is the Wiener
solution

    E[x | m] = μ + v Aᵀ (v AAᵀ + s² I)⁻¹ (m − Aμ),   and for s = 0:   (I − P) μ + A⁺ m,

and for the Gaussian scale mixture p(x) = Σ_k w_k N(0, σ_k² I) the posterior is the mixture of the components'
posteriors, with

    weight_k ∝ w_k N(m; 0, σ_k² AAᵀ + s² I),   mean_k = σ_k² Aᵀ (σ_k² AAᵀ + s² I)⁻¹ m.
"""
from __future__ import annotations

import abc
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..config import RESTORE_TASKS, ConfigError
from ..data.images import DataError

BLUR_CUTOFF = 1e-3  # deblurring: frequencies whose gain |k̂| is below this count as unmeasured (A⁺, P)


class LinearMeasurement(abc.ABC):
    """m = A x with AAᵀ = c I (A has orthogonal rows of squared norm c): inpainting, compressive sensing and block
    averaging. Subclasses define :meth:`apply` and :meth:`adjoint`; ``count`` is the number of measurements."""

    gain = 1.0  # c

    def __init__(self, sample_shape: tuple[int, ...], count: int):
        self.sample_shape, self.count = tuple(sample_shape), count

    @property
    def dim(self) -> int:
        return math.prod(self.sample_shape)

    @abc.abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """m = A x, (B, *sample_shape) → (B, count)."""

    @abc.abstractmethod
    def adjoint(self, m: torch.Tensor) -> torch.Tensor:
        """Aᵀ m, (B, count) → (B, *sample_shape)."""

    def gram_eigenvalues(self) -> torch.Tensor:
        """The eigenvalues of AAᵀ (one per measurement), float64."""
        return torch.full((self.count,), self.gain, dtype=torch.float64)

    def gram_solve(self, m: torch.Tensor, variance, noise_variance: float) -> torch.Tensor:
        """(v AAᵀ + s² I)⁻¹ m; ``variance`` v a number or one per sample (B,)."""
        v = torch.as_tensor(variance, dtype=m.dtype, device=m.device).reshape(-1, *([1] * (m.dim() - 1)))
        return m / (v * self.gain + noise_variance)

    def pinv(self, m: torch.Tensor) -> torch.Tensor:
        """A⁺ m = Aᵀ (AAᵀ)⁻¹ m."""
        return self.adjoint(m) / self.gain

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """P x = A⁺ A x, the part of x the measurement sees."""
        return self.pinv(self.apply(x))


class Subsample(LinearMeasurement):
    """Inpainting: m = the values of x where ``mask`` (of the sample's shape) is true."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask.bool()
        self.index = self.mask.flatten().nonzero().squeeze(1)
        super().__init__(tuple(mask.shape), len(self.index))

    def apply(self, x):
        return x.reshape(len(x), -1)[:, self.index.to(x.device)]

    def adjoint(self, m):
        out = m.new_zeros(len(m), self.dim)
        out[:, self.index.to(m.device)] = m
        return out.reshape(len(m), *self.sample_shape)


class OrthogonalRows(LinearMeasurement):
    """Compressive sensing: m = Q x, Q (k, d) with orthonormal rows (a random orthogonal projection)."""

    def __init__(self, rows: torch.Tensor, sample_shape: tuple[int, ...]):
        super().__init__(sample_shape, rows.shape[0])
        self.rows = rows.double()

    def apply(self, x):
        return x.reshape(len(x), -1) @ self.rows.to(x.device, x.dtype).T

    def adjoint(self, m):
        return (m @ self.rows.to(m.device, m.dtype)).reshape(len(m), *self.sample_shape)


class BlockAverage(LinearMeasurement):
    """Super-resolution: m = the mean of each K × K block; AAᵀ = I / K²."""

    def __init__(self, factor: int, sample_shape: tuple[int, ...]):
        channels, height, width = sample_shape
        super().__init__(sample_shape, channels * (height // factor) * (width // factor))
        self.factor, self.gain = factor, 1.0 / factor**2

    def apply(self, x):
        return F.avg_pool2d(x, self.factor)

    def adjoint(self, m):
        return m.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1) * self.gain


class GaussianBlur(LinearMeasurement):
    """Deblurring: m = k ⊛ x, circular convolution with a normalized Gaussian kernel of standard deviation σ
    pixels, diagonal in the 2-D Fourier basis with real gains k̂ (A = Aᵀ, AAᵀ has eigenvalues k̂²). A⁺ and P keep
    the frequencies with k̂ ≥ ``BLUR_CUTOFF`` (the others are below any useful precision)."""

    def __init__(self, sigma: float, sample_shape: tuple[int, ...]):
        super().__init__(sample_shape, math.prod(sample_shape))
        _, height, width = sample_shape
        fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
        fx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
        self.spectrum = torch.exp(-2 * math.pi**2 * sigma**2 * (fy.square() + fx.square()))  # k̂ of the Gaussian

    def filtered(self, x: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
        """x with each 2-D frequency multiplied by ``gains`` (H, W)."""
        return torch.fft.ifft2(torch.fft.fft2(x.double()) * gains.to(x.device)).real.to(x.dtype)

    def apply(self, x):
        return self.filtered(x, self.spectrum)

    adjoint = apply

    def gram_eigenvalues(self):
        return self.spectrum.square().expand(self.sample_shape).flatten()

    def gram_solve(self, m, variance, noise_variance):
        v = torch.as_tensor(variance, dtype=torch.float64, device=m.device).reshape(-1, 1, 1, 1)
        gains = 1.0 / (v * self.spectrum.to(m.device).square() + noise_variance)  # (B or 1, 1, H, W)
        return torch.fft.ifft2(torch.fft.fft2(m.double()) * gains).real.to(m.dtype)

    def pinv(self, m):
        kept = self.spectrum >= BLUR_CUTOFF
        return self.filtered(m, torch.where(kept, 1.0 / self.spectrum, 0.0))

    def project(self, x):
        return self.filtered(x, (self.spectrum >= BLUR_CUTOFF).double())


def gaussian_posterior_mean(op: LinearMeasurement, m: torch.Tensor, mean: torch.Tensor, variance,
                            noise: float) -> torch.Tensor:
    """E[x | m] for x ~ N(μ, v I): μ + v Aᵀ (v AAᵀ + s² I)⁻¹ (m − Aμ); for s = 0 exactly (I − P) μ + A⁺ m, which
    reproduces the measurement. ``mean`` broadcasts to x's shape, ``variance`` is a number or one per sample."""
    mean = mean.expand(len(m), *op.sample_shape)
    if noise == 0:
        return mean - op.project(mean) + op.pinv(m)
    v = torch.as_tensor(variance, dtype=m.dtype, device=m.device).reshape(-1, *([1] * len(op.sample_shape)))
    return mean + v * op.adjoint(op.gram_solve(m - op.apply(mean), variance, noise**2))


def mixture_posterior(op: LinearMeasurement, m: torch.Tensor, sigmas, weights, noise: float,
                      t: float = 0.0) -> dict[str, torch.Tensor]:
    """The exact posterior of the GSM Σ_k w_k N(0, (σ_k² + t) I) (p_t; t = 0 the data) given m = A x + s n:
    component weights (B, K), component means (B, K, d) and the posterior mean (B, d), all float64."""
    m = m.double()
    eigenvalues = op.gram_eigenvalues().to(m.device)
    log_weights, means = [], []
    for sigma, weight in zip(sigmas, weights):
        v = sigma * sigma + t
        solved = op.gram_solve(m, v, noise**2)
        log_det = torch.log(v * eigenvalues + noise**2).sum()
        log_weights.append(math.log(weight) - 0.5 * (op.count * math.log(2 * math.pi) + log_det
                                                    + (m * solved).reshape(len(m), -1).sum(1)))
        means.append(v * op.adjoint(solved))
    posterior_weights = torch.softmax(torch.stack(log_weights, 1), dim=1)
    means = torch.stack(means, 1)
    return {"weights": posterior_weights, "means": means,
            "mean": (posterior_weights.view(*posterior_weights.shape, *([1] * len(op.sample_shape))) * means).sum(1)}


def parse_box(text: str, height: int, width: int) -> tuple[int, int, int, int]:
    """'S' (a central S × S square) or 'TOP,LEFT,HEIGHT,WIDTH' → (top, left, height, width) inside the image."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--box expects SIZE or TOP,LEFT,HEIGHT,WIDTH in pixels, got {text!r}") from None
    if len(values) == 1:
        size = values[0]
        values = [(height - size) // 2, (width - size) // 2, size, size]
    if len(values) != 4:
        raise ConfigError(f"--box expects SIZE or TOP,LEFT,HEIGHT,WIDTH in pixels, got {text!r}")
    top, left, box_h, box_w = values
    if box_h <= 0 or box_w <= 0 or top < 0 or left < 0 or top + box_h > height or left + box_w > width:
        raise ConfigError(f"--box {text} does not fit inside the {height}×{width} images")
    return top, left, box_h, box_w


def read_mask(path: str, height: int, width: int) -> torch.Tensor:
    """A mask image (or a .npy array) of the images' size: non-zero pixels are measured, zero ones are missing."""
    from pathlib import Path

    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask not found: {path}")
    try:
        if path.suffix == ".npy":
            mask = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                mask = np.asarray(img.convert("L"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read the mask ({error})") from None
    if mask.shape != (height, width):
        raise DataError(f"{path}: the mask is {mask.shape[-1]}×{mask.shape[0] if mask.ndim else 0}, the images are "
                        f"{width}×{height}")
    return torch.from_numpy(np.ascontiguousarray(mask) != 0)


def random_fraction(fraction: float | None, name: str) -> float:
    if fraction is None or not 0 < fraction <= 1:
        raise ConfigError(f"{name} needs --fraction F with 0 < F ≤ 1 (the fraction measured)")
    return fraction


def make_measurement(task: str, sample_shape: tuple[int, ...], seed: int = 0, box: str | None = None,
                     fraction: float | None = None, mask: str | None = None, factor: int = 4,
                     blur_sigma: float = 1.5) -> LinearMeasurement:
    """The operator of a restoration task for samples of ``sample_shape`` ((C, H, W) images or (d,) vectors):
    inpaint a box (default: a central square of half the side), random pixels at ``fraction`` or a mask image;
    superres by ``factor`` × ``factor`` block averaging; deblur by a Gaussian of ``blur_sigma`` pixels; compressive
    sensing by a random orthogonal projection onto ``fraction`` of the dimensions."""
    generator = torch.Generator().manual_seed(seed)
    images = len(sample_shape) == 3
    if task == "compressive":
        dim = math.prod(sample_shape)
        count = max(1, round(random_fraction(fraction, "compressive") * dim))
        q, _ = torch.linalg.qr(torch.randn(dim, count, generator=generator, dtype=torch.float64))
        return OrthogonalRows(q.T.contiguous(), sample_shape)
    if task not in RESTORE_TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {', '.join(RESTORE_TASKS)}")
    if task == "inpaint" and sum(option is not None for option in (box, fraction, mask)) > 1:
        raise ConfigError("inpaint takes one of --box, --fraction or --mask")
    if not images and (task != "inpaint" or fraction is None):
        raise ConfigError(f"the run models vectors, not images: --task {task}"
                          f"{' with --box or --mask' if task == 'inpaint' else ''} needs an image model (vectors "
                          f"allow --task compressive and --task inpaint --fraction F)")
    if task == "inpaint":
        if fraction is not None:
            pixels = sample_shape[1:] if images else sample_shape
            kept = torch.rand(pixels, generator=generator) < random_fraction(fraction, "inpaint")
            return Subsample(kept.expand(sample_shape) if images else kept)
        _, height, width = sample_shape
        if mask is not None:
            return Subsample(read_mask(mask, height, width).expand(sample_shape))
        top, left, box_h, box_w = parse_box(box or str(height // 2), height, width)
        kept = torch.ones(sample_shape, dtype=torch.bool)
        kept[:, top:top + box_h, left:left + box_w] = False
        return Subsample(kept)
    if task == "superres":
        if factor < 2 or sample_shape[1] % factor or sample_shape[2] % factor:
            raise ConfigError(f"--factor {factor} does not divide the {sample_shape[1]}×{sample_shape[2]} images "
                              f"(need an integer ≥ 2 dividing both sides)")
        return BlockAverage(factor, sample_shape)
    if not blur_sigma > 0:
        raise ConfigError("--blur-sigma must be positive")
    return GaussianBlur(blur_sigma, sample_shape)
