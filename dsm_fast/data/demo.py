"""The embedded default data: 64×64 (or size×size) patches of the photographs that ship inside
scikit-image, cut at two scales, made on first use and cached as a .npy file. The test split holds
the patches of photographs the training split never sees (patches overlap, so photos are the unit)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .images import to_channels

# Natural photographs bundled with scikit-image (no download): colour ones, then gray ones.
COLOUR_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                 "motorcycle_left.png", "retina.jpg")
GRAY_PHOTOS = ("camera.png", "moon.png", "brick.png", "grass.png", "gravel.png")
TEST_PHOTOS = ("rocket.jpg", "motorcycle_right.png")
SPLITS = ("train", "test")


def cache_dir() -> Path:
    return Path(os.environ.get("DSM_FAST_CACHE", Path.home() / ".cache" / "dsm_fast"))


def cut_patches(image: np.ndarray, size: int, stride: int) -> list[np.ndarray]:
    """All size×size windows of a (C, H, W) image at the given stride."""
    _, h, w = image.shape
    return [image[:, i:i + size, j:j + size] for i in range(0, h - size + 1, stride)
            for j in range(0, w - size + 1, stride)]


def make_demo_patches(channels: int = 3, size: int = 64, split: str = "train") -> np.ndarray:
    """uint8 (N, channels, size, size): patches at full scale and at half scale (antialiased)."""
    import skimage
    from skimage.transform import rescale

    photo_dir = Path(skimage.__file__).parent / "data"
    if split not in SPLITS:
        raise ValueError(f"unknown demo split {split!r}")
    photos = TEST_PHOTOS if split == "test" else COLOUR_PHOTOS + (GRAY_PHOTOS if channels == 1 else ())
    patches: list[np.ndarray] = []
    for name in photos:
        image = to_channels(skimage.io.imread(photo_dir / name), channels)
        for scale in (1.0, 0.5):
            scaled = image if scale == 1.0 else np.clip(np.rint(
                rescale(image.astype(np.float64), (1, scale, scale), anti_aliasing=True, preserve_range=True)),
                0, 255).astype(np.uint8)
            patches += cut_patches(scaled, size, size // 2)
    return np.stack(patches)


def demo_patches(channels: int = 3, size: int = 64, split: str = "train") -> np.ndarray:
    """The cached demo patches of one split, made (and written atomically) on first use."""
    tag = "_l601" if channels == 1 else ""  # gray patches by PIL's integer luma (earlier caches rounded floats)
    path = cache_dir() / f"demo_{split}_c{channels}_s{size}{tag}.npy"
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError):
            pass  # a damaged cache file is rebuilt below
    patches = make_demo_patches(channels, size, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, patches)
    os.replace(tmp, path)
    return patches
