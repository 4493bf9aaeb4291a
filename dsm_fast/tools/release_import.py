"""Importing the paper's released checkpoints (FlorentinGuth/DualScoreMatching, commit c84182f) as dsm_fast runs,
without running any code from the file.

The release writes ``torch.save({"step", "args", "state_dict", "train_perf", "test_perf"})``: ``args`` is an
``argparse.Namespace``, the perfs are objects of the release's own classes, ``state_dict`` holds the UNet's 85
tensors under one or two ``network.`` prefixes. The file is read by torch's restricted unpickler
(``weights_only=True``): before unpickling starts, every global the pickle names is checked; argparse.Namespace and
the classes of the release's own modules are admitted as :class:`InertRecord` stand-ins (our class, which only keeps
what the pickle hands it), numpy arrays and scalars as themselves, anything else (``os.system``, ``builtins.eval``, …) refuses the file in one line.
The tensors are mapped onto the ``paper`` preset by dsm_fast/tools/release.py (names, shapes, colour or grayscale
from the first convolution) and written as a run folder like the trainer's: ``config.json`` + ``checkpoints/step_N/``.
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import struct
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointError, save_checkpoint
from ..config import TrainConfig
from ..data.imagenet64 import SafeUnpickler, sha256_file
from .release import RELEASE_COMMIT, RELEASE_REPOSITORY, ReleaseMismatch, from_release, infer_channels, strip_prefixes

# Where the release's pickled classes live: its top-level modules (and ``__main__`` when main.py ran as a script).
RELEASE_MODULES = ("__main__", "main", "noise", "data", "trackers", "tensor_ops", "utils", "networks")
RECORD_GLOBALS = ("argparse.Namespace", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.Path")
# the classes of numpy's dtype objects (np.dtype('f8') is a numpy.dtypes.Float64DType): never named in a pickle,
# but the restricted unpickler sets a dtype's state only when its class is allowlisted
NUMPY_DTYPE_CLASSES = sorted({type(np.dtype(code)) for code in np.typecodes["All"]}, key=str)
# what a damaged or hostile archive makes the static scan or the restricted unpickler raise
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError,
               EOFError, OSError, struct.error, zipfile.BadZipFile)


class ReleaseError(CheckpointError):
    """A release checkpoint that cannot be imported (unsafe, unreadable, or another architecture): one line."""


class InertRecord:
    """Stand-in for one of the release's classes: keeps the constructor arguments and the pickled state, runs
    nothing. ``record.get(name)`` reads a field of the pickled object's ``__dict__``."""

    pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        record = object.__new__(cls)
        record.args, record.fields = args, {}
        return record

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, slots)
        self.fields = dict(state) if isinstance(state, dict) else {"state": state}

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    def __repr__(self) -> str:
        return f"<record of {self.pickled_name}: {', '.join(map(str, self.fields))}>"


def admitted_as_record(name: str) -> bool:
    """Whether a pickled global may be replaced by an :class:`InertRecord`: argparse.Namespace, paths, and
    class-like names (capitalised) of the release's own modules."""
    module, _, attribute = name.rpartition(".")
    own = module.split(".")[0] in RELEASE_MODULES and attribute[:1].isupper()
    return name in RECORD_GLOBALS or own


def _record_class(name: str) -> type:
    return type(name.rpartition(".")[2], (InertRecord,), {"pickled_name": name})


@dataclass
class ReleaseCheckpoint:
    step: int
    args: InertRecord | None
    state_dict: dict[str, torch.Tensor]  # prefixes stripped, in the file's order
    train_perf: InertRecord | None
    test_perf: InertRecord | None


def _safe_load(path: Path) -> Any:
    """torch.load(weights_only=True) with the release's classes admitted as inert records; refuses anything else."""
    if not path.is_file():
        raise ReleaseError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ReleaseError(f"{path}: not a torch.save archive (a zip file), so not a release checkpoint")
    try:
        unknown = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except LOAD_ERRORS as error:  # the static scan failed: a corrupt pickle, or an opcode it does not accept
        raise ReleaseError(f"{path}: unreadable pickle ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    numpy_globals = {f"{module}.{name}": obj for (module, name), obj in SafeUnpickler.ALLOWED.items()}
    refused = [name for name in unknown if name not in numpy_globals and not admitted_as_record(name)]
    if refused:
        raise ReleaseError(f"{path}: refused: the pickle asks for {', '.join(refused)}, which no release checkpoint "
                           f"holds (nothing from the file was run)")
    admitted = [(numpy_globals[name], name) if name in numpy_globals else (_record_class(name), name)
                for name in unknown] + NUMPY_DTYPE_CLASSES  # numpy.dtype(...) objects get their state set
    with torch.serialization.safe_globals(admitted):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except LOAD_ERRORS as error:  # the restricted unpickler refused, or the archive is damaged
            first = str(error).strip().splitlines()
            raise ReleaseError(f"{path}: refused by the restricted unpickler "
                               f"({first[0] if first else type(error).__name__})") from None


def read_release(path: str | Path) -> ReleaseCheckpoint:
    """The release checkpoint at ``path``, read safely and checked for the five keys the release writes."""
    path = Path(path)
    payload = _safe_load(path)
    if not isinstance(payload, dict) or not {"step", "state_dict"} <= set(payload):
        keys = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        raise ReleaseError(f"{path}: not a release checkpoint (expected a dict with step, args, state_dict, "
                           f"train_perf, test_perf; got {keys})")
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReleaseError(f"{path}: state_dict is not a mapping of names to tensors")
    stripped = strip_prefixes({str(key): value for key, value in state.items()})
    if len(stripped) != len(state):
        raise ReleaseError(f"{path}: state_dict names a tensor twice (with and without a wrapper prefix)")
    records = {key: payload.get(key) if isinstance(payload.get(key), InertRecord) else None
               for key in ("args", "train_perf", "test_perf")}
    try:
        step = int(payload["step"])
    except (TypeError, ValueError):
        raise ReleaseError(f"{path}: step is {payload['step']!r}, not an integer") from None
    return ReleaseCheckpoint(step, records["args"], stripped, records["train_perf"], records["test_perf"])


# --- what the run needs from the checkpoint --------------------------------------------------------------
def noise_variance(level: Any, default: float) -> float:
    """The release's noise level {'x': value, 'unit': psnr | var | std} as a variance (peak 1: t = 10^(−psnr/10))."""
    if not isinstance(level, dict) or not isinstance(level.get("x"), (int, float)):
        return default
    x, unit = float(level["x"]), level.get("unit")
    return {"psnr": 10.0 ** (-x / 10.0), "var": x, "std": x * x}.get(unit, default)


def check_energy_model(args: InertRecord | None, origin: str) -> None:
    """Refuse a release run that is not an energy U = ½⟨y, f(y, t)⟩ (e.g. its DenoiserModel checkpoints): args.model
    EnergyModel, reparam_kwargs (a dict literal) with conversion inner_product and every other option of the
    release's Reparameterization (scalings by t^a, residual, edm_like, …) off: None, False or 0."""
    if args is None:
        return
    model, text = args.get("model", "EnergyModel"), args.get("reparam_kwargs", "{'conversion': 'inner_product'}")
    try:
        reparam = ast.literal_eval(text) if isinstance(text, str) else None
    except (ValueError, SyntaxError):
        reparam = None
    energy = (model == "EnergyModel" and isinstance(reparam, dict) and reparam.get("conversion") == "inner_product"
              and all(v in (None, False, 0) for k, v in reparam.items() if k != "conversion"))
    if not energy:
        raise ReleaseError(f"{origin}: a release {model} with reparameterization {text}; dsm_fast imports the energy "
                           f"models U = ½⟨y, f(y, t)⟩ only (EnergyModel, conversion inner_product)")


def perf_summary(perf: InertRecord | None) -> dict[str, float]:
    """The plain numbers of a release PerformanceInfo (loss, log normalization constant) that are present."""
    out = {}
    for field in ("loss", "log_normalization_constant"):
        value = perf.get(field) if perf is not None else None
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)):
            out[field] = float(value)
    return out


# --- the run folder ------------------------------------------------------------------------------------------
def paper_weights(state: dict[str, torch.Tensor], origin: str) -> tuple[dict[str, torch.Tensor], int]:
    """(dsm_fast weights of the paper preset, channels): names and shapes by dsm_fast/tools/release.py, channels from
    the first convolution; every tensor must be finite floating point (stored as float32, the release's dtype)."""
    try:
        channels = infer_channels(state)
        if channels not in (1, 3):
            raise ReleaseMismatch(f"tensor 'encoder.0.0.weight' takes {channels} input channels; the paper's models "
                                  f"take colour (3) or grayscale (1) images")
        weights = from_release(state, "paper", channels)
    except ReleaseMismatch as error:
        raise ReleaseError(f"{origin}: {error}") from None
    for name, tensor in weights.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ReleaseError(f"{origin}: tensor {name} is not finite floating point ({tensor.dtype})")
    return {name: tensor.detach().float().contiguous() for name, tensor in weights.items()}, channels


def imported_config(args: InertRecord | None, channels: int, data: str, out: Path) -> TrainConfig:
    """The imported run's configuration: preset paper, the release's noise range and optimisation settings."""
    values: dict[str, Any] = {"model": "paper", "channels": channels, "data": data, "image_size": 64, "out": str(out)}
    if args is not None:
        values["t_min"] = noise_variance(args.get("min_noise_level"), TrainConfig.t_min)
        values["t_max"] = noise_variance(args.get("max_noise_level"), TrainConfig.t_max)
        for key, name in (("batch_size", "train_batch_size"), ("steps", "num_training_steps"), ("lr", "lr"),
                          ("lr_halve_every", "lr_decay_every")):
            if isinstance(args.get(name), (int, float)) and not isinstance(args.get(name), bool):
                values[key] = type(getattr(TrainConfig, key))(args.get(name))
    return replace(TrainConfig(), **values).validate()


def import_release(path: str | Path, out: str | Path, data: str = "demo") -> dict[str, Any]:
    """Write the release checkpoint at ``path`` as a dsm_fast run in ``out`` (absent or empty): ``config.json``,
    ``checkpoints/step_N/model.safetensors`` and ``imported.json`` (provenance, the release's own losses).
    Atomic: written in a hidden folder beside ``out``, then renamed into place."""
    path, out = Path(path), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReleaseError(f"{out} exists and is not an empty folder; choose another --out")
    if data != "demo" and not Path(data).exists():
        raise ReleaseError(f"--data {data}: not found (a prepared ImageNet64 folder, images, a .npy, or demo)")
    release = read_release(path)
    check_energy_model(release.args, str(path))
    weights, channels = paper_weights(release.state_dict, str(path))
    cfg = imported_config(release.args, channels, data, out)
    args = release.args.fields if release.args is not None else {}
    provenance = {"source": str(path.resolve()), "sha256": sha256_file(path),
                  "release": f"{RELEASE_REPOSITORY}@{RELEASE_COMMIT}", "step": release.step, "channels": channels, "tensors": len(weights), "train_perf": perf_summary(release.train_perf),
                  "test_perf": perf_summary(release.test_perf),
                  "args": {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, type(None), dict))}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.import-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(cfg.to_json())
        (tmp / "imported.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
        save_checkpoint(tmp, release.step, weights, {"imported_from": provenance["source"]})
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return provenance
