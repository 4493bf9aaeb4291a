"""Distributed helpers, all in one place: the launcher's environment, process-group start-up, per-rank
seeding, rank-0-only output and collectives whose waits are bounded by ``dist_timeout``.

Launchers (``torchrun``, the ``deepspeed`` launcher, or any scheduler) describe a process by the variables
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A missing or inconsistent variable, a rank that
never joins, or a rank that dies mid-run ends in one clear line on every rank that is still alive — never
in a hang: the process group is created with ``timeout=dist_timeout`` and every collective inherits it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ConfigError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_host_group = None  # with NCCL: a gloo group over the same ranks for host-side flags (else the default group)


class DistributedError(RuntimeError):
    """A rendezvous or collective failed (another rank died, or a wait ran past dist_timeout)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_environment(environ=None, local_rank: int | None = None) -> World | None:
    """The World the launcher described, None when no launcher variable is set; ConfigError when it is partial.

    ``local_rank``: the ``--local_rank`` argument the deepspeed launcher passes, used when LOCAL_RANK is unset.
    """
    environ = os.environ if environ is None else environ
    present = [name for name in LAUNCH_VARIABLES if name in environ]
    if not present and local_rank is None:
        return None
    values = {name: environ.get(name) for name in LAUNCH_VARIABLES}
    if values["LOCAL_RANK"] is None and local_rank is not None:
        values["LOCAL_RANK"] = str(local_rank)
    missing = [name for name, value in values.items() if value in (None, "")]
    if missing:
        raise ConfigError(f"incomplete launcher environment: {', '.join(missing)} not set (launch with torchrun "
                          f"or deepspeed, or set all of {', '.join(LAUNCH_VARIABLES)})")
    try:
        rank, size, local = int(values["RANK"]), int(values["WORLD_SIZE"]), int(values["LOCAL_RANK"])
        int(values["MASTER_PORT"])
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers") from None
    if not (size > 0 and 0 <= rank < size and 0 <= local <= rank):
        raise ConfigError(f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local}")
    return World(rank, size, local)


def start(engine: str, timeout_s: float, device_type: str, local_rank: int | None = None) -> World:
    """Join the process group the launcher set up (or none, for ``single``); returns this process's World."""
    world = launch_environment(local_rank=local_rank)
    if engine == "single":
        if world is not None and world.size > 1:
            raise ConfigError(f"launched as {world.size} processes but --engine single; pass --engine ddp or "
                              f"--engine deepspeed")
        return World()
    if world is None:
        raise ConfigError(f"--engine {engine} needs a launcher: run under torchrun or deepspeed "
                          f"(no {', '.join(LAUNCH_VARIABLES)} in the environment)")
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, rank=world.rank, world_size=world.size, store=restart_store(timeout_s),
                                    timeout=timedelta(seconds=timeout_s))
        except Exception as error:  # noqa: BLE001 — the store raises several types for one cause
            raise DistributedError(f"rank {world.rank}/{world.size}: rendezvous at {os.environ['MASTER_ADDR']}:"
                                   f"{os.environ['MASTER_PORT']} failed within {timeout_s:g} s "
                                   f"({first_line(error)})") from None
    global _host_group
    if _host_group is None and dist.get_backend() != "gloo":  # host-side flags (max_over_ranks) go over gloo
        _host_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return world


def restart_store(timeout_s: float):
    """Under torchrun, the store of this attempt: torchrun's own TCPStore keeps its keys across the restarts of
    ``--max-restarts``, so a restarted group could read the previous attempt's addresses (gloo: "Connection
    refused"); a prefix per attempt (TORCHELASTIC_RESTART_COUNT) keeps them apart. None elsewhere (env://)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"dsm_fast/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)


def stop() -> None:
    global _host_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


def max_over_ranks(value: int) -> int:
    """The largest ``value`` over the ranks, all-reduced on the host (gloo): the device is not synchronized."""
    if not active():
        return value
    flag = torch.tensor([value], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_host_group or dist.group.WORLD)
    return int(flag)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def seed_rank(seed: int, world: World) -> None:
    """Seed the global torch RNG per rank (seed + rank) for rank-local randomness. Streams that must agree
    on every rank — the initial weights, the data permutation, the noise of the global batch — have their own
    generators seeded by ``seed`` alone; a single process keeps its RNG untouched."""
    if world.size > 1:
        torch.manual_seed(seed + world.rank)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (one tiny all-reduce)."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather_objects(obj) -> list:
    """``obj`` from every rank, in rank order (a list of one without a process group)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def average(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each scalar averaged over the ranks (one all-reduce of the stacked values)."""
    if not active():
        return tensors
    stacked = torch.stack([v.float() for v in tensors.values()])
    dist.all_reduce(stacked)
    return dict(zip(tensors, stacked / dist.get_world_size()))
