"""The training loop: one explicit loop over steps (EDM-style), a status line per tick mirrored into
TensorBoard and ``stats.jsonl``, atomic checkpoints, bit-exact resume, and non-finite steps skipped.

Never losing work: a fresh run checkpoints step 0; SIGTERM and Ctrl-C stop every rank after the same step with one
checkpoint (dsm_fast/stopsignal.py); one ``train`` per run folder (dsm_fast/runlock.py); a
resume continues from the newest checkpoint that passes its checks (dsm_fast/checkpoint.py), setting newer ones
aside and dropping the stats rows past it. Divergence: only non-finite losses are seen, not the update that
caused them, so a stop after ``max_bad_steps`` bad steps in a row that began at step b distrusts state b too
(the last finite update produced it): checkpoints from step b on are set aside, none is written, and
``--resume`` continues from the newest healthy checkpoint before b, which the rotation never deletes.

Every step goes through an engine (dsm_fast/engine.py: single, DDP or DeepSpeed). ``batch_size`` is the
global batch; its noise levels and noise are drawn from one generator on every rank and each rank takes
the samples at its positions, while ImageBatches shards the images the same way — so within an epoch,
any world size × grad_accum trains on exactly the samples one process would (tests/test_engine*.py).
Logging, TensorBoard and the trainer's checkpoint files are written by rank 0 only."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch

from . import distributed, runlock
from .checkpoint import (
    CheckpointError,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    non_finite,
    read_manifest,
    reject,
    restore_streams,
    save_checkpoint,
    set_aside_incomplete,
    write_run_config,
)
from .config import RUN_RECORD, ConfigError, TrainConfig, check_resume
from .data import make_training_data
from .data.images import pixel_statistics
from .diffclf import with_free_energies
from .distributed import DistributedError
from .engine import make_engine, micro_batch
from .graphs import GraphedStep
from .losses import sample_noise_levels
from .model import build_model
from .optim import EMA, learning_rate, make_optimizer
from .progress import Progress
from .routes import make_route, resolve_compile, resolve_kernels, resolve_route
from .stopsignal import StopSignals
from .subnormals import flushed_subnormals


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. too many non-finite losses); the message says why and where."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM: the run wrote a checkpoint and stopped; the exit code is 128 + the signal."""

    def __init__(self, signal_number: int, message: str = ""):
        super().__init__(message)
        self.signal_number = signal_number


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available")
    return device


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.float64 if cfg.precision == "fp64" else torch.float32


def resolve_fast_path(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> TrainConfig:
    """``cfg`` with route, kernels and compilation resolved to what will run ('auto' decided once, written to the
    run's config.json); a CUDA graph that cannot apply is refused in one line."""
    route = resolve_route(cfg.route, model, cfg.objective)
    try:
        kernels = resolve_kernels(cfg.kernels, device) if route == "fused" else "torch"
    except RuntimeError as error:
        raise ConfigError(f"--kernels {cfg.kernels}: {error}") from None
    compile_on = resolve_compile(cfg.compile, route, device, cfg.engine)
    if cfg.cuda_graph:
        for refused, reason in ((device.type != "cuda", "needs a CUDA device"),
                                (cfg.engine != "single", f"runs with --engine single, not {cfg.engine}"),
                                (cfg.optimizer == "apex", "needs torch's capturable fused Adam, not apex")):
            if refused:
                raise ConfigError(f"--cuda-graph {reason}")
    return dataclasses.replace(cfg, route=route, kernels=kernels, compile="on" if compile_on else "off")


class Trainer:
    """Trains ``cfg.model`` on ``cfg.data`` with ``cfg.objective`` through ``cfg.route``."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, local_rank: int | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        if cfg.precision == "bf16" and self.device.type != "cuda":
            raise ConfigError("precision bf16 (autocast) needs a CUDA device")
        self.world = distributed.start(cfg.engine, cfg.dist_timeout, self.device.type, local_rank)
        runlock.hold_for_world(self.run_dir, self.world)  # creates the folder; one train per folder (runlock.py)
        if list_checkpoints(self.run_dir) and not resume:
            raise ConfigError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose --out")
        if resume:  # the run's own options, bar those a resume may change (config.RESUME_MAY_CHANGE)
            check_resume(config_from_run(self.run_dir), dataclasses.asdict(cfg))
        if self.world.is_main:
            for moved in set_aside_incomplete(self.run_dir):
                print(f"warning: {moved.name} had no manifest (an interrupted save); moved to {moved.parent}",
                      file=sys.stderr, flush=True)
        distributed.barrier()
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
        self.cfg = cfg = resolve_fast_path(cfg, self.model, self.device)
        optimizer, self.optimizer_name = make_optimizer(self.model.parameters(), cfg.lr, cfg.optimizer, self.device,
                                                        capturable=cfg.cuda_graph)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.route = make_route(cfg.route, self.model, cfg.objective, cfg.time_weight, cfg.kernels,
                                compile=cfg.compile == "on")
        self.engine = make_engine(cfg, self.model, optimizer, self.world, self.device, self.route)
        if cfg.cuda_graph:
            self._update = GraphedStep(self._update)
        distributed.seed_rank(cfg.seed, self.world)
        self.noise_generator = torch.Generator(self.device).manual_seed(cfg.seed + 1)  # the same on every rank
        self.step = 0
        self.bad_counts = torch.zeros(3, dtype=torch.long, device=self.device)  # see _update
        self._pre_step, self._in_step = self._stream_state(), False
        self.resumed = resume
        if resume:
            self._restore()
        self.trusted_until = self.step - self.bad_in_row  # see diverged
        self.run_record: dict = {}  # what config.json records about this start beside the options (config.RUN_RECORD)
        self._write_config()

    def _write_config(self, **record) -> None:
        """RUN/config.json: the resolved options and, beside them, ``run_record`` updated with ``record``."""
        self.run_record.update(record)
        if self.world.is_main:
            write_run_config(self.run_dir, {**dataclasses.asdict(self.cfg), **self.run_record})

    def _record_compile_fallback(self) -> None:
        """Once torch.compile has fallen back to eager (``Compiled.fallback``), config.json says so: the run's
        compile stays "on" (a --resume compiles again) and compile_fell_back names the step and the reason."""
        reason = getattr(self.route, "fallback", None)
        if reason is not None and "compile_fell_back" not in self.run_record:
            self._write_config(compile_fell_back=f"step {self.step - 1}: {reason}")

    # --- state -----------------------------------------------------------------------------------
    def _stream_state(self) -> dict:
        """Where the data and noise streams stand (taken before each step, so a crash resumes exactly)."""
        return {"data": self.data.state_dict(), "noise_generator": self.noise_generator.get_state()}

    def save(self, streams: dict | None = None) -> Path:
        """Checkpoint the current step; ``streams`` overrides the data/noise position (see ``run``).
        With several ranks every rank calls it: the per-rank positions are gathered and rank 0 writes."""
        local = {**(streams or self._stream_state()), "torch_rng": torch.get_rng_state()}
        ranks = distributed.gather_objects(local)
        state = dict(local) if self.world.size == 1 else {"ranks": ranks}
        if hasattr(self.data, "shared_position"):  # what another world size continues from (restore_streams)
            state["data_position"] = self.data.shared_position([rank["data"] for rank in ranks])
        state.update(self.engine.checkpoint_state(), bad_total=self.bad_total, bad_in_row=self.bad_in_row,
                     world_size=self.world.size, engine_format=self.engine.name == "deepspeed")
        weights = self.engine.full_state_dict()
        ema = self.ema.state_dict() if self.ema else None
        bad = non_finite({"model": weights, "ema": ema or {}, "state": state}) + self.engine.non_finite_state()
        if not distributed.all_true(not bad, self.device):
            self.diverged(f"non-finite weights or optimizer state at step {self.step} ({', '.join(bad[:3])})")
        native = self.engine.save_native(self.run_dir, self.step)
        if self.world.is_main:
            first_bad = self.step - self.bad_in_row if self.bad_in_row else self.step + 1
            save_checkpoint(self.run_dir, self.step, weights, state, ema, healthy=self.bad_in_row == 0,
                            trusted_before=first_bad, native=native)
            self.engine.prune_native(self.run_dir, [p.name for p in list_checkpoints(self.run_dir)])
        distributed.barrier()
        return list_checkpoints(self.run_dir)[-1]

    def diverged(self, reason: str) -> NoReturn:
        """Stop a diverged run: state b = step − bad_in_row came from the last finite update before the bad steps
        (or, with no bad step, the update that made the state non-finite), so the checkpoints from step b on are
        set aside (RUN/rejected) and the message names the newest healthy one, which ``--resume`` continues.
        The counters are read every log_every steps, so a streak may have ended before the read: b is then
        bounded by ``trusted_until``, the step − bad_in_row of the previous read."""
        first = min(self.step - self.bad_in_row, self.trusted_until)  # the streak may have ended before the read
        if self.world.is_main:
            for folder in list_checkpoints(self.run_dir):
                if checkpoint_step(folder) >= first:
                    reject(folder, self.run_dir)
        distributed.barrier()
        healthy = list_checkpoints(self.run_dir)
        cause = (f"the update to step {first} diverged" if first else "the initial weights give non-finite losses")
        where = (f"checkpoints from step {first} on are set aside in {self.run_dir / 'rejected'}; "
                 f"--resume continues from the newest healthy one, step {checkpoint_step(healthy[-1])} "
                 f"({healthy[-1]})" if healthy else "no healthy checkpoint remains: start a new run")
        raise TrainingStopped(f"{reason}: {cause} (lower --lr or set --grad-clip); {where}")

    def _restore(self) -> None:
        """Continue from the newest healthy checkpoint that passes its checks. The ones skipped are named in a
        warning and set aside (RUN/rejected), and stats.jsonl loses the rows past the step resumed from."""
        found = list_checkpoints(self.run_dir)
        if not found:
            raise ConfigError(f"--resume: {self.run_dir} holds no checkpoint to resume")
        for folder in reversed(found):
            try:
                if not read_manifest(folder).get("healthy"):
                    raise CheckpointError(f"{folder}: written during a run of non-finite steps")
                weights, state, ema = load_checkpoint(folder, map_location=self.device)
                break
            except CheckpointError as error:
                if self.world.is_main:
                    print(f"warning: {error}; resuming from an earlier checkpoint", file=sys.stderr, flush=True)
        else:
            raise CheckpointError(f"{self.run_dir}: no checkpoint passes its checks; start a new run")
        if "imported_from" in state:  # dsm-fast import-release: weights only, no optimizer or stream state
            raise ConfigError(f"{self.run_dir} holds weights imported from {state['imported_from']}, without the "
                              f"optimizer state a resume needs; evaluate or analyse it, or train a new run")
        distributed.barrier()  # every rank has read its checkpoint before rank 0 moves the newer ones aside
        if self.world.is_main:
            for newer in found[found.index(folder) + 1:]:
                reject(newer, self.run_dir)
            drop_stats_after(self.run_dir / "stats.jsonl", int(state["step"]))
        restore_streams(self.run_dir, state, self.world, self.engine.name == "deepspeed", self.data,
                        self.noise_generator)  # any world size for single/DDP (checkpoint.restore_streams)
        self.engine.load(self.run_dir, int(state["step"]), weights, state)
        if self.ema is not None and ema is not None:
            self.ema.load_state_dict(ema)
        self.step, self.bad_total = int(state["step"]), int(state["bad_total"])
        self.bad_in_row = int(state.get("bad_in_row", 0))

    # --- one step --------------------------------------------------------------------------------
    def autocast(self):
        if self.cfg.precision == "bf16":  # a CUDA graph replays no autocast cache
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.cfg.cuda_graph)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over the global batch; returns this rank's batch-mean terms, the gradient norm and
        ``ok`` (false: a non-finite loss or gradient on some rank, the update skipped), all on the device: the
        step never waits for the device, except under DeepSpeed (which cannot discard a partly accumulated step)."""
        cfg, world, micro = self.cfg, self.world, self.micro_batch
        self._pre_step, self._in_step = self._stream_state(), True
        # The global batch's noise, the same on every rank; global position p = world·(k·micro + j) + rank
        # is this rank's sample j of micro-step k, as in ImageBatches' [rank::world] shards.
        t = sample_noise_levels(cfg.batch_size, cfg.t_min, cfg.t_max, self.noise_generator, self.device,
                                self.dtype)[world.rank::world.size]
        eps = torch.randn((cfg.batch_size, *self.data.sample_shape), generator=self.noise_generator,
                          device=self.device, dtype=self.dtype)[world.rank::world.size]
        x = torch.cat([self.data.next_batch(micro, self.device, self.dtype) for _ in range(cfg.grad_accum)])
        lr = learning_rate(self.step, cfg.lr, cfg.lr_halve_every, cfg.warmup_steps)
        self.engine.set_lr(lr)
        out = self._update(x, t, eps)
        self.step += 1
        self._in_step = False
        return {**out, "lr": torch.tensor(lr)}

    def _update(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Micro-steps, backward, the (possibly skipped) update, the EMA and the bad-step counters, all on the
        device; under --cuda-graph this function is what is captured and replayed (dsm_fast/graphs.py)."""
        cfg, micro, accum = self.cfg, self.micro_batch, self.cfg.grad_accum
        self.engine.zero_grad()
        out: dict[str, torch.Tensor] = {}
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for k in range(accum):
            last, mine = k == accum - 1, slice(k * micro, (k + 1) * micro)
            with self.engine.micro_step(last):
                with self.autocast():
                    terms = self.engine.terms(x[mine], t[mine], eps[mine])
                loss = terms["loss"].mean()
                finite = finite & torch.isfinite(loss)
                if not self.engine.skips_non_finite and not distributed.all_true(bool(finite), self.device):
                    self.diverged(f"non-finite loss at step {self.step}, which engine {self.engine.name} cannot skip")
                if loss.requires_grad:  # (a loss independent of θ, e.g. a constant NaN, has no backward)
                    self.engine.backward(loss, last)
            for key, value in terms.items():
                out[key] = out.get(key, 0) + value.detach().mean() / accum
        grad_norm, ok = self.engine.step(cfg.grad_clip, finite)
        if self.ema is not None:
            self.ema.update(self.model, ok)
        bad = (~ok).long()  # counters (in a row, total, longest run since last read), updated in place
        in_row = (self.bad_counts[0] + 1) * bad
        self.bad_counts.copy_(torch.stack([in_row, self.bad_counts[1] + bad, torch.maximum(self.bad_counts[2], in_row)]))
        return {**out, "grad_norm": grad_norm.detach(), "ok": ok}

    @property
    def bad_total(self) -> int:
        """Non-finite steps skipped so far (a read of the device counter: a synchronization)."""
        return int(self.bad_counts[1])

    @bad_total.setter
    def bad_total(self, value: int) -> None:
        self.bad_counts[1] = value

    @property
    def bad_in_row(self) -> int:
        """Non-finite steps in a row up to now (a read of the device counter: a synchronization)."""
        return int(self.bad_counts[0])

    @bad_in_row.setter
    def bad_in_row(self, value: int) -> None:
        self.bad_counts[0] = value
        self.bad_counts[2] = value

    def longest_bad_run(self) -> int:
        """The longest run of consecutive non-finite steps since the last call (read at log time), then reset."""
        longest = int(self.bad_counts[2])
        self.bad_counts[2] = self.bad_counts[0]
        return longest

    # --- the loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to ``cfg.steps``; checkpoint every ``checkpoint_every`` steps, at the end, on Ctrl-C, on error.
        With several ranks a failure other than a stop signal is not checkpointed (the peers may be gone; the last
        periodic checkpoint stands) and ends as a DistributedError naming the rank, so every rank stops with one clear line.
        Meanwhile, on the CPU in float32, subnormals flush to zero (dsm_fast/subnormals.py; config.json's
        flush_denormal), as before afterwards."""
        try:
            with flushed_subnormals(self.device, self.dtype) as flushed:
                if flushed:
                    self._write_config(flush_denormal=True)
                return self._run()
        finally:
            runlock.release(self.run_dir)

    def _run(self) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        cfg, main = self.cfg, self.world.is_main
        self._in_step = False
        if self.step == 0 and not self.resumed:
            self.save()  # step 0: what a divergence in the first steps rolls back to
        start, bad_at_start = self.step, self.bad_total
        stop = StopSignals().install()  # SIGTERM/SIGINT: every rank stops after the same step (stopsignal.py)
        writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step) if main else None
        stats_file = (self.run_dir / "stats.jsonl").open("a") if main else None
        progress = Progress(cfg.steps, self.step, cfg.batch_size, enabled=cfg.progress and main,
                            window=cfg.log_every)
        last = {"time": time.perf_counter(), "step": self.step}
        record: dict = {}
        try:
            while self.step < cfg.steps:
                if number := stop.agreed():  # every rank, the same step: all write one checkpoint below
                    raise Interrupted(number)
                terms = self.train_step()
                self._record_compile_fallback()
                progress.step(terms)
                log_now = self.step % cfg.log_every == 0 or self.step == cfg.steps
                checkpoint_now = self.step % cfg.checkpoint_every == 0
                if not (log_now or checkpoint_now):
                    continue  # values are read on the host only to log or checkpoint
                longest = self.longest_bad_run()
                if longest >= cfg.max_bad_steps:
                    self.diverged(f"{longest} non-finite losses in a row at step {self.step}")
                self.trusted_until = self.step - self.bad_in_row  # a later streak began at or after it
                if log_now and bool(terms.pop("ok")):
                    record = self._log(distributed.average(terms), last, writer, stats_file)
                    progress.mark_logged()
                if checkpoint_now:
                    self.save()
        except (KeyboardInterrupt, Exception) as error:
            if isinstance(error, (TrainingStopped, ConfigError, CheckpointError)):
                raise
            if self.world.size > 1 and not isinstance(error, Interrupted):
                raise DistributedError(f"rank {self.world.rank}/{self.world.size} stopped at step {self.step}: "
                                       f"{type(error).__name__}: {distributed.first_line(error)}") from error
            path = self.save(streams=self._pre_step if self._in_step else None)  # an interrupted step is redrawn
            if isinstance(error, KeyboardInterrupt):
                number = getattr(error, "signal_number", signal.SIGINT)
                raise Interrupted(number, f"{signal.Signals(number).name} at step {self.step}: checkpoint saved at "
                                          f"{path}; continue with --resume") from None
            raise
        finally:
            stop.restore()
            progress.close()
            if main:
                writer.close()
                stats_file.close()
        if self.step > start and self.bad_total - bad_at_start == self.step - start:
            self.diverged(f"all {self.step - start} steps of this run were skipped (non-finite losses)")
        self.save()
        if self.engine.partitions_weights:  # ZeRO-3 left each rank a shard: keep a full copy for evaluation
            weights = self.engine.full_state_dict()
            shape = self.data.sample_shape
            self.model = with_free_energies(build_model(cfg.model, channels=shape[0], dim=shape[-1],
                                                        energy=cfg.energy), cfg)
            self.model.to(device=self.device, dtype=self.dtype).load_state_dict(weights)
        return {"step": self.step, "skipped_steps": self.bad_total, "optimizer": self.optimizer_name, **record,
                "smoothed_loss": progress.smoothed(), "first_smoothed_loss": progress.first,
                **self.run_record}

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


def config_from_run(run_dir: str | Path, **changes) -> TrainConfig:
    """The TrainConfig a run was made with, optionally changed (e.g. ``device``)."""
    from .checkpoint import run_config

    values = {key: value for key, value in run_config(run_dir).items() if key not in RUN_RECORD}
    try:
        if "gsm_sigmas" in values:
            values["gsm_sigmas"] = tuple(values["gsm_sigmas"])
        return dataclasses.replace(TrainConfig(**values), **changes).validate()
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{Path(run_dir) / 'config.json'}: not a valid run configuration "
                              f"({distributed.first_line(error)})") from None
