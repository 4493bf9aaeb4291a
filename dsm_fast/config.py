"""Run configuration: one frozen dataclass, resolved once from defaults ← named preset ← config file ← command
line, and written next to the run as ``config.json``."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user mistake in the configuration: reported as one line, exit code 2."""


@dataclass(frozen=True)
class TrainConfig:
    # model
    model: str = "paper"  # UNet preset (paper, small, tiny) or 'radial' for the analytic data set
    energy: str = "paper"  # paper (U = ½⟨y, f⟩) | gaussian (starts at the data's Gaussian: model/gaussian.py)
    # data
    data: str = "demo"  # 'demo' (embedded photographs), 'gsm' (Gaussian scale mixture), folder, .npy, prepared ImageNet64
    loader: str = "auto"  # auto (DALI when installed, CUDA and a prepared dataset; else cpu) | cpu | dali
    image_size: int = 64
    channels: int = 3
    gsm_dim: int = 1000
    gsm_sigmas: tuple[float, ...] = (1.0, 4.0)
    radial_offset: float = 0.0  # radial model: start mis-normalized by a·log t nats/dim (see RadialEnergy)
    subset: str = ""  # train on 'first:N' or 'last:N' of the training images only (disjoint runs for generalization)
    # objective and noise levels
    objective: str = "dual"  # dual | single | diffclf
    time_weight: float = 1.0  # λ in space + λ·time (or space + λ·classification for diffclf)
    diffclf_levels: int = 8  # diffclf: N noise levels log-spaced over [t_min, t_max] for the classifier
    t_min: float = 1e-9
    t_max: float = 1e3
    route: str = "auto"  # auto (fused for the UNet with dual/single, else reference) | reference | functional | fused
    kernels: str = "auto"  # fused route's NormAct and loss kernels: auto (triton on CUDA) | torch | triton | cuda
    compile: str = "auto"  # torch.compile of a first-order route's step: auto (on CUDA) | on | off
    cuda_graph: bool = False  # CUDA: capture the whole step once and replay it (static shapes, single engine)
    precision: str = "fp32"  # fp32 | bf16 (autocast, CUDA) | fp64
    # optimisation
    batch_size: int = 128
    steps: int = 1000
    lr: float = 5e-4
    lr_halve_every: int = 100_000
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    ema_decay: float = 0.0  # 0 disables the EMA copy
    optimizer: str = "auto"  # auto (apex FusedAdam if installed on CUDA, else torch Adam) | torch | apex
    # run
    seed: int = 0
    out: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 25
    checkpoint_every: int = 500
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops
    eval_images: int = 256  # held-out images for the NLL printed when training ends; 0 skips it
    progress: bool = True
    plots: bool = True  # write RUN/plots/ (loss curve, loss per noise level, denoising grid) when training ends
    # distributed (see dsm_fast/engine.py); batch_size is the global batch: each optimizer step sees
    # batch_size images, split over world size × grad_accum micro-batches
    engine: str = "single"  # single | ddp | deepspeed
    grad_accum: int = 1  # micro-batches per optimizer step on each rank
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0–3
    offload: bool = False  # DeepSpeed: optimizer state in CPU memory
    deepspeed_config: str = ""  # DeepSpeed: a JSON file used instead of the generated config
    dist_timeout: float = 600.0  # seconds a rendezvous or collective may wait before every rank stops

    def validate(self) -> TrainConfig:
        from .losses import OBJECTIVES
        from .model import PRESETS
        from .routes import ROUTES

        routes = ("auto", *ROUTES)
        checks = [
            (self.model in (*PRESETS, "radial"), f"model must be one of {', '.join((*PRESETS, 'radial'))}"),
            (self.route in routes, f"route must be {', '.join(routes[:-1])} or {routes[-1]} (compilation is --compile)"),
            (valid_device(self.device), "device must be auto, cpu, cuda or cuda:N"),
            (1 <= self.image_size <= MAX_IMAGE_SIZE, f"image_size must be in 1 … {MAX_IMAGE_SIZE}"),
            (self.gsm_dim > 0, "gsm_dim must be positive"),
            (len(self.gsm_sigmas) > 0 and all(0 < s < math.inf for s in self.gsm_sigmas),
             "gsm_sigmas must be positive, finite standard deviations"),
            (self.batch_size > 0, "batch_size must be positive"),
            (self.steps >= 0, "steps must be ≥ 0"),
            (0 < self.t_min < self.t_max < math.inf, "need 0 < t_min < t_max < inf"),
            (0 < self.lr < math.inf, "lr must be positive and finite"),
            (0 <= self.time_weight < math.inf, "time_weight must be ≥ 0 and finite"),
            (self.warmup_steps >= 0, "warmup_steps must be ≥ 0"),
            (0 <= self.grad_clip < math.inf, "grad_clip must be ≥ 0 (0 disables) and finite"),
            (self.eval_images >= 0, "eval_images must be ≥ 0 (0 skips)"),
            (math.isfinite(self.radial_offset), "radial_offset must be finite"),
            (self.lr_halve_every > 0, "lr_halve_every must be positive"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}"),
            (self.diffclf_levels >= 2, "diffclf_levels must be at least 2"),
            (self.objective != "diffclf" or self.route in ("auto", "reference"),
             "objective diffclf needs --route reference"),
            (self.kernels in ("auto", "torch", "triton", "cuda"), "kernels must be auto, torch, triton or cuda"),
            (self.compile in ("auto", "on", "off"), "compile must be auto, on or off"),
            (self.subset == "" or parse_subset(self.subset) is not None, "subset must be 'first:N' or 'last:N', N > 0"),
            (self.precision in ("fp32", "bf16", "fp64"), "precision must be fp32, bf16 or fp64"),
            (self.optimizer in ("auto", "torch", "apex"), "optimizer must be auto, torch or apex"),
            (self.channels in (1, 3), "channels must be 1 or 3"),
            (self.loader in ("auto", "cpu", "dali"), "loader must be auto, cpu or dali"),
            (self.max_bad_steps > 0, "max_bad_steps must be positive"),
            (self.log_every > 0 and self.checkpoint_every > 0, "log_every and checkpoint_every must be positive"),
            (self.engine in ("single", "ddp", "deepspeed"), "engine must be single, ddp or deepspeed"),
            (self.grad_accum > 0 and self.batch_size % self.grad_accum == 0,
             "grad_accum must be positive and divide batch_size (the global batch)"),
            (self.zero_stage in (0, 1, 2, 3), "zero_stage must be 0, 1, 2 or 3"),
            (self.engine == "deepspeed" or not (self.offload or self.deepspeed_config),
             "offload and deepspeed_config need --engine deepspeed"),
            (self.dist_timeout > 0 and not math.isnan(self.dist_timeout), "dist_timeout must be positive"),
            (self.radial_offset == 0 or self.model == "radial", "radial_offset needs --model radial"),
            (self.energy in ("paper", "gaussian"), "energy must be paper or gaussian"),
            (self.energy == "paper" or self.model != "radial", "energy gaussian needs a UNet preset, not radial"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


MAX_IMAGE_SIZE = 1024  # beyond it the paper's UNet does not fit in memory at any batch size

# What a resumed run may change: how long it trains, how it logs and checkpoints, when it gives up, the learning
# rate, and where and how it runs (engine and grad_accum: the same global batch, split over another world size).
# Everything else comes from the run's config.json (see check_resume).
RESUME_MAY_CHANGE = ("steps", "lr", "log_every", "checkpoint_every", "max_bad_steps", "eval_images", "progress",
                     "plots", "device", "dist_timeout", "out", "engine", "grad_accum")


def valid_device(name: str) -> bool:
    return re.fullmatch(r"auto|cpu|cuda(:\d+)?", name) is not None


def resume_flags() -> str:
    return ", ".join("--" + key.replace("_", "-") for key in RESUME_MAY_CHANGE if key != "out")


RESOLVED_AT_START = ("route", "kernels", "compile")  # 'auto' is decided once and config.json holds the decision
# What config.json records about the run's latest start beside its options, not options (--resume and --config skip
# them): 'compile_fell_back' ("step N: reason") when torch.compile failed and the step ran eagerly (routes.Compiled;
# a --resume compiles again), 'flush_denormal' when float32 subnormals were flushed on the CPU (dsm_fast/subnormals.py).
RUN_RECORD = ("compile_fell_back", "flush_denormal")


def check_resume(saved: TrainConfig, values: dict[str, Any]) -> None:
    """Refuse, naming it, an option of ``values`` that differs from the run's and may not change on resume
    ('auto' for an option decided at the start agrees with the run's decision)."""
    for key, value in values.items():
        if key in RESOLVED_AT_START and value == "auto":
            continue
        if key not in RESUME_MAY_CHANGE and value != getattr(saved, key):
            raise ConfigError(f"--resume: {key} is {value!r}, the run was made with {getattr(saved, key)!r}; "
                              f"a resumed run may change only {resume_flags()}")


# Named settings (``train --preset NAME``): values over the defaults, under a config file and the command line.
PRESETS: dict[str, dict[str, Any]] = {
    # The main job: a few minutes on a 2-core CPU that visibly learns (README, set-up). 32×32 grayscale patches
    # of the embedded photographs, the tiny UNet started at the data's Gaussian (--energy gaussian); the paper's
    # noise levels and loss.
    "demo": {"data": "demo", "model": "tiny", "energy": "gaussian", "channels": 1, "image_size": 32,
             "batch_size": 32, "steps": 1000, "lr": 2e-3, "checkpoint_every": 1000},
    # The paper's run (docs/method.md §6.1): the defaults, named.
    "paper": {},
}


def parse_subset(subset: str) -> tuple[str, int] | None:
    """'first:N' / 'last:N' → (end, N); None when malformed."""
    end, _, count = subset.partition(":")
    if end not in ("first", "last") or not count.isdigit() or int(count) <= 0:
        return None
    return end, int(count)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file of TrainConfig keys (a JSON file is valid YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot parse {path}: {str(error).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return values


def typed_like(kind: str, value: Any) -> bool:
    """Whether a typed config-file value is one the command line would accept for a field of type ``kind``:
    ``steps: 5.5`` or ``steps: true`` is not an int (bool is a subclass of int in Python), ``lr: 1`` is a float."""
    if isinstance(value, bool):
        return kind == "bool"
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float))
    if kind == "bool":
        return value in (0, 1)
    if kind.startswith("tuple"):
        return isinstance(value, (list, tuple)) and all(typed_like("float", v) for v in value)
    return False  # a str field takes strings only


def coerce(field: dataclasses.Field, value: Any, origin: str) -> Any:
    """Convert a file or command-line value to the field's type, or raise a one-line ConfigError."""
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    try:
        if not isinstance(value, str) and not typed_like(kind, value):  # a file's YAML/TOML value
            raise ValueError
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if kind.startswith("tuple"):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(float(v) for v in items)
        return {"int": int, "float": float, "str": str}[kind](value)
    except (ValueError, TypeError):
        raise ConfigError(f"{origin}: {field.name} expects {kind}, got {value!r}") from None


def given_options(file: str | None = None, overrides: dict[str, Any] | None = None,
                  preset: str | None = None) -> dict[str, Any]:
    """The options set explicitly: preset ← config file ← overrides (None values in overrides are ignored), coerced."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    known = {f.name: f for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    sources = ((f"preset {preset}", PRESETS[preset] if preset else {}),
               (str(file), read_config_file(file) if file else {}), ("command line", overrides or {}))
    for origin, source in sources:
        for key, value in source.items():
            key = key.replace("-", "_")
            if key in RUN_RECORD:  # a run's config.json used as a config file
                continue
            if key not in known:
                raise ConfigError(f"{origin}: unknown config key {key!r}")
            if value is not None:
                values[key] = coerce(known[key], value, origin)
    return values


def resolve_config(file: str | None = None, overrides: dict[str, Any] | None = None,
                   preset: str | None = None) -> TrainConfig:
    """defaults ← preset ← config file ← overrides (None values in overrides are ignored)."""
    return TrainConfig(**given_options(file, overrides, preset)).validate()
