"""One run per folder: ``train`` holds an exclusive OS lock (``flock``) on ``RUN/.lock`` while it runs.

The lock is taken by rank 0 only — the one process that writes the trainer's checkpoints, ``stats.jsonl`` and
``config.json`` — and the ranks agree on the outcome, so a second ``train`` into a folder that one is training
refuses on every rank in one line naming the holder's process id. The kernel drops the lock when the holder dies
(kill -9 included): a crashed run never leaves the folder locked. Readers (``eval``, ``plots``, the analyses)
take no lock; they only ever read checkpoints renamed into place whole (dsm_fast/checkpoint.py).

On a shared file system the lock is as good as the file system's ``flock`` (local disks and NFS with Linux
clients honour it across hosts; Lustre needs the ``flock`` mount option).
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from .config import ConfigError

LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # run folder → the open descriptor holding its lock (this process)


class RunInUse(ConfigError):
    """Another process is training into the run folder (the message names it)."""

    def __init__(self, run_dir: Path):
        super().__init__(f"--out {run_dir} is in use by another dsm-fast train ({holder(run_dir)}); wait for it "
                         f"to finish or stop it, or choose another --out")


def holder(run_dir: str | Path) -> str:
    """Who holds (or last held) the lock: "pid N on HOST", from the lock file."""
    try:
        text = (Path(run_dir) / LOCK_NAME).read_text().split()
    except OSError:
        text = []
    return f"pid {text[0]} on {text[1]}" if len(text) >= 2 else "a process whose id it did not record"


def acquire(run_dir: str | Path) -> None:
    """Take ``RUN/.lock`` for this process (creating the folder), or raise RunInUse naming the holder.
    Taking it again in the process that holds it is a no-op."""
    run_dir = Path(run_dir).absolute()
    if run_dir in _held:
        return
    from .checkpoint import make_run_dir, os_error_line

    make_run_dir(run_dir)
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise ConfigError(f"--out {run_dir}: cannot write there ({os_error_line(error)})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunInUse(run_dir) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    _held[run_dir] = fd


def release(run_dir: str | Path) -> None:
    """Give the lock back (the file stays; its content names the last holder)."""
    fd = _held.pop(Path(run_dir).absolute(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock


def hold_for_world(run_dir: str | Path, world) -> None:
    """Rank 0 takes the lock; every rank learns rank 0's refusal, so all refuse together with the same line."""
    from . import distributed

    refusal = None
    if world.is_main:
        try:
            acquire(run_dir)
        except ConfigError as error:
            refusal = error
    message = distributed.gather_objects(None if refusal is None else str(refusal))[0]
    if refusal is not None:
        raise refusal
    if message is not None:
        raise ConfigError(message)


def take_run_folder(cfg, resume: bool, world) -> None:
    """What ``train`` does to its folder before anything else: the lock (``hold_for_world``; the folder is created
    or refused in one line), the checks of config.check_run_folder, and, on rank 0, interrupted saves set aside
    (checkpoint.set_aside_incomplete), each named in a warning."""
    import sys

    from . import distributed
    from .checkpoint import set_aside_incomplete
    from .config import check_run_folder

    hold_for_world(cfg.out, world)
    check_run_folder(cfg, resume)
    if world.is_main:
        for moved in set_aside_incomplete(Path(cfg.out)):
            print(f"warning: {moved.name} had no manifest (an interrupted save); moved to {moved.parent}",
                  file=sys.stderr, flush=True)
    distributed.barrier()

