"""Image data as uint8 arrays (N, C, H, W): loading from user files, and shuffled, flipped batches
whose position (epoch, offset) is the whole state, so a resumed run sees the same next batches."""
from __future__ import annotations

import tokenize
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
        layout = "; the array looks channels-last: store it as (N, C, H, W)" if (
            images.shape[1] != channels and images.shape[3] in (1, 3) and images.shape[1] == images.shape[2]) else ""
        raise DataError(f"{origin}: images have shape {images.shape[1:]}, the run expects {(channels, size, size)} "
                        f"(channels, height, width: its --channels and --image-size){layout}")
    return images


def luma(rgb: np.ndarray, axis: int) -> np.ndarray:
    """ITU-R 601 luma of uint8 RGB along ``axis`` (kept, of size 1), exactly as PIL's ``convert('L')``:
    L = R·299/1000 + G·587/1000 + B·114/1000 in 16-bit fixed point, (19595 R + 38470 G + 7471 B + 2¹⁵) >> 16."""
    r, g, b = (np.take(rgb, [i], axis=axis).astype(np.uint32) for i in range(3))
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).astype(np.uint8)


class GrayView:
    """A uint8 (N, 3, H, W) array (e.g. a memory map) seen as (N, 1, H, W) by :func:`luma`: slices stay lazy views,
    index arrays and ``np.asarray`` convert just the rows they read (in blocks), never a gray copy of the whole."""

    dtype = np.dtype(np.uint8)
    ndim = 4
    BLOCK = 4096  # rows converted at a time by np.asarray

    def __init__(self, rgb: np.ndarray):
        self.rgb = rgb
        self.shape = (rgb.shape[0], 1, *rgb.shape[2:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return GrayView(self.rgb[index])
        return luma(self.rgb[index], axis=1 if np.ndim(index) else 0)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.uint8)
        for start in range(0, len(self), self.BLOCK):
            out[start:start + self.BLOCK] = luma(self.rgb[start:start + self.BLOCK], axis=1)
        return out if dtype is None else out.astype(dtype)


def as_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """A colour uint8 (N, 3, H, W) array as the run's ``channels``: a :class:`GrayView` for 1, unchanged otherwise."""
    return GrayView(images) if channels == 1 and images.ndim == 4 and images.shape[1] == 3 else images


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, C≥3) uint8 → (channels, H, W); colour to gray by ITU-R 601 luma (:func:`luma`)."""
    if image.ndim == 2:
        image = image[:, :, None]
    image = image[:, :, :3]
    if channels == 1 and image.shape[2] == 3:
        image = luma(image, axis=2)
    elif channels == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def to_8bit(img, origin: str):
    """A PIL image as 8-bit ``L`` or ``RGB``. 16-bit gray (modes I;16*) is scaled, v ↦ round(255 v / 65535);
    transparency (RGBA, LA, PA, palettes with a transparent entry) is composited onto black, c ↦ round(c α / 255);
    palettes and the other modes are converted; 32-bit integer and floating-point pixels are refused."""
    from PIL import Image

    if img.mode in ("L", "RGB"):
        return img
    if img.mode.startswith("I;16"):
        values = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    if img.mode in ("I", "F"):
        raise DataError(f"{origin}: {'32-bit integer' if img.mode == 'I' else 'floating-point'} pixels are not "
                        f"supported; save the image with 8 or 16 bits per channel")
    if "A" in img.mode or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA")).astype(np.uint32)
        return Image.fromarray(((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8), "RGB")
    return img.convert("RGB")


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
                array = np.asarray(to_8bit(img, str(path)))
        except OSError as error:
            raise DataError(f"{path}: cannot read image ({error})") from None
        if array.shape[:2] != (size, size):
            raise DataError(f"{path}: image is {array.shape[1]}×{array.shape[0]}, the run expects {size}×{size}")
        images.append(to_channels(array, channels))
    return np.stack(images)


def load_npy(path: Path, hint: str = "", **options) -> np.ndarray:
    """``np.load(path, allow_pickle=False, **options)``, or one DataError naming the file (a damaged header makes
    numpy raise ValueError, SyntaxError or tokenize.TokenError); ``hint`` says what to do about it."""
    try:
        return np.load(path, allow_pickle=False, **options)
    except (ValueError, OSError, SyntaxError, tokenize.TokenError) as error:
        reason = str(error).splitlines()[0][:120] if not isinstance(error, tokenize.TokenError) else error.args[0]
        raise DataError(f"{path}: cannot read as .npy (damaged or not an array: {reason}){hint}") from None


def load_images(path: str | Path, channels: int, size: int) -> np.ndarray:
    """A folder of images or a .npy uint8 array (N, C, H, W), validated."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data not found: {path}")
    if path.is_dir():
        return check_images(load_image_folder(path, channels, size), str(path), channels, size)
    if path.suffix != ".npy":
        raise DataError(f"{path}: expected a folder of images or a .npy array")
    images = load_npy(path, mmap_mode="r")
    return check_images(as_channels(images, channels), str(path), channels, size)


def holdout_split(n: int, fraction: float = 0.05, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """A fixed split of range(n) into (train, held-out) indices; at least one image on each side if n ≥ 2."""
    order = np.random.default_rng(seed).permutation(n)
    held = min(max(1, round(fraction * n)), n - 1) if n >= 2 else 0
    return np.sort(order[held:]), np.sort(order[:held])


def pixel_statistics(images, count: int = 4096) -> tuple[float, float]:
    """(mean, variance) of the pixel values x = k/255 over ``count`` evenly spaced images of a uint8 (N, C, H, W)
    array, tensor or row reader (float64; a few thousand images pin both to about 1%)."""
    n = images.shape[0]
    index = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))
    x = torch.as_tensor(np.asarray(images[index])).double() / 255.0
    return float(x.mean()), float(x.var())


def shard_state(shared: dict[str, int], rank: int, world: int) -> dict[str, int]:
    """A rank's (epoch, offset) when the unsharded stream stands at (epoch, position): the positions p < position
    with p ≡ rank (mod world) are this rank's offset."""
    return {"epoch": int(shared["epoch"]), "offset": len(range(rank, int(shared["position"]), world))}


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
        self._order, self._flips = self.epoch_order(0), self.epoch_flips(0)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.images.shape[0], generator=g)[self.rank::self.world]

    def epoch_flips(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033)
        return (torch.rand(self.images.shape[0], generator=g) < 0.5)[self.rank::self.world]

    def next_batch(self, batch_size: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        indices, flips = [], []
        while len(indices) < batch_size:
            if self.offset >= len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order, self._flips = self.epoch_order(self.epoch), self.epoch_flips(self.epoch)
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
        self._order, self._flips = self.epoch_order(self.epoch), self.epoch_flips(self.epoch)

    def shared_position(self, states: list[dict[str, int]]) -> dict[str, int]:
        """Where the unsharded stream stands, from the states of all ``len(states)`` ranks (rank order):
        position = Σ_r offset_r, the positions of the epoch's order taken so far (the shards [r::W] interleave).
        Near an epoch's end, when N is not a multiple of W, a rank may have begun the next epoch: it counts as
        having finished its shard of the earliest epoch (a resume on another world size re-visits those images)."""
        epoch = min(int(state["epoch"]) for state in states)
        n, world = self.images.shape[0], len(states)
        return {"epoch": epoch, "position": sum(int(state["offset"]) if int(state["epoch"]) == epoch
                                                else len(range(rank, n, world)) for rank, state in enumerate(states))}

    def seek(self, shared: dict[str, int]) -> None:
        """Continue the unsharded stream at ``shared_position``: this rank's shard has had ``offset`` of them."""
        self.load_state_dict(shard_state(shared, self.rank, self.world))
