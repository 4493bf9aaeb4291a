"""Run configuration: one frozen dataclass, resolved once from defaults ← named preset ← config file ← command
line (or, on --resume, from the run's own config.json), and written next to the run as ``config.json``.

An option's whole story is here: its default, its help text and its choices (the field's metadata, which
``dsm-fast train --help`` shows), its checks (``TrainConfig.validate`` and the cross-option checks below), and how
'auto' is resolved once at the start (device, dtype, route, kernels, compilation). Every list of choices that
another module or subcommand uses is defined here, once. This module imports no torch and nothing of the package
at import time (``--help`` stays instant, and the modules that read these lists import this one, not the reverse);
the few functions that need torch, the model presets, the CUDA extension or a run folder import them inside."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

# The vocabularies: every closed list of choices of dsm_fast, named once.
ROUTES = ("reference", "functional", "fused")  # how ∇_y U and ∂_t U are formed (dsm_fast/routes.py)
FIRST_ORDER = ("functional", "fused", "score")  # routes whose step is a first-order graph, hence compilable
KERNELS = ("torch", "triton", "cuda")  # the fused route's NormAct and loss kernels
SWITCH = ("auto", "on", "off")  # compilation and optional accelerators: auto decides quietly, on insists, off never
PRECISIONS = ("fp32", "bf16", "fp64")
OBJECTIVES = ("dual", "single", "diffclf")  # dsm_fast/losses.py
ENERGIES = ("paper", "gaussian")  # dsm_fast/model/
LOADERS = ("auto", "cpu", "dali")
OPTIMIZERS = ("auto", "torch", "apex")
ENGINES = ("single", "ddp", "deepspeed")  # dsm_fast/engine.py
CHANNELS = (1, 3)
ZERO_STAGES = (0, 1, 2, 3)
CHECKPOINTS = ("none", "block")  # activation checkpointing of the fused graph (EDM2 presets: dsm_fast/model/edm2.py)
RESTORE_TASKS = ("inpaint", "superres", "deblur", "compressive")  # dsm-fast restore (analysis/measurements.py)


class ConfigError(ValueError):
    """A user mistake in the configuration: reported as one line, exit code 2."""


def option(default: Any, help: str = "", choices: tuple = (), note: str = "") -> Any:
    """A TrainConfig field: its default, its ``--help`` text and, for a closed vocabulary, its ``choices``
    (``note`` is appended to the one-line refusal of another value)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "note": note})


@dataclass(frozen=True)
class TrainConfig:
    # model
    model: str = option("paper", "UNet preset: paper, small, tiny (the paper's UNet) or edm2-s, edm2-xs, edm2-tiny "
                        "(EDM2-style attention UNet); or 'radial' for --data gsm")
    energy: str = option("paper", "paper (U = ½<y, f(y, t)>, the paper's) or gaussian (U starts at the data's "
                         "Gaussian energy and the UNet learns the difference; see dsm_fast/model/gaussian.py)",
                         ENERGIES)
    checkpoint_activations: str = option("none", "none or block: the fused route keeps only each block's input and "
                                         "recomputes the rest in the backward (EDM2 presets; less memory, about one "
                                         "more forward and adjoint)", CHECKPOINTS)
    # data
    data: str = option("demo", "'demo' (photographs shipped with scikit-image), 'gsm' (Gaussian scale mixture), a "
                       "folder or a .npy")
    loader: str = option("auto", "prepared ImageNet64 only: auto (DALI if installed and on CUDA, else cpu), cpu, or "
                         "dali", LOADERS)
    image_size: int = option(64)
    channels: int = option(3, choices=CHANNELS)
    gsm_dim: int = option(1000)
    gsm_sigmas: tuple[float, ...] = option((1.0, 4.0), "comma-separated standard deviations of the mixture components")
    radial_offset: float = option(0.0, "radial model: start mis-normalized, log p_t off by -a*log t nats/dim "
                                  "(normalization uses 0.02)")
    subset: str = option("", "train on 'first:N' or 'last:N' of the training images (disjoint runs for dsm-fast "
                         "generalization)")
    # objective and noise levels
    objective: str = option("dual", "dual (space + time score), single (space only) or diffclf (space + noise-level "
                            "classification; reference route only)", OBJECTIVES)
    time_weight: float = option(1.0, "λ in loss = space + λ·time (diffclf: space + λ·classification)")
    diffclf_levels: int = option(8, "diffclf: N noise levels, log-spaced over [t_min, t_max], that the classifier "
                                 "tells apart")
    t_min: float = option(1e-9, "the smallest noise variance t; training draws t log-uniform on [t_min, t_max] "
                          "(docs/method.md §2.1)")
    t_max: float = option(1e3, "the largest noise variance t, where p_t is close to N(0, t I) and the normalizing "
                          "constant is read (docs/method.md §3.1)")
    route: str = option("auto", "auto (fused for a UNet with dual/single, else reference), reference (eager double "
                        "backward), functional (torch.func; first-order) or fused (explicit adjoint, first-order; "
                        "Triton on CUDA)", ("auto", *ROUTES), note="(compilation is --compile)")
    kernels: str = option("auto", "the fused route's NormAct and loss kernels: auto (triton on CUDA, else torch), "
                          "torch, triton or cuda (the CUDA C++ NormAct, when built; second order by Triton)",
                          ("auto", *KERNELS))
    compile: str = option("auto", "torch.compile the first-order step: auto (on CUDA), on (bare --compile) or off; "
                          "falls back to eager with one warning", SWITCH)
    cuda_graph: bool = option(False, "CUDA, --engine single: capture the whole step (forward, backward, Adam, EMA) "
                              "once and replay it")
    precision: str = option("fp32", "fp32, bf16 (autocast, CUDA only) or fp64", PRECISIONS)
    # optimisation
    batch_size: int = option(128, "the global batch: images per optimizer step over all ranks and micro-steps")
    steps: int = option(1000)
    lr: float = option(5e-4)
    lr_halve_every: int = option(100_000, "halve the learning rate every this many steps")
    warmup_steps: int = option(0)
    grad_clip: float = option(0.0, "max global gradient norm (0 disables)")
    ema_decay: float = option(0.0, "EMA of the weights (0 disables)")
    optimizer: str = option("auto", "auto (apex FusedAdam if installed, else torch Adam, fused on CUDA), torch or "
                            "apex", OPTIMIZERS)
    # run
    seed: int = option(0)
    out: str = option("runs/default")
    device: str = option("auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    log_every: int = option(25)
    checkpoint_every: int = option(500)
    max_bad_steps: int = option(10, "stop after this many non-finite losses in a row; --resume then continues from "
                                "the healthy checkpoint before them")
    eval_images: int = option(256, "held-out images whose NLL is printed when training ends (0 skips)")
    progress: bool = option(True)
    plots: bool = option(True, "write RUN/plots/ (loss curve, loss per noise level, denoising grid, plots.json) when "
                         "training ends")
    # distributed (dsm_fast/engine.py)
    engine: str = option("single", "single, ddp or deepspeed (launch ddp/deepspeed with torchrun or the deepspeed "
                         "launcher)", ENGINES)
    grad_accum: int = option(1, "micro-batches per optimizer step on each rank")
    zero_stage: int = option(1, "DeepSpeed ZeRO stage 0-3 (3 only with --route fused, see README)", ZERO_STAGES)
    offload: bool = option(False, "DeepSpeed: keep optimizer state in CPU memory")
    deepspeed_config: str = option("", "DeepSpeed JSON used instead of the generated one (batch keys must agree)")
    dist_timeout: float = option(600.0, "seconds a rendezvous or collective may wait before every rank stops")

    def validate(self) -> TrainConfig:
        """This configuration, after refusing in one line a value out of its field's choices or range, or options
        that contradict each other."""
        from .model import PRESETS  # the UNet presets live with the UNet (dsm_fast/model/unet.py)

        for f in fields(self):
            choices, value = f.metadata["choices"], getattr(self, f.name)
            if choices and value not in choices:
                names = [str(c) for c in choices]
                raise ConfigError(f"{f.name} must be {', '.join(names[:-1])} or {names[-1]} {f.metadata['note']}"
                                  .strip())
        checks = [
            (self.model in (*PRESETS, "radial"), f"model must be one of {', '.join((*PRESETS, 'radial'))}"),
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
            (self.diffclf_levels >= 2, "diffclf_levels must be at least 2"),
            (self.objective != "diffclf" or self.route in ("auto", "reference"),
             "objective diffclf needs --route reference"),
            (self.subset == "" or parse_subset(self.subset) is not None, "subset must be 'first:N' or 'last:N', N > 0"),
            (self.max_bad_steps > 0, "max_bad_steps must be positive"),
            (self.log_every > 0 and self.checkpoint_every > 0, "log_every and checkpoint_every must be positive"),
            (self.grad_accum > 0 and self.batch_size % self.grad_accum == 0,
             "grad_accum must be positive and divide batch_size (the global batch)"),
            (self.engine == "deepspeed" or not (self.offload or self.deepspeed_config),
             "offload and deepspeed_config need --engine deepspeed"),
            (self.dist_timeout > 0 and not math.isnan(self.dist_timeout), "dist_timeout must be positive"),
            (self.radial_offset == 0 or self.model == "radial", "radial_offset needs --model radial"),
            (self.kernels != "cuda" or not self.model.startswith("edm2"),
             "kernels cuda has no EDM2 ops (the CUDA extension holds NormAct only); use --kernels torch or triton"),
            (self.checkpoint_activations == "none" or (self.model.startswith("edm2") and self.route in ("auto", "fused")),
             "checkpoint_activations block needs an EDM2 preset (--model edm2-tiny, edm2-xs, edm2-s) and the fused route"),
            (self.energy == "paper" or self.model != "radial", "energy gaussian needs a UNet preset, not radial"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def choices(name: str) -> tuple:
    """The choices of TrainConfig's option ``name`` (for another subcommand's option of the same vocabulary)."""
    return TrainConfig.__dataclass_fields__[name].metadata["choices"]


MAX_IMAGE_SIZE = 1024  # beyond it the paper's UNet does not fit in memory at any batch size

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

# What a resumed run may change: how long it trains, how it logs and checkpoints, when it gives up, the learning
# rate, and where and how it runs (engine, grad_accum and the ZeRO options: the same global batch, split over another
# world size or partitioned another way).
# Everything else comes from the run's config.json (see check_resume).
RESUME_MAY_CHANGE = ("steps", "lr", "log_every", "checkpoint_every", "max_bad_steps", "eval_images", "progress",
                     "plots", "device", "dist_timeout", "out", "engine", "grad_accum", "zero_stage", "deepspeed_config",
                     "offload")
RESOLVED_AT_START = ("route", "kernels", "compile")  # 'auto' is decided once and config.json holds the decision
# What config.json records about the run's latest start beside its options, not options (--resume and --config skip
# them): 'compile_fell_back' ("step N: reason") when torch.compile failed and the step ran eagerly (routes.Compiled;
# a --resume compiles again), 'flush_denormal' when float32 subnormals were flushed on the CPU (dsm_fast/subnormals.py).
RUN_RECORD = ("compile_fell_back", "flush_denormal")


# --- from files and the command line to a TrainConfig -------------------------------------------------------------
def valid_device(name: str) -> bool:
    return re.fullmatch(r"auto|cpu|cuda(:\d+)?", name) is not None


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
                   preset: str | None = None, resume: bool = False) -> TrainConfig:
    """defaults ← preset ← config file ← overrides (None values in overrides are ignored). With ``resume``: the
    run's own config.json (in ``out``) ← the options given, of which only RESUME_MAY_CHANGE may differ."""
    given = given_options(file, overrides, preset)
    if not resume:
        return TrainConfig(**given).validate()
    run_dir = Path(given.get("out", TrainConfig.out))
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"--resume: {run_dir} holds no run to resume (no config.json); drop --resume to start one")
    saved = config_from_run(run_dir)
    check_resume(saved, given)
    return dataclasses.replace(saved, **given).validate()


# --- a run folder's configuration ----------------------------------------------------------------------------------
def config_from_run(run_dir: str | Path, **changes) -> TrainConfig:
    """The TrainConfig a run was made with (RUN/config.json, less RUN_RECORD), optionally changed (e.g. ``device``)."""
    from .checkpoint import CheckpointError, run_config

    values = {key: value for key, value in run_config(run_dir).items() if key not in RUN_RECORD}
    try:
        if "gsm_sigmas" in values:
            values["gsm_sigmas"] = tuple(values["gsm_sigmas"])
        return dataclasses.replace(TrainConfig(**values), **changes).validate()
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{Path(run_dir) / 'config.json'}: not a valid run configuration ({error})") from None


def resume_flags() -> str:
    return ", ".join("--" + key.replace("_", "-") for key in RESUME_MAY_CHANGE if key != "out")


def check_resume(saved: TrainConfig, values: dict[str, Any]) -> None:
    """Refuse, naming it, an option of ``values`` that differs from the run's and may not change on resume
    ('auto' for an option decided at the start agrees with the run's decision)."""
    for key, value in values.items():
        if key in RESOLVED_AT_START and value == "auto":
            continue
        if key not in RESUME_MAY_CHANGE and value != getattr(saved, key):
            raise ConfigError(f"--resume: {key} is {value!r}, the run was made with {getattr(saved, key)!r}; "
                              f"a resumed run may change only {resume_flags()}")


def check_run_folder(cfg: TrainConfig, resume: bool) -> None:
    """``cfg.out`` must be a folder; one that holds a run is continued only with ``resume``, with the run's own
    options bar RESUME_MAY_CHANGE."""
    from .checkpoint import list_checkpoints

    run_dir = Path(cfg.out)  # created (or refused in one line) by checkpoint.make_run_dir under the run's lock
    if list_checkpoints(run_dir) and not resume:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose --out")
    if resume:
        check_resume(config_from_run(run_dir), dataclasses.asdict(cfg))


# --- 'auto' resolved once, at the start of a run (config.json then holds the decision) ----------------------------
def resolve_device(name: str):
    """'auto' → cuda when available, else cpu; an explicit CUDA device without CUDA is refused in one line."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available")
    return device


def compute_dtype(cfg: TrainConfig):
    """The dtype of weights and batches: float64 for precision fp64, else float32 (bf16 is autocast over it)."""
    import torch

    return torch.float64 if cfg.precision == "fp64" else torch.float32


def check_device(cfg: TrainConfig, device) -> None:
    """Refuse, in one line, options that ``device`` (resolved) cannot run: bf16 autocast and a CUDA graph off CUDA,
    and a CUDA graph outside the single engine or with apex's optimizer."""
    if cfg.precision == "bf16" and device.type != "cuda":
        raise ConfigError("precision bf16 (autocast) needs a CUDA device")
    if cfg.cuda_graph:
        for refused, reason in ((device.type != "cuda", "needs a CUDA device"),
                                (cfg.engine != "single", f"runs with --engine single, not {cfg.engine}"),
                                (cfg.optimizer == "apex", "needs torch's capturable fused Adam, not apex")):
            if refused:
                raise ConfigError(f"--cuda-graph {reason}")


def check_model_fits_data(cfg: TrainConfig, sample_shape: tuple[int, ...], downsampling: int) -> None:
    """A UNet needs images whose size its ``downsampling`` divides; the radial model needs vectors (--data gsm)."""
    if len(sample_shape) == 3 and sample_shape[-1] % downsampling:
        raise ConfigError(f"image size {sample_shape[-1]} is not a multiple of {downsampling}, which model "
                          f"{cfg.model} needs; set --image-size")
    if (cfg.model == "radial") != (len(sample_shape) == 1):
        raise ConfigError(f"model {cfg.model} does not fit data {cfg.data}: use --model radial with --data gsm "
                          f"and a UNet preset with images")


def resolve_route(route: str, unet: bool, objective: str) -> str:
    """'auto' → 'fused' for a UNet energy (paper or Gaussian start) with the dual or single objective, else
    'reference'."""
    if route != "auto":
        return route
    return "fused" if unet and objective in ("dual", "single") else "reference"


def resolve_kernels(kernels: str, device) -> str:
    """'auto' → 'triton' on CUDA with Triton installed, else 'torch'; an explicit 'triton' or 'cuda' fails loudly
    (RuntimeError) if it cannot run here (on the meta device Triton's custom ops trace, see dsm_fast/tools/cost.py)."""
    has_triton = importlib.util.find_spec("triton") is not None
    if kernels == "auto":
        return "triton" if device.type == "cuda" and has_triton else "torch"
    if kernels == "triton":
        if not has_triton:
            raise RuntimeError("kernels='triton' but Triton is not installed (pip install triton)")
        if device.type not in ("cuda", "meta") and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"kernels='triton' on {device.type} needs TRITON_INTERPRET=1 (set before Triton is "
                               "imported) to run the kernels interpreted")
        return kernels
    if kernels == "cuda":
        from . import cuda_ext

        if not has_triton or not cuda_ext.is_available():
            raise RuntimeError(cuda_ext.unavailable_reason() or "kernels='cuda' needs Triton for its second order")
        return kernels
    if kernels == "torch":
        return kernels
    raise ValueError(f"unknown kernels {kernels!r}; choose from auto, {', '.join(KERNELS)}")


def resolve_compile(mode: str, route: str, device, engine: str = "single") -> bool:
    """'auto' → compile a first-order route on CUDA (not under DeepSpeed); 'on' insists (a route that cannot be
    compiled is refused in one line); 'off' never."""
    if mode == "auto":
        return device.type == "cuda" and route in FIRST_ORDER and engine != "deepspeed"
    if mode == "on":
        if route not in FIRST_ORDER:
            raise ConfigError(f"--compile: route {route} cannot be compiled (torch.compile refuses its double "
                              f"backward); use --route functional or fused")
        return True
    if mode == "off":
        return False
    raise ConfigError(f"compile must be one of {', '.join(SWITCH)}, not {mode!r}")


def resolve_fast_path(cfg: TrainConfig, device) -> TrainConfig:
    """``cfg`` with route, kernels and compilation resolved to what will run on ``device`` ('auto' decided once,
    written to the run's config.json); kernels that cannot run here are refused in one line."""
    route = resolve_route(cfg.route, cfg.model != "radial", cfg.objective)
    try:
        kernels = resolve_kernels(cfg.kernels, device) if route == "fused" else "torch"
    except RuntimeError as error:
        raise ConfigError(f"--kernels {cfg.kernels}: {error}") from None
    compile_on = resolve_compile(cfg.compile, route, device, cfg.engine)
    return dataclasses.replace(cfg, route=route, kernels=kernels, compile="on" if compile_on else "off")
