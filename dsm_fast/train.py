"""The training loop (EDM-style): options resolved before it starts (dsm_fast/config.py); each step draws the global
batch's noise levels t and noise ε, takes this rank's images x and, on the device without waiting for it, forms the
route's per-sample terms (loss = space + λ·time), backpropagates, updates (skipped when non-finite), updates the EMA
and the non-finite-step counters (dsm_fast/nonfinite.py); the host reads values only every ``log_every`` steps
(a row of stats.jsonl and TensorBoard) or ``checkpoint_every`` steps (an atomic checkpoint).

Never losing work: a fresh run checkpoints step 0; SIGTERM and Ctrl-C stop every rank after the same step with one
checkpoint (dsm_fast/stopsignal.py); one ``train`` per run folder (dsm_fast/runlock.py); a resume
continues bit-exactly from the newest checkpoint that passes its checks (dsm_fast/checkpoint.py), setting newer
ones aside and dropping the stats rows past it. ``max_bad_steps`` non-finite steps in a row stop the run and set
aside the checkpoints from the first distrusted step on; ``--resume`` continues from the healthy one before it.

Every step goes through an engine (dsm_fast/engine.py: single, DDP or DeepSpeed). ``batch_size`` is the global
batch; its t and ε are drawn from one generator on every rank and each rank takes the samples at its positions,
while ImageBatches shards the images the same way — so within an epoch, any world size × grad_accum trains on
exactly the samples one process would (tests/test_engine*.py). Rank 0 alone writes logs and checkpoint files."""
from __future__ import annotations

import contextlib
import dataclasses
import signal
from pathlib import Path
from typing import NoReturn

import torch

from . import checkpoint, config, distributed, runlock
from .config import ConfigError, TrainConfig
from .data import make_training_data
from .data.images import pixel_statistics
from .diffclf import with_free_energies
from .distributed import DistributedError
from .engine import make_engine, micro_batch
from .graphs import GraphedStep
from .losses import sample_noise_levels
from .model import build_model
from .nonfinite import NonFiniteSteps
from .optim import EMA, learning_rate, make_optimizer
from .progress import Progress, StatsLog
from .routes import make_route
from .stopsignal import StopSignals
from .subnormals import flushed_subnormals


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. too many non-finite losses); the message says why and where."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM: the run wrote a checkpoint and stopped; the exit code is 128 + the signal."""

    def __init__(self, signal_number: int, message: str = ""):
        super().__init__(message)
        self.signal_number = signal_number


class Trainer:
    """Trains ``cfg.model`` on ``cfg.data`` with ``cfg.objective`` through ``cfg.route``."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, local_rank: int | None = None):
        self.cfg, self.run_dir, self.resumed = cfg, Path(cfg.out), resume
        self.device = config.resolve_device(cfg.device)
        config.check_device(cfg, self.device)
        self.world = distributed.start(cfg.engine, cfg.dist_timeout, self.device.type, local_rank)
        runlock.take_run_folder(cfg, resume, self.world)  # one train per folder, checked, crash leftovers aside
        if self.device.type == "cuda" and self.world.size > 1:
            self.device = torch.device("cuda", self.world.local_rank)
        self.micro_batch, self.dtype = micro_batch(cfg, self.world), config.compute_dtype(cfg)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.data = make_training_data(cfg, self.world.rank, self.world.size)
        shape = self.data.sample_shape
        model = build_model(cfg.model, channels=shape[0], dim=shape[-1], radial_offset=cfg.radial_offset,
                            energy=cfg.energy)
        config.check_model_fits_data(cfg, shape, getattr(getattr(model, "unet", None), "downsampling", 1))
        if cfg.checkpoint_activations != "none":
            model.unet.checkpoint = cfg.checkpoint_activations
        if cfg.energy == "gaussian":  # μ and s² of the training pixels (a resumed run reloads the same buffers)
            model.set_data_statistics(*pixel_statistics(self.data.images))
        self.model = with_free_energies(model, cfg)  # DiffCLF: the model also owns the free energies F_j
        self.model.to(device=self.device, dtype=self.dtype)
        self.cfg = cfg = config.resolve_fast_path(cfg, self.device)
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
        self.skipped = NonFiniteSteps(self.device, cfg.max_bad_steps)
        self._pre_step, self._in_step = self._stream_state(), False
        if resume:
            self._restore()
        self.run_record: dict = {}  # what config.json records about this start beside the options (config.RUN_RECORD)
        self._write_config()

    def _write_config(self, **record) -> None:
        """RUN/config.json: the resolved options and, beside them, ``run_record`` updated with ``record``."""
        self.run_record.update(record)
        if self.world.is_main:
            checkpoint.write_run_config(self.run_dir, {**dataclasses.asdict(self.cfg), **self.run_record})

    def _record_compile_fallback(self) -> None:
        """Once torch.compile has fallen back to eager (``Compiled.fallback``), config.json says so: the run's
        compile stays "on" (a --resume compiles again) and compile_fell_back names the step and the reason."""
        reason = getattr(self.route, "fallback", None)
        if reason is not None and "compile_fell_back" not in self.run_record:
            self._write_config(compile_fell_back=f"step {self.step - 1}: {reason}")

    # --- checkpoints -----------------------------------------------------------------------------
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
        state.update(self.engine.checkpoint_state(), **self.skipped.state_dict(), world_size=self.world.size,
                     engine_format=self.engine.name == "deepspeed")
        weights = self.engine.full_state_dict()
        ema = self.ema.state_dict() if self.ema else None
        bad = checkpoint.non_finite({"model": weights, "ema": ema or {}, "state": state})
        bad += self.engine.non_finite_state()
        if not distributed.all_true(not bad, self.device):
            self.diverged(f"non-finite weights or optimizer state at step {self.step} ({', '.join(bad[:3])})")
        native = self.engine.save_native(self.run_dir, self.step)
        failed = None
        if self.world.is_main:
            try:
                checkpoint.save_checkpoint(self.run_dir, self.step, weights, state, ema,
                                           healthy=self.skipped.in_row == 0,
                                           trusted_before=self.skipped.trusted_before(self.step), native=native)
                self.engine.prune_native(self.run_dir, [p.name for p in checkpoint.list_checkpoints(self.run_dir)])
            except checkpoint.CheckpointWriteError as error:  # e.g. a full disk: every rank stops, none waits
                failed = error
        if not distributed.all_true(failed is None, self.device):  # (also the barrier before anyone reads it)
            raise failed or checkpoint.CheckpointError(f"rank 0 could not write the checkpoint of step {self.step} "
                                                       f"(its line says why); the earlier checkpoints are intact")
        return checkpoint.list_checkpoints(self.run_dir)[-1]

    def _restore(self) -> None:
        """Continue from the newest healthy checkpoint that passes its checks (checkpoint.newest_loadable): the
        newer ones are set aside (RUN/rejected) and stats.jsonl loses the rows past the step resumed from."""
        if not checkpoint.list_checkpoints(self.run_dir):
            raise ConfigError(f"--resume: {self.run_dir} holds no checkpoint to resume")
        weights, state, ema = checkpoint.newest_loadable(self.run_dir, self.device, warn=self.world.is_main)
        if "imported_from" in state:  # dsm-fast import-release: weights only, no optimizer or stream state
            raise ConfigError(f"{self.run_dir} holds weights imported from {state['imported_from']}, without the "
                              f"optimizer state a resume needs; evaluate or analyse it, or train a new run")
        step = int(state["step"])
        distributed.barrier()  # every rank has read its checkpoint before rank 0 moves the newer ones aside
        if self.world.is_main:
            checkpoint.reject_from(self.run_dir, step + 1)
            checkpoint.drop_stats_after(self.run_dir / "stats.jsonl", step)
        checkpoint.restore_streams(self.run_dir, state, self.world, self.data, self.noise_generator)  # any world size
        self.engine.load(self.run_dir, step, weights, state)
        if self.ema is not None and ema is not None:
            self.ema.load_state_dict(ema)
        self.step = step
        self.skipped.load_state_dict(state)

    def diverged(self, reason: str) -> NoReturn:
        """Stop a diverged run: the checkpoints from the first distrusted step on (NonFiniteSteps.first_distrusted)
        are set aside (RUN/rejected) and the message names the newest healthy one, which ``--resume`` continues."""
        first = self.skipped.first_distrusted(self.step)
        if self.world.is_main:
            checkpoint.reject_from(self.run_dir, first)
        distributed.barrier()
        healthy = checkpoint.list_checkpoints(self.run_dir)
        cause = (f"the update to step {first} diverged" if first else "the initial weights give non-finite losses")
        where = (f"checkpoints from step {first} on are set aside in {self.run_dir / 'rejected'}; "
                 f"--resume continues from the newest healthy one, step {checkpoint.checkpoint_step(healthy[-1])} "
                 f"({healthy[-1]})" if healthy else "no healthy checkpoint remains: start a new run")
        raise TrainingStopped(f"{reason}: {cause} (lower --lr or set --grad-clip); {where}")

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
        """Micro-steps, backward, the (possibly skipped) update, the EMA and the non-finite-step counters, all on
        the device; under --cuda-graph this function is what is captured and replayed (dsm_fast/graphs.py)."""
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
        self.skipped.update(ok)
        return {**out, "grad_norm": grad_norm.detach(), "ok": ok}

    # --- the loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to ``cfg.steps``; checkpoint every ``checkpoint_every`` steps, at the end, on Ctrl-C, on error.
        With several ranks a failure other than a stop signal is not checkpointed (the peers may be gone; the last
        periodic checkpoint stands) and ends as a DistributedError naming the rank, so every rank stops with one
        clear line. The run folder's lock (dsm_fast/runlock.py) is released at the end.
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
        cfg = self.cfg
        self._in_step = False
        if self.step == 0 and not self.resumed:
            self.save()  # step 0: what a divergence in the first steps rolls back to
        start, skipped_at_start, record = self.step, self.skipped.total, {}
        log = StatsLog(self.run_dir, self.step, cfg.batch_size, enabled=self.world.is_main)
        progress = Progress(cfg.steps, self.step, cfg.batch_size, enabled=cfg.progress and self.world.is_main,
                            window=cfg.log_every)
        with contextlib.closing(log), contextlib.closing(progress), StopSignals() as signals:
            try:
                while self.step < cfg.steps:
                    if number := signals.agreed():  # SIGTERM/SIGINT on any rank: all checkpoint this step, below
                        raise Interrupted(number)
                    terms = self.train_step()
                    self._record_compile_fallback()
                    progress.step(terms)
                    log_now = self.step % cfg.log_every == 0 or self.step == cfg.steps
                    checkpoint_now = self.step % cfg.checkpoint_every == 0
                    if not (log_now or checkpoint_now):
                        continue  # values are read on the host only to log or checkpoint
                    if stop := self.skipped.read(self.step):
                        self.diverged(stop)
                    if log_now and bool(terms.pop("ok")):
                        record = log.write(self.step, distributed.average(terms), skipped_steps=self.skipped.total)
                        progress.mark_logged()
                    if checkpoint_now:
                        self.save()
            except (KeyboardInterrupt, Exception) as error:
                if isinstance(error, (TrainingStopped, ConfigError, checkpoint.CheckpointError)):
                    raise
                if self.world.size > 1 and not isinstance(error, Interrupted):
                    raise DistributedError(f"rank {self.world.rank}/{self.world.size} stopped at step {self.step}: "
                                           f"{type(error).__name__}: {distributed.first_line(error)}") from error
                path = self.save(streams=self._pre_step if self._in_step else None)  # an interrupted step is redrawn
                if isinstance(error, KeyboardInterrupt):
                    number = getattr(error, "signal_number", signal.SIGINT)
                    raise Interrupted(number, f"{signal.Signals(number).name} at step {self.step}: checkpoint saved "
                                              f"at {path}; continue with --resume") from None
                raise
        if self.step > start and self.skipped.total - skipped_at_start == self.step - start:
            self.diverged(f"all {self.step - start} steps of this run were skipped (non-finite losses)")
        self.save()
        if self.engine.partitions_weights:  # ZeRO-3 left each rank a shard: keep a full copy for evaluation
            weights, shape = self.engine.full_state_dict(), self.data.sample_shape
            self.model = with_free_energies(build_model(cfg.model, channels=shape[0], dim=shape[-1],
                                                        energy=cfg.energy), cfg)
            self.model.to(device=self.device, dtype=self.dtype).load_state_dict(weights)
        return {"step": self.step, "skipped_steps": self.skipped.total, "optimizer": self.optimizer_name, **record,
                "smoothed_loss": progress.smoothed(), "first_smoothed_loss": progress.first, **self.run_record}

