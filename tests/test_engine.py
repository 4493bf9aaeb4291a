"""Engines under several processes on the CPU (gloo): the parameters after K steps equal a single process's
with the same global batch; kill-and-resume equals an uninterrupted run; a dead rank or a wrong launcher
environment ends in one clear error on every rank, never a hang. DeepSpeed: tests/test_engine_deepspeed.py.

Each multi-process case launches fresh processes (spawn) that run a list of jobs and write, per job, the
full weights (rank 0) or the error text (every rank) into a folder the test reads back.
"""
import copy
import errno
import json
import multiprocessing
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch

from dsm_fast.checkpoint import checkpoint_step, list_checkpoints
from dsm_fast.config import ConfigError, TrainConfig
from dsm_fast.distributed import DistributedError, launch_environment, start
from dsm_fast.tools.testing import relative_error, state_bytes, tiny_config
from dsm_fast.train import Trainer

K = 4  # optimizer steps per run
LAUNCH_TIMEOUT = 150  # seconds for a whole multi-process launch


def engine_config(out, **changes) -> TrainConfig:
    """The tiny run every engine test trains: K steps of batch 8 by the functional route, checkpoints every 2."""
    return tiny_config(out, **{"batch_size": 8, "steps": K, "checkpoint_every": 2, "ema_decay": 0.0,
                               "route": "functional", "lr": 1e-3, "dist_timeout": 30.0, **changes})


def single_run(out, **changes) -> dict[str, torch.Tensor]:
    trainer = Trainer(engine_config(out, **changes))
    trainer.run()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: list[dict], folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from dsm_fast import checkpoint

    save_file = checkpoint.save_file
    for job in jobs:
        name = job["name"]
        checkpoint.save_file = save_file
        try:
            trainer = Trainer(engine_config(Path(folder) / name.split("+")[0], **job["changes"]),
                              resume=job.get("resume", False))
            if job.get("full_disk", (None,))[0] == rank:  # this rank's disk is full from step job["full_disk"][1]
                def full(*args, trainer=trainer, at=job["full_disk"][1]):
                    if trainer.step >= at:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    return save_file(*args)

                checkpoint.save_file = full
            if job.get("die", (None,))[0] == rank:  # this rank dies abruptly inside step job["die"][1]
                route_call = trainer.route.__class__.__call__

                def die(self, x, t, eps, trainer=trainer, at=job["die"][1], route_call=route_call):
                    if trainer.step == at:
                        os._exit(3)
                    return route_call(self, x, t, eps)

                trainer.route.__class__.__call__ = die
            trainer.run()
            if job.get("state_bytes"):  # what this rank holds of weights, gradients and optimizer state
                (Path(folder) / f"{name}.rank{rank}.bytes").write_text(str(state_bytes(trainer.engine)))
            if rank == 0:  # the weights rank 0 evaluates (under ZeRO-3 a full copy gathered at the end)
                torch.save(trainer.model.state_dict(), Path(folder) / f"{name}.pt")
        except Exception as error:  # noqa: BLE001 — every failure is reported to the test as text
            (Path(folder) / f"{name}.rank{rank}.err").write_text(f"{type(error).__name__}: {error}\n"
                                                                 f"{traceback.format_exc()}")
            if job.get("stop_on_error", True):
                break
    from dsm_fast.distributed import stop

    stop()


def launch(world: int, jobs: list[dict], folder: Path, timeout: float = LAUNCH_TIMEOUT) -> list[int]:
    """Run ``jobs`` in ``world`` fresh processes; returns their exit codes (all are reaped, none hangs)."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, world, port, jobs, str(folder))) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"{len(hung)} process(es) still running after {timeout} s"
    return [p.exitcode for p in procs]


def errors(folder: Path, name: str) -> dict[int, str]:
    return {int(p.name.split(".rank")[1].split(".")[0]): p.read_text() for p in folder.glob(f"{name}.rank*.err")}


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                        tol: float = 1e-6) -> None:
    """fp32: relative error of the parameter vector < tol (a tensor initialised at zero, like the modulation
    biases, shows per-tensor rounding of ~1e-5 after Adam's first sign-like steps; in fp64 the same runs agree
    to ~1e-15 per tensor, see the fp64 case). The run must also have moved the weights far more than tol."""
    error = relative_error(got, want)
    assert error < tol, f"relative error of the parameters {error:.3g} ≥ {tol:g}"
    moved = relative_error(want, start)
    assert moved > 1e3 * tol, f"weights moved by only {moved:.3g}: the comparison proves nothing"


def logged_losses(run: Path) -> dict[int, float]:
    """The loss of every step logged in a run's stats.jsonl."""
    rows = [json.loads(line) for line in (Path(run) / "stats.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def initial_weights(out, **changes) -> dict[str, torch.Tensor]:
    trainer = Trainer(engine_config(out, steps=0, **changes))
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# --- two processes, DDP ----------------------------------------------------------------------------------
def test_ddp_two_processes_equal_one_process_and_resume_after_a_kill(tmp_path):
    jobs = [
        {"name": "ddp1", "changes": {"engine": "ddp"}},
        {"name": "ddp2", "changes": {"engine": "ddp", "grad_accum": 2}},
        {"name": "ref2", "changes": {"engine": "ddp", "grad_accum": 2, "route": "reference"}},
        {"name": "fp64", "changes": {"engine": "ddp", "grad_accum": 2, "precision": "fp64"}},
        {"name": "full", "changes": {"engine": "ddp"}, "full_disk": (0, 2), "stop_on_error": False},
        {"name": "killed", "changes": {"engine": "ddp", "grad_accum": 2}, "die": (1, 3)},
    ]
    started = time.monotonic()
    codes = launch(2, jobs, tmp_path)
    # rank 0 cannot write the checkpoint of step 2 (a full disk): both ranks stop at once, each with one line
    full = errors(tmp_path, "full")
    assert full[0].startswith("CheckpointWriteError: could not write the checkpoint of step 2") and \
        "No space left on device" in full[0], full[0]
    assert full[1].startswith("CheckpointError: rank 0 could not write the checkpoint of step 2"), full[1]
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path / "full")] == [0]
    assert codes[1] == 3, codes  # rank 1 died at step 3 (checkpoint of step 2 on disk)
    failures = errors(tmp_path, "killed")
    assert set(failures) == {0}, failures
    assert failures[0].startswith("DistributedError: rank 0/2 stopped at step 3:"), failures[0]
    assert time.monotonic() - started < LAUNCH_TIMEOUT

    launch(2, [{"name": "killed+resumed", "changes": {"engine": "ddp", "grad_accum": 2}, "resume": True}], tmp_path)
    assert not errors(tmp_path, "killed+resumed")

    start_weights = initial_weights(tmp_path / "init")
    want = single_run(tmp_path / "single")
    for name in ("ddp1", "ddp2", "killed+resumed"):
        assert not errors(tmp_path, name), errors(tmp_path, name)
        assert_same_weights(torch.load(tmp_path / f"{name}.pt"), want, start_weights)
    assert_same_weights(torch.load(tmp_path / "ref2.pt"), single_run(tmp_path / "single_ref", route="reference"),
                        start_weights)
    fp64, want64 = torch.load(tmp_path / "fp64.pt"), single_run(tmp_path / "single64", precision="fp64")
    worst = max(float((fp64[k] - want64[k]).norm() / want64[k].norm()) for k in want64)
    assert worst < 1e-12, f"fp64: largest relative error per tensor {worst:.3g}"


def test_a_rank_that_never_joins_times_out_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(DistributedError, match=r"rank 0/2: rendezvous at 127\.0\.0\.1:\d+ failed within 2 s"):
        start("ddp", 2.0, "cpu")
    assert time.monotonic() - started < 20


# --- launcher environment ----------------------------------------------------------------------------------
def test_launcher_environment_is_checked():
    full = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert launch_environment(full).rank == 1 and launch_environment(full).size == 2
    assert launch_environment({}) is None
    without_local = {k: v for k, v in full.items() if k != "LOCAL_RANK"}
    assert launch_environment(without_local, local_rank=1).local_rank == 1  # the deepspeed launcher's --local_rank
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT not set"):
        launch_environment({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="inconsistent launcher environment"):
        launch_environment({**full, "RANK": "2"})
    with pytest.raises(ConfigError, match="must be integers"):
        launch_environment({**full, "WORLD_SIZE": "two"})


def test_wrong_engine_for_the_launch_is_refused(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="--engine ddp needs a launcher"):
        Trainer(engine_config(tmp_path / "a", engine="ddp"))
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="launched as 2 processes but --engine single"):
        Trainer(engine_config(tmp_path / "b"))


def test_global_batch_must_split_over_ranks_and_micro_steps(tmp_path):
    with pytest.raises(ConfigError, match="grad_accum must be positive and divide batch_size"):
        engine_config(tmp_path, grad_accum=3)
    with pytest.raises(ConfigError, match="offload and deepspeed_config need --engine deepspeed"):
        engine_config(tmp_path, offload=True)


def test_single_process_grad_accum_equals_one_big_batch(tmp_path):
    start_weights = initial_weights(tmp_path / "init")
    assert_same_weights(single_run(tmp_path / "acc", grad_accum=4), single_run(tmp_path / "big"), start_weights)


def test_optimizer_state_converts_to_full_tensors_and_back_and_old_deepspeed_runs_are_refused(tmp_path):
    """A torch Adam state → the partition-free form DeepSpeed checkpoints hold (dsm_fast/zero_state.py) → a fresh
    Adam: the same state; a DeepSpeed checkpoint without that form is refused by another engine in one line."""
    from dsm_fast.engine import SingleEngine
    from dsm_fast.zero_state import from_torch_state, to_torch_state

    def adam_steps(model, steps, seed):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
        inputs = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(5, 3, generator=inputs)).square().sum().backward()
            optimizer.step()
        return optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    trained = adam_steps(model, 3, seed=1)
    full = from_torch_state(model, copy.deepcopy(trained.state_dict()))  # (as read back from a checkpoint)
    assert sorted(full["moments"]) == ["exp_avg", "exp_avg_sq"] and float(full["scalars"]["step"]) == 3
    assert full["moments"]["exp_avg"]["1.weight"].shape == (2, 4)
    twin = copy.deepcopy(model)
    fresh = adam_steps(twin, 0, seed=0)
    fresh.load_state_dict(to_torch_state(fresh, twin, full))
    for a, b in zip(trained.state.values(), fresh.state.values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for optimizer, module in ((trained, model), (fresh, twin)):  # two more steps from the same gradients
        inputs = torch.Generator().manual_seed(2)
        for _ in range(2):
            optimizer.zero_grad()
            module(torch.randn(5, 3, generator=inputs)).square().sum().backward()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert to_torch_state(fresh, model, {})["state"] == {}  # a checkpoint of step 0: no state yet
    engine = SingleEngine(twin, fresh, 1, None)
    with pytest.raises(ConfigError, match="written with DeepSpeed by an older dsm_fast.*resume it with --engine "
                                          "deepspeed"):
        engine.load(tmp_path, 4, twin.state_dict(), {"engine_format": True, "world_size": 2})
