"""Downsampled ImageNet 64×64 (docs/method.md §7.1): reading the official files safely, and the prepared dataset.

A prepared dataset is a folder holding, per split (``train``, ``val``), ``{split}_images.npy`` (uint8
(N, 3, 64, 64), memory-mappable) and ``{split}_labels.npy`` (int16 (N,), 1…1000 for the official files),
and ``manifest.json`` (counts, sizes and sha256 of every output and source file). It is written by
:mod:`dsm_fast.data.prepare`; this module reads sources and prepared folders and batches them.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from .images import IMAGE_SUFFIXES, DataError, load_npy, to_8bit
from .memmap import MemmapBatches

SIZE, CHANNELS = 64, 3
ROW = CHANNELS * SIZE * SIZE  # 12,288 bytes per image: R, G, B planes of 64 × 64
NUM_CLASSES = 1000
TRAIN_BATCHES = 10
MANIFEST = "manifest.json"
FORMAT = "dsm_fast-imagenet64/1"
SPLITS = ("train", "val")
OFFICIAL = re.compile(r"^(train_data_batch_(?:[1-9]|10)|val_data)(\.npz)?$")


# --- the restricted unpickler ------------------------------------------------------------------------
def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a pickled dict of numpy arrays (and numpy scalars) refers to, under both module paths."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct
    scalar = np.float64(0).__reduce__()[0]  # numpy.(_)core.multiarray.scalar
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    return allowed


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the numpy-array allowlist."""


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global (os.system, …) is refused unresolved."""

    ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"refused to load global {module}.{name}") from None


def safe_unpickle(stream) -> object:
    return SafeUnpickler(stream).load()


# --- one official file ---------------------------------------------------------------------------------
def check_official(payload: object, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one official batch ({'data': uint8 (N, 12288), 'labels': N × 1…1000, 'mean'?}) → (images, labels)."""
    if not isinstance(payload, dict):
        raise DataError(f"{origin}: expected a dict with 'data' and 'labels', got {type(payload).__name__}")
    keys = set(payload)
    if not {"data", "labels"} <= keys or not keys <= {"data", "labels", "mean"}:
        raise DataError(f"{origin}: expected keys data, labels (and optionally mean), got {sorted(map(str, keys))}")
    data = payload["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DataError(f"{origin}: 'data' must be a uint8 array, got {getattr(data, 'dtype', type(data).__name__)}")
    if data.ndim != 2 or data.shape[1] != ROW or data.shape[0] == 0:
        raise DataError(f"{origin}: 'data' must have shape (N, {ROW}) with N > 0, got {data.shape}")
    try:
        labels = np.asarray(payload["labels"])
    except (ValueError, TypeError):
        raise DataError(f"{origin}: 'labels' is not a list of integers") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{origin}: 'labels' must be a list of integers, got {labels.dtype} of shape {labels.shape}")
    if len(labels) != len(data):
        raise DataError(f"{origin}: {len(labels)} labels for {len(data)} images")
    if labels.min() < 1 or labels.max() > NUM_CLASSES:
        raise DataError(f"{origin}: labels must lie in 1..{NUM_CLASSES}, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, CHANNELS, SIZE, SIZE), labels.astype(np.int16)


def read_official(stream, name: str, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one official batch from a binary stream: a pickle (restricted) or, for ``*.npz``, a numpy archive."""
    try:
        if name.endswith(".npz"):
            with np.load(io.BytesIO(stream.read()), allow_pickle=False) as archive:
                return check_official({key: archive[key] for key in archive.files}, origin)
        return check_official(safe_unpickle(stream), origin)
    except DataError:
        raise
    except RefusedGlobal as error:
        raise DataError(f"{origin}: not a plain pickle of numpy arrays ({error})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError,
            zipfile.BadZipFile) as error:
        raise DataError(f"{origin}: truncated or corrupt ({type(error).__name__}: {error})") from None


# --- finding the sources --------------------------------------------------------------------------------
class Source:
    """One official batch: a loose file, or a member of a zip archive (``container``)."""

    def __init__(self, name: str, path: Path, member: str | None = None):
        self.name, self.path, self.member = name, path, member

    @property
    def split(self) -> str:
        return "val" if self.name.startswith("val") else "train"

    @property
    def order(self) -> int:
        digits = re.findall(r"\d+", self.name)
        return int(digits[0]) if digits and self.split == "train" else 0

    @property
    def origin(self) -> str:
        return f"{self.path}:{self.member}" if self.member else str(self.path)

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        if self.member is None:
            with self.path.open("rb") as stream:
                return read_official(stream, self.name, self.origin)
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as stream:
                return read_official(stream, self.name, self.origin)
        except zipfile.BadZipFile as error:
            raise DataError(f"{self.origin}: corrupt zip member ({error})") from None


def parse_train_files(text: str) -> tuple[int, ...]:
    """'1,2' → (1, 2): the official train batches of a partial dataset, each in 1…10, sorted, no repeats."""
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() and 1 <= int(item) <= TRAIN_BATCHES for item in items) or len(set(items)) < len(items):
        raise DataError(f"--train-files takes distinct numbers in 1…{TRAIN_BATCHES}, comma-separated, e.g. 1,2; "
                        f"got {text!r}")
    return tuple(sorted(int(item) for item in items))


def partial_note(manifest: dict) -> str:
    """'' for a full dataset, else e.g. 'partial: train_data_batch 1, 2 of 10 (--train-files)'."""
    batches = manifest.get("train_files")
    if not batches or len(batches) == TRAIN_BATCHES:
        return ""
    return f"partial: train_data_batch {', '.join(map(str, batches))} of {TRAIN_BATCHES} (--train-files)"


def find_official(src: Path, train_files: tuple[int, ...] | None = None) -> list[Source]:
    """The official batches under ``src`` (loose or in zip archives), train 1…10 then val; each exactly once.
    ``train_files`` (e.g. (1, 2)) asks for those train batches only; the other train batches are not read."""
    found: dict[str, Source] = {}

    def add(source: Source) -> None:
        key = source.name.removesuffix(".npz")
        if key in found:
            raise DataError(f"{src}: {key} found twice ({found[key].origin} and {source.origin})")
        found[key] = source

    for path in sorted(p for p in src.iterdir() if p.is_file()):
        if OFFICIAL.match(path.name):
            add(Source(path.name, path))
        elif path.suffix == ".zip":
            try:
                with zipfile.ZipFile(path) as archive:
                    members = [m for m in archive.namelist() if OFFICIAL.match(Path(m).name)]
            except zipfile.BadZipFile as error:
                raise DataError(f"{path}: not a readable zip archive ({error})") from None
            for member in members:
                add(Source(Path(member).name, path, member))
    if not found:
        return []
    numbers = train_files or range(1, TRAIN_BATCHES + 1)
    expected = [f"train_data_batch_{i}" for i in numbers] + ["val_data"]
    missing = [name for name in expected if name not in found]
    if missing:
        wanted = f"train_data_batch_{', '.join(map(str, numbers))}" if train_files else \
            f"train_data_batch_1…{TRAIN_BATCHES}"
        hint = "" if train_files else "; --train-files 1,2 prepares a partial set"
        raise DataError(f"{src}: missing {', '.join(missing)} (expected {wanted} and val_data, loose or in "
                        f"Imagenet64_*.zip{hint})")
    chosen = [found[name] for name in expected]
    return sorted(chosen, key=lambda s: (s.split != "train", s.order))


def find_image_folders(src: Path) -> dict[str, list[tuple[Path, int]]]:
    """``src/train`` and ``src/val`` image files, sorted, each with a label: 1 + the index of its class
    subfolder (sorted names), or 0 for an image directly in the split folder."""
    splits = {}
    for split in SPLITS:
        folder = src / split
        if not folder.is_dir():
            raise DataError(f"{src}: no official ImageNet64 files and no {split}/ folder of images")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        classes = {name: i + 1 for i, name in enumerate(sorted({p.relative_to(folder).parts[0] for p in files
                                                                  if len(p.relative_to(folder).parts) > 1}))}
        splits[split] = [(p, classes.get(p.relative_to(folder).parts[0], 0)) for p in files]
    return splits


def read_image(path: Path) -> np.ndarray:
    """An image file as uint8 (3, 64, 64): RGB, the whole picture box-filtered (antialiased) to 64 × 64 as in
    the official downsampled ImageNet (no crop, aspect ratio not kept)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = to_8bit(img, str(path)).convert("RGB")
            if img.size != (SIZE, SIZE):
                img = img.resize((SIZE, SIZE), Image.Resampling.BOX, reducing_gap=None)
            return np.asarray(img).transpose(2, 0, 1)
    except OSError as error:
        raise DataError(f"{path}: cannot read image ({error})") from None


# --- checksums and the prepared folder -------------------------------------------------------------------
def sha256_file(path: Path, progress=None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return digest.hexdigest()


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read the manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a dsm_fast ImageNet64 manifest (format {FORMAT})")
    return manifest


def load_split(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 64, 64) memory-mapped read-only, labels int16 (N,)) of one prepared split."""
    folder = Path(folder)
    entry = read_manifest(folder)["splits"].get(split)
    if entry is None:
        raise DataError(f"{folder}: the prepared dataset has no {split} split")
    hint = f"; check the dataset with: dsm-fast data verify {folder}"
    images = load_npy(folder / entry["images"]["file"], hint, mmap_mode="r")
    labels = load_npy(folder / entry["labels"]["file"], hint)
    if images.shape != (entry["count"], CHANNELS, SIZE, SIZE) or images.dtype != np.uint8 or len(labels) != len(images):
        raise DataError(f"{folder}: {split} split does not match its manifest; run dsm-fast data verify")
    return images, labels


def verify(folder: str | Path, progress: bool = True) -> dict:
    """Re-check every output file of a prepared dataset (size, sha256, shape) against its manifest."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    manifest = read_manifest(folder)
    entries = [(split, entry[kind]) for split, entry in manifest["splits"].items() for kind in ("images", "labels")]
    total = sum(item["size"] for _, item in entries)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
        for split, item in entries:
            path = folder / item["file"]
            if not path.is_file():
                raise DataError(f"{path}: missing")
            if path.stat().st_size != item["size"]:
                raise DataError(f"{path}: {path.stat().st_size} bytes, the manifest says {item['size']}")
            if sha256_file(path, bar) != item["sha256"]:
                raise DataError(f"{path}: sha256 differs from the manifest (modified or corrupt)")
        for split in manifest["splits"]:
            load_split(folder, split)
    return manifest


def prepared_batches(cfg, images: np.ndarray, rank: int = 0, world: int = 1):
    """The training stream of a prepared split by ``cfg.loader``: 'cpu' → :class:`MemmapBatches`; 'dali' →
    :class:`~dsm_fast.data.dali.DaliBatches` or a one-line error saying why not; 'auto' → DALI on a CUDA device
    when it is installed, else quietly the CPU loader."""
    if cfg.loader != "cpu":
        from . import dali

        device_id = dali.device_index(cfg.device)
        reason = dali.unavailable_reason(device_id)
        if reason is None and (cfg.loader == "dali" or device_id is not None):
            return dali.DaliBatches(images, seed=cfg.seed, rank=rank, world=world, device_id=device_id)
        if cfg.loader == "dali":
            raise DataError(f"--loader dali: {reason}")
    return MemmapBatches(images, seed=cfg.seed, rank=rank, world=world)


def time_loader(folder: str | Path, loader: str = "cpu", batch_size: int = 128, batches: int = 100,
                warmup: int = 5, device: str = "cpu", seed: int = 0) -> dict:
    """Images/s of one loader over a prepared train split (``dsm-fast bench --data``): batches as the trainer
    takes them (float on ``device``), CUDA synchronized before the clock is read."""
    import dataclasses
    import statistics
    import time

    from ..config import TrainConfig

    cfg = dataclasses.replace(TrainConfig(), data=str(folder), loader=loader, device=device, seed=seed)
    stream = prepared_batches(cfg, load_split(folder, "train")[0])
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    times = []
    for i in range(warmup + batches):
        begin = time.perf_counter()
        stream.next_batch(batch_size, target)
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        if i >= warmup:
            times.append(time.perf_counter() - begin)
    median = statistics.median(times)
    return {"loader": type(stream).__name__, "batch_size": batch_size, "batches": batches,
            "ms_per_batch": 1e3 * median, "img_per_s": batch_size / median,
            "img_per_s_mean": batch_size * len(times) / sum(times)}
