"""Checkpoints: weights as safetensors, everything else (optimizer, EMA, RNG, step, data position) in a
``state.pt`` read back with ``weights_only=True``. Each checkpoint is written into a temporary folder and
renamed into place, so a crash never leaves a half-written checkpoint that looks valid.

Layout:  RUN/config.json,  RUN/checkpoints/step_00001000/{model.safetensors, ema.safetensors, state.pt}
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "step_"


class CheckpointError(ValueError):
    """A missing or unreadable checkpoint, reported as one line."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    ema: dict[str, torch.Tensor] | None = None, keep_last: int = 3) -> Path:
    """Write one checkpoint atomically (temporary folder, then rename) and keep the ``keep_last`` newest."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors")
    if ema is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
    torch.save({**state, "step": step}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest checkpoint of a run folder."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no checkpoint found in {path}")
    return found[-1]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor] | None]:
    """(weights, state, ema weights or None) of a checkpoint folder (or the newest one of a run)."""
    folder = resolve_checkpoint(path)
    try:
        weights = load_file(folder / "model.safetensors", device=str(map_location))
        state = torch.load(folder / "state.pt", map_location=map_location, weights_only=True)
        ema_file = folder / "ema.safetensors"
        ema = load_file(ema_file, device=str(map_location)) if ema_file.is_file() else None
    except (OSError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({str(error).splitlines()[0]})") from None
    return weights, state, ema


def run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved configuration a run wrote next to its checkpoints."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a dsm_fast run folder (no config.json)")
    return json.loads(path.read_text())
