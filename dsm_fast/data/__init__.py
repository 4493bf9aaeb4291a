"""Data sources of the trainer: each has ``next_batch``, ``state_dict``/``load_state_dict``, ``sample_shape``
and ``quantized`` (8-bit images, whose NLL adds 8 bits/dim)."""
from __future__ import annotations

import numpy as np
import torch

from ..config import parse_subset
from .gsm import GaussianScaleMixture, MixtureBatches
from .imagenet64 import is_prepared, load_split, prepared_batches
from .images import DataError, ImageBatches, as_channels, check_images, holdout_split, load_images

__all__ = [
    "DataError",
    "GaussianScaleMixture",
    "ImageBatches",
    "MixtureBatches",
    "image_split",
    "make_test_data",
    "make_training_data",
]


def _image_splits(cfg) -> tuple[np.ndarray, np.ndarray]:
    if cfg.data == "demo":
        from .demo import demo_patches

        return demo_patches(cfg.channels, cfg.image_size, "train"), demo_patches(cfg.channels, cfg.image_size, "test")
    if is_prepared(cfg.data):  # memory-mapped: train split for training, val split for evaluation
        return tuple(check_images(as_channels(load_split(cfg.data, split)[0], cfg.channels), f"{cfg.data} ({split})",
                                  cfg.channels, cfg.image_size) for split in ("train", "val"))
    images = load_images(cfg.data, cfg.channels, cfg.image_size)
    train, test = holdout_split(len(images))
    return images[train], images[test]


def training_subset(images: np.ndarray, subset: str) -> np.ndarray:
    """The training images a run sees: all (''), the first N ('first:N') or the last N ('last:N')."""
    if not subset:
        return images
    end, count = parse_subset(subset)
    if count > len(images):
        raise DataError(f"subset {subset} asks for more than the {len(images)} training images")
    return images[:count] if end == "first" else images[len(images) - count:]


def make_training_data(cfg, rank: int = 0, world: int = 1):
    """The training stream named by ``cfg.data`` ('demo', 'gsm', a folder / .npy path, a prepared dataset),
    restricted to ``cfg.subset`` of the training images."""
    if cfg.data == "gsm":
        if cfg.subset:
            raise DataError("subset applies to image data, not to the endless GSM stream")
        return MixtureBatches(GaussianScaleMixture(cfg.gsm_dim, cfg.gsm_sigmas), seed=cfg.seed * 1_000_003 + rank)
    train = training_subset(_image_splits(cfg)[0], cfg.subset)
    if is_prepared(cfg.data):
        return prepared_batches(cfg, train, rank, world)
    if cfg.loader == "dali":
        raise DataError(f"--loader dali reads prepared datasets only (dsm-fast data prepare), not {cfg.data}")
    return ImageBatches(train, seed=cfg.seed, rank=rank, world=world)


def image_split(cfg, split: str) -> np.ndarray:
    """Every image of the run's ``train`` (restricted to ``cfg.subset``) or ``test`` split: uint8 (N, C, H, W),
    a memory map (or a :class:`~dsm_fast.data.images.GrayView` of one) for a prepared dataset."""
    if cfg.data == "gsm":
        raise DataError("the GSM data has no image splits (its samples are fresh draws)")
    train, test = _image_splits(cfg)
    return training_subset(train, cfg.subset) if split == "train" else test


def make_test_data(cfg, n: int | None, seed: int = 12345) -> tuple[torch.Tensor, bool]:
    """(the first n held-out samples — all with n = None — as floats, images in [0, 1]; whether they are 8-bit
    quantized). GSM: n fresh draws."""
    if cfg.data == "gsm":
        if n is None:
            raise DataError("the GSM data has no fixed test set: give a number of samples")
        mixture = GaussianScaleMixture(cfg.gsm_dim, cfg.gsm_sigmas)
        return mixture.sample(n, torch.Generator().manual_seed(seed)), False
    test = image_split(cfg, "test")
    if len(test) == 0:
        raise DataError(f"{cfg.data}: no held-out images (a single image cannot be split; use ≥ 2 images, or "
                        f"--eval-images 0 when training)")
    return torch.from_numpy(np.array(test[:n])).float() / 255.0, True  # a copy: test may be a read-only map
