"""Data sources of the trainer: each has ``next_batch``, ``state_dict``/``load_state_dict``, ``sample_shape``
and ``quantized`` (8-bit images, whose NLL adds 8 bits/dim)."""
from __future__ import annotations

import numpy as np
import torch

from .gsm import GaussianScaleMixture, MixtureBatches
from .images import DataError, ImageBatches, holdout_split, load_images

__all__ = [
    "DataError",
    "GaussianScaleMixture",
    "ImageBatches",
    "MixtureBatches",
    "make_test_data",
    "make_training_data",
]


def _image_splits(cfg) -> tuple[np.ndarray, np.ndarray]:
    if cfg.data == "demo":
        from .demo import demo_patches

        return demo_patches(cfg.channels, cfg.image_size, "train"), demo_patches(cfg.channels, cfg.image_size, "test")
    images = load_images(cfg.data, cfg.channels, cfg.image_size)
    train, test = holdout_split(len(images))
    return images[train], images[test]


def make_training_data(cfg, rank: int = 0, world: int = 1):
    """The training stream named by ``cfg.data`` ('demo', 'gsm', or a folder / .npy path)."""
    if cfg.data == "gsm":
        return MixtureBatches(GaussianScaleMixture(cfg.gsm_dim, cfg.gsm_sigmas), seed=cfg.seed * 1_000_003 + rank)
    return ImageBatches(_image_splits(cfg)[0], seed=cfg.seed, rank=rank, world=world)


def make_test_data(cfg, n: int, seed: int = 12345) -> tuple[torch.Tensor, bool]:
    """(up to n held-out samples as floats — images in [0, 1] — , whether they are 8-bit quantized)."""
    if cfg.data == "gsm":
        mixture = GaussianScaleMixture(cfg.gsm_dim, cfg.gsm_sigmas)
        return mixture.sample(n, torch.Generator().manual_seed(seed)), False
    test = _image_splits(cfg)[1]
    return torch.as_tensor(np.asarray(test[:n])).float() / 255.0, True
