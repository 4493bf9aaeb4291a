"""``dsm-fast data prepare``: official ImageNet64 files (or folders of images) → a prepared dataset folder.

Atomic: everything is written into a hidden temporary folder beside ``out`` that is renamed into place
only once complete, manifest last; a crash leaves at most that hidden folder, which the next run deletes.
Idempotent: when ``out`` already holds a dataset prepared from sources of the same names, sizes and
sha256 (and the same ``train_files``), nothing is done. ``train_files`` prepares a partial ImageNet64 from some of
the ten official train batches, for prototyping; the manifest records which.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .imagenet64 import (
    CHANNELS,
    FORMAT,
    MANIFEST,
    SIZE,
    SPLITS,
    TRAIN_BATCHES,
    find_image_folders,
    find_official,
    read_image,
    read_manifest,
    sha256_file,
)
from .images import DataError

HEADER_BYTES = 128  # .npy v1 header of a uint8 (N, 3, 64, 64) array, for any N < 10^12


def npy_header(count: int) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (count, CHANNELS, SIZE, SIZE)})
    header = buffer.getvalue()
    if len(header) != HEADER_BYTES:
        raise RuntimeError(f".npy header of {len(header)} bytes, expected {HEADER_BYTES}")
    return header


class ArrayWriter:
    """Streams uint8 (n, 3, 64, 64) blocks into a .npy file whose header (with the final count) is written last."""

    def __init__(self, path: Path):
        self.path, self.count, self.labels = path, 0, []
        self.stream = path.open("wb")
        self.stream.write(b"\0" * HEADER_BYTES)

    def write(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.stream.write(np.ascontiguousarray(images).data)
        self.labels.append(np.asarray(labels, dtype=np.int16))
        self.count += len(images)

    def close(self) -> None:
        self.stream.seek(0)
        self.stream.write(npy_header(self.count))
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        np.save(self.path.with_name(self.path.name.replace("_images", "_labels")), np.concatenate(self.labels))


# --- sources and their fingerprints ----------------------------------------------------------------------
def official_sources(sources) -> list[dict]:
    """One entry per source file (loose batch or zip archive), with the batches it holds."""
    files: dict[Path, list[str]] = {}
    for source in sources:
        files.setdefault(source.path, []).append(source.name)
    return [{"name": path.name, "path": str(path.resolve()), "size": path.stat().st_size,
             "mtime_ns": path.stat().st_mtime_ns, "batches": names} for path, names in files.items()]


def folder_sources(folders: dict[str, list[tuple[Path, int]]], src: Path) -> list[dict]:
    entries = []
    for split, files in folders.items():
        stats = [path.stat() for path, _ in files]
        entries.append({"name": split, "path": str((src / split).resolve()), "files": len(files),
                        "size": sum(s.st_size for s in stats), "mtime_ns": max(s.st_mtime_ns for s in stats)})
    return entries


def same_sources(old: list[dict], new: list[dict], exact: tuple[str, ...]) -> bool:
    def pick(entries: list[dict]) -> list[tuple]:
        return sorted(tuple(e.get(k) for k in exact) for e in entries)

    return pick(old) == pick(new)


def outputs_present(out: Path, manifest: dict) -> bool:
    items = [entry[kind] for entry in manifest["splits"].values() for kind in ("images", "labels")]
    return all((out / i["file"]).is_file() and (out / i["file"]).stat().st_size == i["size"] for i in items)


# --- writing --------------------------------------------------------------------------------------------
def write_official(sources, tmp: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    writers = {split: ArrayWriter(tmp / f"{split}_images.npy") for split in SPLITS}
    with tqdm(sources, unit="file", desc="prepare", disable=not progress) as bar:
        for source in bar:
            bar.set_postfix_str(source.name)
            images, labels = source.read()
            writers[source.split].write(images, labels)
    for writer in writers.values():
        writer.close()


def write_folders(folders: dict[str, list[tuple[Path, int]]], src: Path, tmp: Path,
                  progress: bool) -> dict[str, str]:
    """Decode and resize every image (threads; PIL releases the GIL); returns a content digest per split."""
    from tqdm.auto import tqdm

    def load(item: tuple[Path, int]) -> tuple[np.ndarray, str]:
        return read_image(item[0]), sha256_file(item[0])

    digests = {}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=sum(map(len, folders.values())), unit="img", desc="prepare", disable=not progress) as bar:
        for split, files in folders.items():
            writer, digest = ArrayWriter(tmp / f"{split}_images.npy"), hashlib.sha256()
            for start in range(0, len(files), 1024):
                chunk = files[start:start + 1024]
                results = list(pool.map(load, chunk))
                writer.write(np.stack([image for image, _ in results]), [label for _, label in chunk])
                for (path, _), (_, sha) in zip(chunk, results, strict=True):
                    digest.update(f"{path.relative_to(src / split).as_posix()}:{sha}\n".encode())
                bar.update(len(chunk))
            writer.close()
            digests[split] = digest.hexdigest()
    return digests


def describe_outputs(tmp: Path) -> dict:
    splits = {}
    for split in SPLITS:
        images = np.load(tmp / f"{split}_images.npy", mmap_mode="r", allow_pickle=False)
        entry = {"count": int(images.shape[0])}
        for kind in ("images", "labels"):
            path = tmp / f"{split}_{kind}.npy"
            entry[kind] = {"file": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}
        splits[split] = entry
    return splits


def prepare(src: str | Path, out: str | Path, progress: bool = True,
            train_files: tuple[int, ...] | None = None) -> tuple[dict, bool]:
    """Prepare ``src`` into ``out``; returns (manifest, whether anything was written). ``train_files`` (official
    sources only): the numbers of the train batches to read, e.g. (1, 2); None reads all ten."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError(f"source folder not found: {src}")
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not a prepared dataset; choose an empty or new --out")
    official = find_official(src, train_files)
    if train_files and not official:
        raise DataError(f"{src}: --train-files selects official train batches, and none are there")
    folders = None if official else find_image_folders(src)
    sources = official_sources(official) if official else folder_sources(folders, src)
    batches = list(train_files or range(1, TRAIN_BATCHES + 1)) if official else None
    old = read_manifest(out) if (out / MANIFEST).is_file() else None
    if old and old.get("train_files", list(range(1, TRAIN_BATCHES + 1)) if official else None) != batches:
        old = None  # another choice of train batches: prepare again
    if old and outputs_present(out, old) and same_sources(old["sources"], sources, ("name", "size", "mtime_ns", "files")):
        return old, False
    if official:  # contents decide when timestamps differ (a copied download)
        for entry in sources:
            entry["sha256"] = sha256_file(Path(entry["path"]))
        if old and outputs_present(out, old) and same_sources(old["sources"], sources, ("name", "size", "sha256")):
            return old, False

    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        if official:
            write_official(official, tmp, progress)
        else:
            for entry, digest in zip(sources, write_folders(folders, src, tmp, progress).values(), strict=True):
                entry["sha256"] = digest
            if old and outputs_present(out, old) and same_sources(old["sources"], sources, ("name", "size", "sha256")):
                shutil.rmtree(tmp)
                return old, False
        manifest = {"format": FORMAT, "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "source_kind": "official" if official else "image folders", "image_shape": [CHANNELS, SIZE, SIZE],
                    "splits": describe_outputs(tmp), "sources": sources}
        if batches is not None:
            manifest["train_files"] = batches
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_folder(tmp, out)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            raise DataError(f"cannot write the prepared dataset ({error})") from None
        raise
    return manifest, True


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an older dataset there is moved aside first, then deleted."""
    aside = None
    if out.exists():
        aside = out.parent / f".{out.name}.tmp-old-{os.getpid()}"
        out.rename(aside)
    tmp.rename(out)
    if aside is not None:
        shutil.rmtree(aside)
