"""Image data as uint8 arrays (N, C, H, W): loading from user files, and shuffled, flipped batches
whose position (epoch, offset) is the whole state, so a resumed run sees the same next batches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A user mistake in the data (missing file, wrong shape or dtype): one line, exit code 2."""


def check_images(images: np.ndarray, origin: str, channels: int, size: int) -> np.ndarray:
    """Validate a uint8 (N, C, H, W) array against the run's channels and image size."""
    if images.dtype != np.uint8:
        raise DataError(f"{origin}: expected uint8 images, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise DataError(f"{origin}: expected a non-empty (N, C, H, W) array, got shape {images.shape}")
    if images.shape[1:] != (channels, size, size):
        raise DataError(f"{origin}: images have shape {images.shape[1:]}, the run expects "
                        f"{(channels, size, size)} (set --channels / --image-size)")
    return images


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, C≥3) uint8 → (channels, H, W); colour to gray by ITU-R 601 luma."""
    if image.ndim == 2:
        image = image[:, :, None]
    image = image[:, :, :3]
    if channels == 1 and image.shape[2] == 3:
        luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        image = np.clip(np.rint(luma), 0, 255).astype(np.uint8)[:, :, None]
    elif channels == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def load_image_folder(folder: Path, channels: int, size: int) -> np.ndarray:
    """Every image file in ``folder`` (sorted by name), each of exactly size × size pixels."""
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for path in files:
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img)
        except OSError as error:
            raise DataError(f"{path}: cannot read image ({error})") from None
        if array.shape[:2] != (size, size):
            raise DataError(f"{path}: image is {array.shape[1]}×{array.shape[0]}, the run expects {size}×{size}")
        images.append(to_channels(array, channels))
    return np.stack(images)


def load_images(path: str | Path, channels: int, size: int) -> np.ndarray:
    """A folder of images or a .npy uint8 array (N, C, H, W), validated."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data not found: {path}")
    if path.is_dir():
        return check_images(load_image_folder(path, channels, size), str(path), channels, size)
    if path.suffix != ".npy":
        raise DataError(f"{path}: expected a folder of images or a .npy array")
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise DataError(f"{path}: cannot read as .npy ({error})") from None
    return check_images(images, str(path), channels, size)


def holdout_split(n: int, fraction: float = 0.05, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """A fixed split of range(n) into (train, held-out) indices; at least one image on each side if n ≥ 2."""
    order = np.random.default_rng(seed).permutation(n)
    held = min(max(1, round(fraction * n)), n - 1) if n >= 2 else 0
    return np.sort(order[held:]), np.sort(order[:held])


def pixel_statistics(images, count: int = 4096) -> tuple[float, float]:
    """(mean, variance) of the pixel values x = k/255 over ``count`` evenly spaced images of a uint8 (N, C, H, W)
    array, tensor or row reader (float64; a few thousand images pin both to about 1%)."""
    n = images.shape[0]
    index = torch.linspace(0, n - 1, min(count, n)).round().long().unique()
    x = torch.as_tensor(np.asarray(images[index])).double() / 255.0
    return float(x.mean()), float(x.var())


class ImageBatches:
    """Batches of x ∈ [0, 1]^(C×H×W) drawn without replacement, reshuffled every epoch, flipped at random.

    Epoch e visits ``randperm(N, seed ⊕ e)[rank::world]`` and flips each position of that epoch by a coin
    drawn per epoch position (sliced the same way), so the shards of ``world`` ranks together see exactly
    the images and flips one unsharded stream would. The state is therefore just (epoch, offset).
    """

    quantized = True  # 8-bit images: NLL in bits/dim on the 0–255 scale adds 8

    def __init__(self, images: np.ndarray | torch.Tensor, seed: int = 0, flip: bool = True,
                 rank: int = 0, world: int = 1):
        self.images = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
        self.seed, self.flip, self.rank, self.world = seed, flip, rank, world
        self.epoch, self.offset = 0, 0
        self._order, self._flips = self._epoch_order(0), self._epoch_flips(0)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.images.shape[0], generator=g)[self.rank::self.world]

    def _epoch_flips(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033)
        return (torch.rand(self.images.shape[0], generator=g) < 0.5)[self.rank::self.world]

    def next_batch(self, batch_size: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        indices, flips = [], []
        while len(indices) < batch_size:
            if self.offset >= len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order, self._flips = self._epoch_order(self.epoch), self._epoch_flips(self.epoch)
            end = self.offset + batch_size - len(indices)
            indices.extend(self._order[self.offset:end].tolist())
            flips.extend(self._flips[self.offset:end].tolist())
            self.offset = min(end, len(self._order))
        batch = self.images[torch.tensor(indices)]
        if self.flip:
            batch = torch.where(torch.tensor(flips)[:, None, None, None], batch.flip(-1), batch)
        return batch.to(device=device).to(dtype) / 255.0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order, self._flips = self._epoch_order(self.epoch), self._epoch_flips(self.epoch)
