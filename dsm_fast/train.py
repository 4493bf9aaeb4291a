"""The training loop: one explicit loop over steps (EDM-style), a status line per tick mirrored into
TensorBoard and ``stats.jsonl``, atomic checkpoints, bit-exact resume, and non-finite steps skipped."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .data import make_training_data
from .losses import sample_noise_levels
from .model import build_model
from .optim import EMA, learning_rate, make_optimizer
from .routes import make_route


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. too many non-finite losses); the message says why and where."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available")
    return device


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.float64 if cfg.precision == "fp64" else torch.float32


class Trainer:
    """Trains ``cfg.model`` on ``cfg.data`` with ``cfg.objective`` through ``cfg.route``."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        if list_checkpoints(self.run_dir) and not resume:
            raise ConfigError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose --out")
        self.device = resolve_device(cfg.device)
        if cfg.precision == "bf16" and self.device.type != "cuda":
            raise ConfigError("precision bf16 (autocast) needs a CUDA device")
        self.dtype = compute_dtype(cfg)
        torch.manual_seed(cfg.seed)
        self.data = make_training_data(cfg)
        sample_shape = self.data.sample_shape
        self.model = build_model(cfg.model, channels=sample_shape[0], dim=sample_shape[-1])
        down = getattr(getattr(self.model, "unet", None), "downsampling", 1)
        if len(sample_shape) == 3 and sample_shape[-1] % down:
            raise ConfigError(f"image size {sample_shape[-1]} is not a multiple of {down}, which model {cfg.model} "
                              f"needs; set --image-size")
        if (cfg.model == "radial") != (len(sample_shape) == 1):
            raise ConfigError(f"model {cfg.model} does not fit data {cfg.data}: use --model radial with --data gsm "
                              f"and a UNet preset with images")
        self.model.to(device=self.device, dtype=self.dtype)
        self.route = make_route(cfg.route, self.model, cfg.objective, cfg.time_weight)
        self.optimizer, self.optimizer_name = make_optimizer(self.model.parameters(), cfg.lr, cfg.optimizer,
                                                             self.device)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.noise_generator = torch.Generator(self.device).manual_seed(cfg.seed + 1)
        self.step, self.bad_in_row, self.bad_total = 0, 0, 0
        self._pre_step, self._in_step = self._stream_state(), False
        if resume and list_checkpoints(self.run_dir):
            self._restore()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(cfg.to_json())

    # --- state -----------------------------------------------------------------------------------
    def _stream_state(self) -> dict:
        """Where the data and noise streams stand (taken before each step, so a crash resumes exactly)."""
        return {"data": self.data.state_dict(), "noise_generator": self.noise_generator.get_state()}

    def save(self, streams: dict | None = None) -> Path:
        """Checkpoint the current step; ``streams`` overrides the data/noise position (see ``run``)."""
        state = {**(streams or self._stream_state()), "optimizer": self.optimizer.state_dict(), "bad_total": self.bad_total,
                 "torch_rng": torch.get_rng_state()}
        ema = self.ema.state_dict() if self.ema else None
        return save_checkpoint(self.run_dir, self.step, self.model.state_dict(), state, ema)

    def _restore(self) -> None:
        weights, state, ema = load_checkpoint(self.run_dir, map_location=self.device)
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and ema is not None:
            self.ema.load_state_dict(ema)
        self.data.load_state_dict(state["data"])
        self.noise_generator.set_state(state["noise_generator"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        self.step, self.bad_total = int(state["step"]), int(state["bad_total"])

    # --- one step --------------------------------------------------------------------------------
    def autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, torch.Tensor] | None:
        """One optimizer step; returns the batch-mean terms, or None when the step was skipped (non-finite)."""
        cfg = self.cfg
        self._pre_step, self._in_step = self._stream_state(), True
        x = self.data.next_batch(cfg.batch_size, self.device, self.dtype)
        t = sample_noise_levels(cfg.batch_size, cfg.t_min, cfg.t_max, self.noise_generator, self.device, self.dtype)
        eps = torch.randn(x.shape, generator=self.noise_generator, device=self.device, dtype=self.dtype)
        with self.autocast():
            terms = self.route(x, t, eps)
        loss = terms["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            finite = bool(torch.isfinite(grad_norm))
        if not finite:
            self.bad_in_row += 1
            self.bad_total += 1
            self.step += 1
            self._in_step = False
            return None
        self.bad_in_row = 0
        lr = learning_rate(self.step, cfg.lr, cfg.lr_halve_every, cfg.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self._in_step = False
        out = {k: v.detach().mean() for k, v in terms.items()}
        return {**out, "grad_norm": grad_norm.detach(), "lr": torch.tensor(lr)}

    # --- the loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to ``cfg.steps``; checkpoint every ``checkpoint_every`` steps, at the end, on Ctrl-C, on error."""
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._in_step = False
        writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step)
        stats_file = (self.run_dir / "stats.jsonl").open("a")
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, unit="step", dynamic_ncols=True)
        last = {"time": time.perf_counter(), "step": self.step}
        record: dict = {}
        try:
            while self.step < cfg.steps:
                terms = self.train_step()
                bar.update(1)
                if self.bad_in_row >= cfg.max_bad_steps:
                    path = self.save()
                    raise TrainingStopped(f"{self.bad_in_row} non-finite losses in a row at step {self.step} "
                                          f"(lower --lr or set --grad-clip); checkpoint saved at {path}")
                if terms is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    record = self._log(terms, last, writer, stats_file)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
                if self.step % cfg.checkpoint_every == 0:
                    self.save()
        except (KeyboardInterrupt, Exception):
            if not isinstance(sys.exc_info()[1], TrainingStopped):  # an interrupted step is drawn again
                self.save(streams=self._pre_step if self._in_step else None)
            raise
        finally:
            bar.close()
            writer.close()
            stats_file.close()
        self.save()
        return {"step": self.step, "skipped_steps": self.bad_total, "optimizer": self.optimizer_name, **record}

    def _log(self, terms: dict[str, torch.Tensor], last: dict, writer, stats_file) -> dict:
        now = time.perf_counter()
        steps = self.step - last["step"]
        record = {k: float(v) for k, v in terms.items()}
        record.update(step=self.step, img_per_s=steps * self.cfg.batch_size / max(now - last["time"], 1e-9),
                      skipped_steps=self.bad_total)
        last.update(time=now, step=self.step)
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(f"train/{key}", value, self.step)
        stats_file.write(json.dumps(record) + "\n")
        stats_file.flush()
        return record


def config_from_run(run_dir: str | Path, **changes) -> TrainConfig:
    """The TrainConfig a run was made with, optionally changed (e.g. ``device``)."""
    from .checkpoint import run_config

    values = run_config(run_dir)
    values["gsm_sigmas"] = tuple(values["gsm_sigmas"])
    return dataclasses.replace(TrainConfig(**values), **changes)
