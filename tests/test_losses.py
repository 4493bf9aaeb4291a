"""The objectives (dsm_fast/losses.py): the dual score matching terms as defined, log-uniform noise levels."""
import math

import torch

from dsm_fast.losses import objective_terms, sample_noise_levels
from dsm_fast.model import UNetEnergy, energy_and_scores
from dsm_fast.routes import noisy
from dsm_fast.tools.testing import assert_rel_close, draw_batch


def test_terms_equal_the_method_definitions(seed):
    """space = ‖D − x‖²/(d t),  time = (t/d)² (∂_t U − d/(2t) + ‖y − x‖²/(2t²))²."""
    model = UNetEnergy(3, "tiny").double()
    x, t, eps = draw_batch(6, 3)
    y = noisy(x, t, eps)
    _, grad_y, grad_t = energy_and_scores(model, y, t)
    terms = objective_terms("dual", grad_y, grad_t, eps, t)
    d = x[0].numel()
    tt = t[:, None, None, None]
    space = ((y - tt * grad_y - x) ** 2).sum(dim=(1, 2, 3)) / (d * t)
    time = (t / d) ** 2 * (grad_t - d / (2 * t) + ((y - x) ** 2).sum(dim=(1, 2, 3)) / (2 * t**2)) ** 2
    assert_rel_close(terms["space"], space, 1e-9, "space term", seed)
    assert_rel_close(terms["time"], time, 1e-6, "time term", seed)
    assert_rel_close(terms["loss"], space + time, 1e-6, "dual loss", seed)
    single = objective_terms("single", grad_y, grad_t, eps, t)
    assert set(single) == {"loss", "space"} and torch.equal(single["loss"], terms["space"])


def test_noise_levels_are_log_uniform_on_the_range(seed):
    t = sample_noise_levels(20000, 1e-9, 1e3, dtype=torch.float64)
    assert t.min() >= 1e-9 and t.max() <= 1e3
    log_t = torch.log10(t)
    assert abs(log_t.mean().item() - (-3.0)) < 0.1  # uniform on [−9, 3] has mean −3, std 12/√12
    assert abs(log_t.std().item() - 12 / math.sqrt(12)) < 0.1
