"""Checkpoints: weights as safetensors, everything else (optimizer, EMA, RNG, step, data position) in a
``state.pt`` read back with ``weights_only=True``, and a ``manifest.json`` of SHA-256 digests written last.

Layout:  RUN/config.json,  RUN/checkpoints/step_00001000/{model.safetensors, ema.safetensors, state.pt,
manifest.json}; checkpoints that failed their checks or came after a divergence are moved to RUN/rejected/.

Guarantees: a checkpoint is written into a temporary folder and renamed into place, so a crash never leaves a
half-written checkpoint that looks valid (left-over temporary folders are swept by the next save); only finite
values are written; at load every file must match its digest (the engine's own files too, listed under
``native``) and the weights must be finite, else the checkpoint is named in one line. A checkpoint is *healthy*
when it was written outside a run of non-finite steps; the rotation keeps the ``keep_last`` newest plus the
newest healthy one from before the current run of bad steps (see ``save_checkpoint``).

World size: ``state.pt`` holds each rank's stream state and, beside them, the unsharded data position, so a
run resumes on any number of processes (``restore_streams``; under DeepSpeed ``state.pt`` also holds the optimizer
state as full tensors, dsm_fast/zero_state.py). A checkpoint that cannot be written (a full
disk) is one line saying how much it needed; the previous checkpoints stay (``CheckpointWriteError``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError

CHECKPOINT_PREFIX = "step_"
CHECKPOINT_NAME = re.compile(r"step_(\d{8,})")
MANIFEST = "manifest.json"
REJECTED = "rejected"  # RUN/rejected/step_N: set aside by resume or by a divergence stop, never loaded


class CheckpointError(ValueError):
    """A missing, unreadable or corrupt checkpoint, reported as one line."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (a full disk, a lost mount): the line says where, why and how much it needed;
    the checkpoints written before stay."""

    def __init__(self, step: int, final: Path, error: OSError, needed: int):
        super().__init__(f"could not write the checkpoint of step {step} to {final} ({os_error_line(error)}; it "
                         f"needs about {needed / 2**20:.1f} MiB, free {free_bytes(final) / 2**20:.1f} MiB); the "
                         f"earlier checkpoints are intact: free space, then continue with --resume")


def os_error_line(error: OSError) -> str:
    """An operating-system error as a short phrase: "No space left on device", "File name too long", …"""
    if error.strerror:
        return error.strerror
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return 0


def checkpoint_bytes(weights: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None, state: Any) -> int:
    """Roughly the bytes a checkpoint takes: every tensor in it (the pickling overhead aside)."""
    total = 0

    def walk(node: Any) -> None:
        nonlocal total
        if isinstance(node, torch.Tensor):
            total += node.numel() * node.element_size()
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk([weights, ema or {}, state])
    return total


def make_run_dir(run_dir: Path) -> None:
    """Create the run folder, or refuse in one line why it cannot be (under a file, read-only, a name too long)."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"--out {run_dir} is a file; a run needs a folder") from None
    except NotADirectoryError:
        raise ConfigError(f"--out {run_dir}: cannot create the run folder (a part of the path is a file)") from None
    except OSError as error:
        raise ConfigError(f"--out {run_dir}: cannot create the run folder ({os_error_line(error)})") from None


def set_aside_incomplete(run_dir: Path) -> list[Path]:
    """At a run's start (under its lock): delete interrupted saves (checkpoints/.tmp-*) and move step folders
    without a manifest (never loaded; e.g. left by a crash) to RUN/rejected. Returns what was moved aside."""
    folder = Path(run_dir) / "checkpoints"
    moved = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.name.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)
        elif CHECKPOINT_NAME.fullmatch(path.name) and not (path / MANIFEST).is_file():
            moved.append(reject(path, run_dir))
    return moved


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(folder: Path) -> int:
    return int(CHECKPOINT_NAME.fullmatch(folder.name).group(1))


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def non_finite(tree: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested dict/list that hold NaN or ±inf (one host sync)."""
    named: list[tuple[str, torch.Tensor]] = []

    def walk(node: Any, name: str) -> None:
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() or node.is_complex():
                named.append((name, node))
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{name}.{key}" if name else str(key))
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{name}.{i}" if name else str(i))

    walk(tree, prefix)
    if not named:
        return []
    ok = torch.stack([t.detach().isfinite().all().cpu() for _, t in named])
    return [name for (name, _), good in zip(named, ok.tolist()) if not good]


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    ema: dict[str, torch.Tensor] | None = None, keep_last: int = 3, healthy: bool = True,
                    trusted_before: int | None = None, native: list[Path] = ()) -> Path:
    """Write one checkpoint atomically (temporary folder, then rename); refuse non-finite values.

    ``native``: files the engine wrote for this step (e.g. DeepSpeed's), digested into the manifest.
    Rotation keeps the ``keep_last`` newest checkpoints and the newest healthy one with step < ``trusted_before``
    (during a run of bad steps that began at step b: b, since the update that produced state b is suspect)."""
    bad = non_finite({"model": weights, "ema": ema or {}, "state": state})
    if bad:
        raise CheckpointError(f"step {step}: refusing to write a checkpoint of non-finite values "
                              f"({', '.join(bad[:3])}{', …' if len(bad) > 3 else ''})")
    run_dir = Path(run_dir)
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(".tmp-*"):  # interrupted saves (a crash or kill -9 mid-write)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors")
        if ema is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
        torch.save({**state, "step": step}, tmp / "state.pt")
        manifest = {"step": step, "healthy": healthy,
                    "files": {p.name: file_digest(p) for p in sorted(tmp.iterdir())},
                    "native": {p.relative_to(run_dir).as_posix(): file_digest(p) for p in sorted(native)}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    except OSError as error:  # e.g. a full disk: the previous checkpoints stay, the partial one goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(step, final, error, checkpoint_bytes(weights, ema, state)) from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    rotate(run_dir, keep_last, step + 1 if trusted_before is None else trusted_before)
    return final


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST} (incomplete, or written by an older dsm_fast)") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{folder}: unreadable {MANIFEST} ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{folder}: {MANIFEST} is not a checkpoint manifest")
    return manifest


def rotate(run_dir: Path, keep_last: int, trusted_before: int) -> None:
    found = list_checkpoints(run_dir)
    healthy = [p for p in found if checkpoint_step(p) < trusted_before and read_manifest(p).get("healthy")]
    keep = set(found[-keep_last:]) | set(healthy[-1:])
    for old in found:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (their manifest was written), oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=checkpoint_step)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest checkpoint of a run folder."""
    path = Path(path)
    if (path / MANIFEST).is_file() or (path / "state.pt").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no checkpoint found in {path}")
    return found[-1]


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """The manifest of ``folder`` after checking every file (its own and the engine's) against its digest."""
    manifest = read_manifest(folder)
    run_dir = folder.parent.parent
    expected = {folder / name: digest for name, digest in manifest["files"].items()}
    expected.update({run_dir / name: digest for name, digest in manifest.get("native", {}).items()})
    for path, digest in expected.items():
        if not path.is_file():
            raise CheckpointError(f"{folder}: {path.name} is missing")
        if file_digest(path) != digest:
            raise CheckpointError(f"{folder}: {path.name} does not match the digest written at save time (corrupt)")
    unlisted = [p for p in folder.iterdir() if p.name != MANIFEST and p not in expected]
    for parent in {p.parent for p in expected if p.parent != folder}:
        unlisted += [p for p in parent.iterdir() if p not in expected]
    if unlisted:
        raise CheckpointError(f"{folder}: {unlisted[0].name} was not written by the save")
    return manifest


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None]:
    """(weights, state, ema weights or None) of a checkpoint folder (or the newest one of a run), verified."""
    folder = resolve_checkpoint(path)
    verify_checkpoint(folder)
    try:
        weights = load_file(folder / "model.safetensors", device=str(map_location))
        state = torch.load(folder / "state.pt", map_location=map_location, weights_only=True)
        ema_file = folder / "ema.safetensors"
        ema = load_file(ema_file, device=str(map_location)) if ema_file.is_file() else None
    except (OSError, RuntimeError, SafetensorError, EOFError, ValueError) as error:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({str(error).splitlines()[0]})") from None
    bad = non_finite({"model": weights, "ema": ema or {}})
    if bad:
        raise CheckpointError(f"{folder}: holds non-finite weights ({bad[0]})")
    return weights, state, ema


def evaluated_weights(path: str | Path, weights: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
                      use_ema: bool) -> dict[str, torch.Tensor]:
    """The state dict an analysis loads: the weights, or with ``use_ema`` the EMA's parameters over them (the EMA
    holds parameters only; buffers such as a Gaussian start's statistics come from the weights)."""
    if not use_ema:
        return weights
    if ema is None:
        raise ConfigError(f"{path} has no EMA weights (train with --ema-decay)")
    return {**weights, **ema}


def restore_streams(run_dir: Path, state: dict[str, Any], world, data, noise_generator) -> None:
    """Put this rank's data stream, noise generator and torch RNG where checkpoint ``state`` left them, whatever
    world size wrote it: the same world size takes each rank's own state (bit-exact); another takes the unsharded
    data position ``data_position`` (``data.seek``), the noise generator (the same on every rank) and leaves the
    rank-local torch RNG as seeded (the engine's own state: ``engine.load``). Refused in one line: a stream without
    a shared position (GSM)."""
    saved = int(state.get("world_size", 1))
    if saved == world.size:
        local = state if saved == 1 else state["ranks"][world.rank]
        data.load_state_dict(local["data"])
        torch.set_rng_state(local["torch_rng"].cpu())
    elif "data_position" not in state:
        raise ConfigError(f"{run_dir} was written by {saved} process(es) and its data stream has no position that "
                          f"another world size can continue (GSM draws are per rank); resume it with {saved}")
    else:
        local = state if saved == 1 else state["ranks"][0]
        data.seek(state["data_position"])
    noise_generator.set_state(local["noise_generator"].cpu())


def reject(folder: Path, run_dir: Path) -> Path:
    """Move a checkpoint out of the way (RUN/rejected/step_N), kept for inspection, never loaded again."""
    target = Path(run_dir) / REJECTED / folder.name
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(exist_ok=True)
    os.replace(folder, target)
    return target


def reject_from(run_dir: Path, step: int) -> None:
    """Set aside (:func:`reject`) every checkpoint of the run from ``step`` on."""
    for folder in list_checkpoints(run_dir):
        if checkpoint_step(folder) >= step:
            reject(folder, run_dir)


def newest_loadable(run_dir: Path, map_location: str | torch.device = "cpu", warn: bool = True
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None]:
    """(weights, state, ema) of the newest healthy checkpoint of a run that passes its checks; each newer one is
    named in a warning on stderr (``warn``). A CheckpointError when none does."""
    for folder in reversed(list_checkpoints(run_dir)):
        try:
            if not read_manifest(folder).get("healthy"):
                raise CheckpointError(f"{folder}: written during a run of non-finite steps")
            return load_checkpoint(folder, map_location=map_location)
        except CheckpointError as error:
            if warn:
                print(f"warning: {error}; resuming from an earlier checkpoint", file=sys.stderr, flush=True)
    raise CheckpointError(f"{run_dir}: no checkpoint passes its checks; start a new run")


def drop_stats_after(path: Path, step: int) -> None:
    """Keep the rows of stats.jsonl up to ``step`` (a resume redoes the later ones; a torn last line goes too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def write_run_config(run_dir: str | Path, values: dict[str, Any]) -> None:
    """Write RUN/config.json atomically (a crash while it is rewritten mid-run leaves the previous one)."""
    path = Path(run_dir) / "config.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(values, indent=2))
    os.replace(tmp, path)


def run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved configuration a run wrote next to its checkpoints."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a dsm_fast run folder (no config.json)")
    try:
        values = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable ({error})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a JSON object of options")
    return values
