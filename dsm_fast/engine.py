"""Engines: one interface over a single process, torch DDP and DeepSpeed ZeRO 0–3 (the only module that
imports DeepSpeed). The trainer calls, per optimizer step::

    engine.set_lr(lr)
    engine.zero_grad()
    for k in range(grad_accum):
        with engine.micro_step(last=k == grad_accum - 1):
            loss = engine.terms(x_k, t_k, eps_k)["loss"].mean()
            engine.backward(loss, last)                         # ∇ of loss / grad_accum, averaged over ranks
    grad_norm, ok = engine.step(grad_clip, loss_finite)         # ok false: a non-finite step, update skipped

so the update is that of the mean loss over the global batch on every engine. DDP and DeepSpeed wrap the
route as a module (RouteModule): one wrapped forward per micro-step whose outputs are the loss terms, so
their hooks run outside the route's inner torch.func transform.

Routes under DeepSpeed (docs/method.md §7.2). ``engine.backward`` has no ``create_graph``, so a double backward
must be built inside the forward. Since DeepSpeed 0.18.3 the engine hooks its forward's outputs and divides
every gradient flowing out of them by grad_accum — an inner ``autograd.grad`` included: wrapping the energy
U itself would silently rescale ∇_y U and ∂_t U. dsm_fast therefore wraps the whole route (RouteModule):
the engine's outputs are the loss terms, the inner gradient never leaves the forward, and every route —
the reference double backward and the first-order ``functional`` / ``compiled`` / ``fused`` ones — is exact
under ZeRO 0–2. ZeRO-3 releases each module's gathered weights after its forward and gathers them again only
for that module's first-order backward: the reference route's second backward then meets released weights and
fails, and the torch.func transform of ``functional`` / ``compiled`` breaks on ZeRO-3's module hooks (DeepSpeed
0.19.8 on CPU: functorch's internal assert, or a segmentation fault). The explicit adjoint (``fused``) is an
ordinary first-order graph and is exact under ZeRO-3; the other routes are refused there
(tests/test_engine_deepspeed.py shows the rescaling, the failing second backward and the equalities).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from . import zero_state
from .checkpoint import CheckpointError, non_finite
from .config import ConfigError, TrainConfig
from .distributed import World, barrier

DEEPSPEED_SUBDIR = "deepspeed"  # RUN/deepspeed/step_XXXXXXXX: DeepSpeed's own checkpoint of each step


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def micro_batch(cfg: TrainConfig, world: World) -> int:
    """Images per rank per micro-step: batch_size (the global batch) / (world size × grad_accum)."""
    parts = world.size * cfg.grad_accum
    if cfg.batch_size % parts:
        raise ConfigError(f"batch_size {cfg.batch_size} (the global batch) is not divisible by world size "
                          f"{world.size} × grad_accum {cfg.grad_accum}")
    return cfg.batch_size // parts


def check_engine(cfg: TrainConfig, world: World) -> None:
    """Refuse, in one line, a combination that would fail or train the wrong loss."""
    micro_batch(cfg, world)
    if cfg.engine != "deepspeed":
        return
    if not deepspeed_available():
        raise ConfigError("--engine deepspeed needs DeepSpeed: DS_BUILD_OPS=0 pip install 'dsm_fast[deepspeed]'")
    if cfg.precision == "fp64":
        raise ConfigError("precision fp64 is not supported by DeepSpeed's ZeRO optimizers; use fp32 or bf16")
    if deepspeed_stage(cfg) == 3 and cfg.route != "fused":
        raise ConfigError(f"route {cfg.route} is refused under ZeRO-3 (its double backward meets weights ZeRO-3 has "
                          f"released, or torch.func breaks on ZeRO-3's hooks); use --route fused, or --zero-stage 2")
    if deepspeed_stage(cfg) == 3 and cfg.ema_decay > 0:
        raise ConfigError("--ema-decay needs the full weights on every rank after each step; ZeRO-3 partitions them "
                          "(use --zero-stage 2, or --ema-decay 0)")


class RouteModule(nn.Module):
    """A route as a module: forward(x, t, eps) → per-sample terms; ``energy`` holds the parameters."""

    def __init__(self, energy: nn.Module, route: Callable[..., dict[str, torch.Tensor]]):
        super().__init__()
        self.energy, self.route = energy, route

    def forward(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.route(x, t, eps)


class SingleEngine:
    """One process: plain autograd, gradients averaged over micro-batches by scaling each loss."""

    name = "single"
    skips_non_finite = True  # a step with a non-finite loss or gradient is dropped and the run goes on
    partitions_weights = False  # True under ZeRO-3: the module holds only this rank's shard of each weight

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int,
                 route: Callable[..., dict[str, torch.Tensor]]):
        self.module, self.optimizer, self.grad_accum = module, optimizer, grad_accum
        self.terms = route  # (x, t, eps) → per-sample terms

    def micro_step(self, last: bool):
        return contextlib.nullcontext()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def set_lr(self, lr: float) -> None:
        """The next update's learning rate (in place where it is a tensor: a captured CUDA graph reads it)."""
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def step(self, grad_clip: float, loss_finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, then update unless the loss or the gradient norm is non-finite: (grad_norm, ok), on the device.
        torch's fused Adam skips on the device (its ``found_inf``): no host synchronization; other optimizers
        read ``ok`` on the host."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), grad_clip if grad_clip > 0 else math.inf)
        ok = self.agree(torch.isfinite(grad_norm) & loss_finite)
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = (~ok).float()
            self.optimizer.step()
        elif ok:
            self.optimizer.step()
        return grad_norm, ok

    def agree(self, ok: torch.Tensor) -> torch.Tensor:
        """``ok`` on every rank (one process: itself)."""
        return ok

    # --- checkpoints: weights and optimizer go into the trainer's own checkpoint --------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights (all ranks call: under ZeRO-3 they are gathered)."""
        return self.module.state_dict()

    def checkpoint_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def non_finite_state(self) -> list[str]:
        """Non-finite optimizer tensors not in ``checkpoint_state`` (this rank's; checked before a checkpoint)."""
        return []

    def save_native(self, run_dir: Path, step: int) -> list[Path]:
        """Engines with a checkpoint format of their own write it here (all ranks call); returns its files."""
        return []

    def prune_native(self, run_dir: Path, keep: list[str]) -> None:
        """Delete DeepSpeed's checkpoints of steps not in ``keep`` (rank 0; also those of a DeepSpeed run resumed by
        another engine). Beside them: DeepSpeed's zero_to_fp32.py."""
        for old in (Path(run_dir) / DEEPSPEED_SUBDIR).glob("step_*"):
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict) -> None:
        """Weights and optimizer state of a checkpoint (one written under DeepSpeed: from its full tensors)."""
        if "optimizer" not in state and "zero_optimizer" not in state:
            raise ConfigError(f"{run_dir} was written with DeepSpeed by an older dsm_fast, without the full optimizer "
                              f"state another engine needs; resume it with --engine deepspeed")
        self.module.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"] if "optimizer" in state else
                                       zero_state.to_torch_state(self.optimizer, self.module, state["zero_optimizer"]))


class DDPEngine(SingleEngine):
    """torch DistributedDataParallel: gradients all-reduced (averaged) during the last micro-step's backward;
    earlier micro-steps run under ``no_sync``. Every rank holds the full weights and optimizer state."""

    name = "ddp"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int, route,
                 device: torch.device):
        super().__init__(module, optimizer, grad_accum, route)
        from torch.nn.parallel import DistributedDataParallel

        # The energy's buffers are constants: no broadcast before each forward.
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        self.terms = DistributedDataParallel(RouteModule(module, route),
                                             device_ids=[device] if device.type == "cuda" else None, **no_buffer_sync)

    def micro_step(self, last: bool):
        return contextlib.nullcontext() if last else self.terms.no_sync()

    def agree(self, ok: torch.Tensor) -> torch.Tensor:
        """``ok`` on every rank: a minimum all-reduced on the device (no host read), so every rank skips together."""
        import torch.distributed as dist

        flag = ok.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag.bool()


def deepspeed_stage(cfg: TrainConfig) -> int:
    if cfg.deepspeed_config:
        return int(read_deepspeed_json(cfg.deepspeed_config).get("zero_optimization", {}).get("stage", 0))
    return cfg.zero_stage


def read_deepspeed_json(path: str) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def deepspeed_config(cfg: TrainConfig, world: World) -> dict:
    """The DeepSpeed config, derived from ours — the one place that does it. A user JSON (``deepspeed_config``)
    is taken as given, except that its batch and clipping keys must agree with ours (missing ones are filled in:
    DeepSpeed's own default would clip the gradient norm at 1.0 where dsm_fast's grad_clip 0 does not clip)."""
    ours = {"train_batch_size": cfg.batch_size, "train_micro_batch_size_per_gpu": micro_batch(cfg, world),
            "gradient_accumulation_steps": cfg.grad_accum, "gradient_clipping": cfg.grad_clip}
    torch_optimizer = {"zero_allow_untested_optimizer": True,  # our torch Adam, stepped on each rank's partition
                       "zero_force_ds_cpu_optimizer": False}  # offload with torch Adam: no compiled DeepSpeedCPUAdam
    if cfg.deepspeed_config:
        config = read_deepspeed_json(cfg.deepspeed_config)
        for key, value in ours.items():
            if config.get(key, "auto") not in ("auto", value):
                raise ConfigError(f"{cfg.deepspeed_config}: {key} = {config[key]} disagrees with dsm_fast's {value} "
                                  f"(batch_size is the global batch, grad_accum the micro-steps per rank, "
                                  f"grad_clip the clipping norm, 0 for none)")
        return {**torch_optimizer, **config, **ours}
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.device != "cpu"}
    return {
        **ours,
        **torch_optimizer,
        "zero_optimization": zero,
        # bf16 as autocast with fp32 master weights (not DeepSpeed's bf16 weights): t spans 1e-9 … 1e3 and the
        # time term cancels large numbers, so inputs and the loss stay in fp32, as on one device.
        "torch_autocast": {"enabled": cfg.precision == "bf16", "dtype": "bfloat16"},
        "steps_per_print": 2**31 - 1,
    }


class DeepSpeedEngine(SingleEngine):
    """DeepSpeed ZeRO 0–3 with our optimizer; gradient accumulation, averaging over ranks and clipping are
    DeepSpeed's. Checkpoints: DeepSpeed's own format in RUN/deepspeed/step_N plus the trainer's state, which holds
    the full weights (gathered under ZeRO-3) and the optimizer state as full tensors per parameter
    (dsm_fast/zero_state.py). A resume with the world size and ZeRO options that wrote the run loads DeepSpeed's
    own checkpoint (bit-exact); another world size, ZeRO stage or engine loads full tensors into the partitions."""

    name = "deepspeed"
    skips_non_finite = False  # it cannot discard a partly accumulated, partitioned step: the run stops instead

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, world: World, route):
        import deepspeed

        from .distributed import first_line

        super().__init__(module, optimizer, cfg.grad_accum, route)
        self.config = deepspeed_config(cfg, world)
        self.world = world
        self.partitions_weights = deepspeed_stage(cfg) == 3
        try:
            self.ds, self.optimizer, _, _ = deepspeed.initialize(model=RouteModule(module, route),
                                                                    optimizer=optimizer, config=self.config)
            self.terms = self.ds  # DeepSpeed's engine: forward, backward, step, checkpoints
        except (AssertionError, ValueError) as error:  # DeepSpeed validates its config with asserts
            raise ConfigError(f"DeepSpeed refused the config: {first_line(error)}") from None

    def micro_step(self, last: bool):
        return contextlib.nullcontext()

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.ds.backward(loss)  # divides by grad_accum itself
        if not last:
            self.ds.step()  # a micro-step: DeepSpeed counts it and steps only at the boundary

    def step(self, grad_clip: float, loss_finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if norm is None else float(norm))
        return grad_norm, torch.isfinite(grad_norm)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if not self.partitions_weights:
            return self.module.state_dict()
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters())):  # all-gather, then re-partition
            return {name: value.detach().clone() for name, value in self.module.state_dict().items()}

    def checkpoint_state(self) -> dict:
        """The optimizer state without its partitioning (all ranks call: it is gathered; rank 0 keeps it)."""
        return {"zero_layout": self.layout(),
                "zero_optimizer": zero_state.gather_full(self.module, self.optimizer, keep=self.world.is_main)}

    def layout(self) -> dict:
        """What DeepSpeed's own checkpoint depends on: the world size and the ZeRO options (stage, offload, …)."""
        return {"world_size": self.world.size, "zero_optimization": self.config.get("zero_optimization", {})}

    def non_finite_state(self) -> list[str]:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # ZeRO wraps torch Adam over fp32 partitions
        return non_finite({"optimizer": list(inner.state.values()),
                           "master": [p for group in inner.param_groups for p in group["params"]]})

    def save_native(self, run_dir: Path, step: int) -> list[Path]:
        folder = Path(run_dir) / DEEPSPEED_SUBDIR
        self.ds.save_checkpoint(str(folder), tag=tag(step), save_latest=False)
        barrier()  # every rank's files are written before rank 0 digests them
        return sorted((folder / tag(step)).iterdir())

    def load(self, run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict) -> None:
        written = state.get("zero_layout")
        if written is None and state.get("engine_format"):  # DeepSpeed, written by an older dsm_fast
            written = {"world_size": int(state["world_size"]), "zero_optimization": self.layout()["zero_optimization"]}
        if written != self.layout():  # another world size, ZeRO configuration or engine: the partition-free state
            if "zero_optimizer" in state:
                full = state["zero_optimizer"]
            elif "optimizer" in state:  # written by engine single or ddp
                full = zero_state.from_torch_state(self.module, state["optimizer"])
            else:
                raise ConfigError(f"{run_dir} was written by {written['world_size']} DeepSpeed process(es) with an "
                                  f"older dsm_fast, without the optimizer state another world size needs; resume it "
                                  f"with {written['world_size']} processes and the same ZeRO options")
            zero_state.scatter_full(self.module, self.optimizer, weights, full, self.partitions_weights)
            self.ds.global_steps, self.ds.global_samples = step, step * self.config["train_batch_size"]
            return
        folder = Path(run_dir) / DEEPSPEED_SUBDIR
        if not (folder / tag(step)).is_dir():
            raise ConfigError(f"{run_dir}: no DeepSpeed checkpoint for step {step}; resume with the engine that "
                              f"wrote the run")
        self.ds.checkpoint_engine = WeightsOnlyLoads(self.ds.checkpoint_engine)
        path, _ = self.ds.load_checkpoint(str(folder), tag=tag(step))
        if path is None:
            raise ConfigError(f"{folder / tag(step)}: DeepSpeed could not load this checkpoint")


class WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine, except that ``load`` unpickles with ``weights_only=True``: tensors and plain
    containers, plus the three plain DeepSpeed types its ZeRO optimizer files hold (a loss scaler, the ZeRO stage
    enum, a fragment address). DeepSpeed's own loader uses ``weights_only=False``, which runs any code a crafted
    file carries; here such a file is refused in one line (tests/test_engine_deepspeed.py). Our checkpoint's
    manifest also holds digests of these files, checked before DeepSpeed reads them (dsm_fast/checkpoint.py)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def load(self, path: str, map_location=None):
        import pickle

        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        try:
            with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            lines = str(error).splitlines() or [type(error).__name__]
            reason = next((line.strip() for line in lines if "WeightsUnpickler" in line), lines[0])
            raise CheckpointError(f"{path}: refused, it holds objects other than tensors and plain data "
                                  f"({reason[:200]})") from None


def tag(step: int) -> str:
    return f"step_{step:08d}"


def make_engine(cfg: TrainConfig, module: nn.Module, optimizer: torch.optim.Optimizer, world: World,
                device: torch.device, route) -> SingleEngine:
    """The engine for ``cfg.engine``; ``route`` computes the terms from ``module`` (the bare energy)."""
    check_engine(cfg, world)
    if cfg.engine == "ddp":
        return DDPEngine(module, optimizer, cfg.grad_accum, route, device)
    if cfg.engine == "deepspeed":
        return DeepSpeedEngine(module, optimizer, cfg, world, route)
    return SingleEngine(module, optimizer, cfg.grad_accum, route)
