"""The training loop: one explicit loop over steps (EDM-style), a status line per tick mirrored into
TensorBoard and ``stats.jsonl``, atomic checkpoints, bit-exact resume, and non-finite steps skipped.

Every step goes through an engine (dsm_fast/engine.py: single, DDP or DeepSpeed). ``batch_size`` is the
global batch; its noise levels and noise are drawn from one generator on every rank and each rank takes
the samples at its positions, while ImageBatches shards the images the same way — so within an epoch,
any world size × grad_accum trains on exactly the samples one process would (tests/test_engines*.py).
Logging, TensorBoard and the trainer's checkpoint files are written by rank 0 only."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch

from . import distributed
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .data import make_training_data
from .data.images import pixel_statistics
from .diffclf import with_free_energies
from .distributed import DistributedError
from .engine import make_engine, micro_batch
from .losses import sample_noise_levels
from .model import build_model
from .optim import EMA, learning_rate, make_optimizer
from .progress import Progress
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

    def __init__(self, cfg: TrainConfig, resume: bool = False, local_rank: int | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        if list_checkpoints(self.run_dir) and not resume:
            raise ConfigError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose --out")
        self.device = resolve_device(cfg.device)
        if cfg.precision == "bf16" and self.device.type != "cuda":
            raise ConfigError("precision bf16 (autocast) needs a CUDA device")
        self.world = distributed.start(cfg.engine, cfg.dist_timeout, self.device.type, local_rank)
        if self.device.type == "cuda" and self.world.size > 1:
            self.device = torch.device("cuda", self.world.local_rank)
        self.micro_batch = micro_batch(cfg, self.world)
        self.dtype = compute_dtype(cfg)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.data = make_training_data(cfg, self.world.rank, self.world.size)
        sample_shape = self.data.sample_shape
        self.model = build_model(cfg.model, channels=sample_shape[0], dim=sample_shape[-1],
                                 radial_offset=cfg.radial_offset, energy=cfg.energy)
        down = getattr(getattr(self.model, "unet", None), "downsampling", 1)
        if len(sample_shape) == 3 and sample_shape[-1] % down:
            raise ConfigError(f"image size {sample_shape[-1]} is not a multiple of {down}, which model {cfg.model} "
                              f"needs; set --image-size")
        if (cfg.model == "radial") != (len(sample_shape) == 1):
            raise ConfigError(f"model {cfg.model} does not fit data {cfg.data}: use --model radial with --data gsm "
                              f"and a UNet preset with images")
        if cfg.energy == "gaussian":  # μ and s² of the training pixels (a resumed run reloads the same buffers)
            self.model.set_data_statistics(*pixel_statistics(self.data.images))
        self.model = with_free_energies(self.model, cfg)  # DiffCLF: the model also owns the free energies F_j
        self.model.to(device=self.device, dtype=self.dtype)
        optimizer, self.optimizer_name = make_optimizer(self.model.parameters(), cfg.lr, cfg.optimizer, self.device)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.route = make_route(cfg.route, self.model, cfg.objective, cfg.time_weight)
        self.engine = make_engine(cfg, self.model, optimizer, self.world, self.device, self.route)
        distributed.seed_rank(cfg.seed, self.world)
        self.noise_generator = torch.Generator(self.device).manual_seed(cfg.seed + 1)  # the same on every rank
        self.step, self.bad_in_row, self.bad_total = 0, 0, 0
        self._pre_step, self._in_step = self._stream_state(), False
        if resume and list_checkpoints(self.run_dir):
            self._restore()
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(cfg.to_json())

    # --- state -----------------------------------------------------------------------------------
    def _stream_state(self) -> dict:
        """Where the data and noise streams stand (taken before each step, so a crash resumes exactly)."""
        return {"data": self.data.state_dict(), "noise_generator": self.noise_generator.get_state()}

    def save(self, streams: dict | None = None) -> Path:
        """Checkpoint the current step; ``streams`` overrides the data/noise position (see ``run``).
        With several ranks every rank calls it: the per-rank positions are gathered and rank 0 writes."""
        local = {**(streams or self._stream_state()), "torch_rng": torch.get_rng_state()}
        state = local if self.world.size == 1 else {"ranks": distributed.gather_objects(local)}
        state.update(self.engine.checkpoint_state(), bad_total=self.bad_total, world_size=self.world.size,
                     engine_format=self.engine.name == "deepspeed")
        weights = self.engine.full_state_dict()
        kept = [p.name for p in list_checkpoints(self.run_dir)[-2:]]
        self.engine.save_native(self.run_dir, self.step, kept)
        ema = self.ema.state_dict() if self.ema else None
        path = save_checkpoint(self.run_dir, self.step, weights, state, ema) if self.world.is_main else None
        distributed.barrier()
        return path or list_checkpoints(self.run_dir)[-1]

    def _restore(self) -> None:
        weights, state, ema = load_checkpoint(self.run_dir, map_location=self.device)
        saved_world, deepspeed_format = int(state.get("world_size", 1)), bool(state.get("engine_format", False))
        if saved_world != self.world.size or deepspeed_format != (self.engine.name == "deepspeed"):
            raise ConfigError(f"{self.run_dir} was written by {saved_world} process(es)"
                              f"{' with DeepSpeed' if deepspeed_format else ''}; resume it the same way")
        self.engine.load(self.run_dir, int(state["step"]), weights, state)
        if self.ema is not None and ema is not None:
            self.ema.load_state_dict(ema)
        local = state if self.world.size == 1 else state["ranks"][self.world.rank]
        self.data.load_state_dict(local["data"])
        self.noise_generator.set_state(local["noise_generator"].cpu())
        torch.set_rng_state(local["torch_rng"].cpu())
        self.step, self.bad_total = int(state["step"]), int(state["bad_total"])

    # --- one step --------------------------------------------------------------------------------
    def autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, torch.Tensor] | None:
        """One optimizer step over the global batch; returns this rank's batch-mean terms, or None when the
        step was skipped (a non-finite loss on any rank, or non-finite gradients)."""
        cfg, world, micro, accum = self.cfg, self.world, self.micro_batch, self.cfg.grad_accum
        self._pre_step, self._in_step = self._stream_state(), True
        # The global batch's noise, the same on every rank; global position p = world·(k·micro + j) + rank
        # is this rank's sample j of micro-step k, as in ImageBatches' [rank::world] shards.
        t_all = sample_noise_levels(cfg.batch_size, cfg.t_min, cfg.t_max, self.noise_generator, self.device,
                                    self.dtype)[world.rank::world.size]
        eps_all = torch.randn((cfg.batch_size, *self.data.sample_shape), generator=self.noise_generator,
                              device=self.device, dtype=self.dtype)[world.rank::world.size]
        self.engine.zero_grad()
        out: dict[str, torch.Tensor] = {}
        finite = True
        for k in range(accum):
            last, mine = k == accum - 1, slice(k * micro, (k + 1) * micro)
            x = self.data.next_batch(micro, self.device, self.dtype)
            with self.engine.micro_step(last):
                with self.autocast():
                    terms = self.engine.terms(x, t_all[mine], eps_all[mine])
                loss = terms["loss"].mean()
                finite = distributed.all_true(bool(torch.isfinite(loss)), self.device)
                if not finite:
                    break
                self.engine.backward(loss, last)
            for key, value in terms.items():
                out[key] = out.get(key, 0) + value.detach().mean() / accum
        if not finite and not self.engine.skips_non_finite:
            self.save(streams=self._pre_step)
            raise TrainingStopped(f"non-finite loss at step {self.step}; engine {self.engine.name} cannot discard a "
                                  f"partly accumulated step (lower --lr or set --grad-clip, then --resume)")
        lr = learning_rate(self.step, cfg.lr, cfg.lr_halve_every, cfg.warmup_steps)
        grad_norm = self.engine.step(lr, cfg.grad_clip) if finite else None
        if grad_norm is None:
            self.bad_in_row += 1
            self.bad_total += 1
            self.step += 1
            self._in_step = False
            return None
        self.bad_in_row = 0
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self._in_step = False
        return {**out, "grad_norm": grad_norm.detach(), "lr": torch.tensor(lr)}

    # --- the loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to ``cfg.steps``; checkpoint every ``checkpoint_every`` steps, at the end, on Ctrl-C, on error.
        With several ranks a failure is not checkpointed (the peers may be gone; the last periodic checkpoint
        stands) and ends as a DistributedError naming the rank, so every rank stops with one clear line."""
        from torch.utils.tensorboard import SummaryWriter

        cfg, main = self.cfg, self.world.is_main
        self._in_step = False
        writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step) if main else None
        stats_file = (self.run_dir / "stats.jsonl").open("a") if main else None
        progress = Progress(cfg.steps, self.step, cfg.batch_size, enabled=cfg.progress and main,
                            window=cfg.log_every)
        last = {"time": time.perf_counter(), "step": self.step}
        record: dict = {}
        try:
            while self.step < cfg.steps:
                terms = self.train_step()
                progress.step(terms)
                if self.bad_in_row >= cfg.max_bad_steps:
                    path = self.save()
                    raise TrainingStopped(f"{self.bad_in_row} non-finite losses in a row at step {self.step} "
                                          f"(lower --lr or set --grad-clip); checkpoint saved at {path}")
                if terms is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    record = self._log(distributed.average(terms), last, writer, stats_file)
                    progress.mark_logged()
                if self.step % cfg.checkpoint_every == 0:
                    self.save()
        except (KeyboardInterrupt, Exception) as error:
            if isinstance(error, (TrainingStopped, ConfigError)):
                raise
            if self.world.size > 1:
                raise DistributedError(f"rank {self.world.rank}/{self.world.size} stopped at step {self.step}: "
                                       f"{type(error).__name__}: {distributed.first_line(error)}") from error
            self.save(streams=self._pre_step if self._in_step else None)  # an interrupted step is drawn again
            raise
        finally:
            progress.close()
            if main:
                writer.close()
                stats_file.close()
        self.save()
        if self.engine.partitions_weights:  # ZeRO-3 left each rank a shard: keep a full copy for evaluation
            weights = self.engine.full_state_dict()
            shape = self.data.sample_shape
            self.model = with_free_energies(build_model(cfg.model, channels=shape[0], dim=shape[-1],
                                                        energy=cfg.energy), cfg)
            self.model.to(device=self.device, dtype=self.dtype).load_state_dict(weights)
        return {"step": self.step, "skipped_steps": self.bad_total, "optimizer": self.optimizer_name, **record,
                "smoothed_loss": progress.smoothed(), "first_smoothed_loss": progress.first}

    def _log(self, terms: dict[str, torch.Tensor], last: dict, writer, stats_file) -> dict:
        now = time.perf_counter()
        steps = self.step - last["step"]
        record = {k: float(v) for k, v in terms.items()}
        record.update(step=self.step, img_per_s=steps * self.cfg.batch_size / max(now - last["time"], 1e-9),
                      skipped_steps=self.bad_total)
        last.update(time=now, step=self.step)
        if writer is None:
            return record
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
