"""Runs that bend without breaking, end to end on 2 CPU processes (gloo). DDP under torchrun: a worker killed once
under ``--max-restarts 1`` is brought back by ``--resume auto``; SIGTERM to one rank and SIGINT to the launcher
each stop both ranks after the same step with one checkpoint (exit 143 / 130); the run then continues on 1
process, and a copy of a 1-process run continues on 2 — both ending at the weights of an uninterrupted run.
DeepSpeed ZeRO-2 under DeepSpeed's launcher with a hostfile: the same for SIGTERM to one rank, then 2 → 1 (as
engine single)."""
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_engine import assert_same_weights, engine_config, free_port, initial_weights, logged_losses

from dsm_fast.checkpoint import checkpoint_step, list_checkpoints, load_checkpoint
from dsm_fast.engine import deepspeed_available
from dsm_fast.runlock import LOCK_NAME
from dsm_fast.train import Trainer

FLAGS = ["--model", "tiny", "--image-size", "16", "--batch-size", "8", "--route", "functional", "--lr", "1e-3",
         "--device", "cpu", "--eval-images", "0", "--progress", "false", "--plots", "false", "--log-every", "1",
         "--checkpoint-every", "2", "--dist-timeout", "30"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
WAIT = 180  # seconds any one phase may take on a loaded 2-core machine


def torchrun(nproc: int, out: Path, *args: str, restarts: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(nproc), "--max-restarts", str(restarts), "-m", "dsm_fast", "train", *FLAGS,
                             "--engine", "ddp", "--out", str(out), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, what: str, log: Path | None = None) -> None:
    """Wait until ``condition()``; fail with the launcher's stderr (or ``log``, its output file) if it ends first."""
    deadline = time.monotonic() + WAIT
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):  # the launcher and its workers (a session of their own)
                os.killpg(proc.pid, signal.SIGKILL)
            output = log.read_text() if log else proc.communicate()[1]
            raise AssertionError(f"gave up waiting for {what}: {output[-3000:]}")
        time.sleep(0.1)


def rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The process id of the worker with RANK=rank among the launcher's descendants."""
    parents = [launcher.pid]
    while parents:
        children = []
        for parent in parents:
            try:
                children += [int(child) for task in Path(f"/proc/{parent}/task").iterdir()
                             for child in (task / "children").read_text().split()]
            except OSError:
                continue
        for child in children:
            try:
                if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
                    return child
            except OSError:
                continue
        parents = children
    return None


def newest_step(out: Path) -> int:
    found = list_checkpoints(out)
    return checkpoint_step(found[-1]) if found else -1


def lock_pid(out: Path) -> str:
    text = (out / LOCK_NAME).read_text().split() if (out / LOCK_NAME).is_file() else []
    return text[0] if text else ""


def stopped_at(stderr: str, name: str) -> int:
    """The step both ranks name in their one line "dsm-fast train: SIGxxx at step N: checkpoint saved at …"."""
    lines = [line for line in stderr.splitlines() if f"dsm-fast train: {name} at step" in line]
    steps = {int(line.split(" at step ")[1].split(":")[0]) for line in lines}
    assert len(lines) == 2 and len(steps) == 1, stderr[-3000:]
    return steps.pop()


def test_ddp_run_survives_a_kill_signals_and_another_world_size(tmp_path):
    out = tmp_path / "run"
    # 1. a worker killed once: torchrun restarts the group, which continues from the newest checkpoint
    launcher = torchrun(2, out, "--steps", "100000", "--resume", "auto", restarts=1)
    wait_for(lambda: newest_step(out) >= 2 and rank_pid(launcher, 1), launcher, "the checkpoint of step 2")
    first_holder, killed_at = lock_pid(out), newest_step(out)
    os.kill(rank_pid(launcher, 1), signal.SIGKILL)
    wait_for(lambda: lock_pid(out) not in ("", first_holder), launcher, "the restarted group's lock")
    # the old group may have written a checkpoint or two before its end: a newer one is the restarted group's, whose
    # ranks are past their start-up (a signal there meets the default handler: exit -15, seen in CI) and stepping
    resumed_from = max(newest_step(out), killed_at)
    wait_for(lambda: newest_step(out) >= resumed_from + 2, launcher, "the restarted group's next checkpoint")
    # 2. SIGTERM to one rank: both stop after the same step, with one checkpoint, and exit 143 (torchrun's
    # summary lists each failed worker's exit code; -15 there was the launcher's own SIGTERM killing a rank late)
    os.kill(rank_pid(launcher, 1), signal.SIGTERM)
    stderr = launcher.communicate(timeout=WAIT)[1]
    term_step = stopped_at(stderr, "SIGTERM")
    assert newest_step(out) == term_step, stderr[-3000:]
    summary = stderr[stderr.rindex("Failures:"):]  # (the earlier killed worker's -9 is logged above it)
    assert set(re.findall(r"exitcode\s*: (-?\d+)", summary)) == {"143"}, stderr[-3000:]
    # 3. SIGINT to the launcher (Ctrl-C): the same, exit 130
    launcher = torchrun(2, out, "--steps", "100000", "--resume")
    wait_for(lambda: newest_step(out) >= term_step + 2, launcher, "a checkpoint after the resume")
    launcher.send_signal(signal.SIGINT)
    int_step = stopped_at(launcher.communicate(timeout=WAIT)[1], "SIGINT")
    assert newest_step(out) == int_step
    assert load_checkpoint(out)[1]["world_size"] == 2
    total = int_step + 2

    # the uninterrupted run: one process (bit-exact resume), copied at step 3 for the 1 → 2 case
    reference = tmp_path / "reference"
    Trainer(engine_config(reference, steps=3, checkpoint_every=1, log_every=1)).run()
    shutil.copytree(reference, tmp_path / "one_to_two")
    want = uninterrupted(reference, total)

    # 4. 2 → 1: the DDP run continues on one process (engine single); 5. 1 → 2: a one-process run on two
    one = subprocess.run([sys.executable, "-m", "dsm_fast", "train", "--out", str(out), "--resume", "--engine",
                          "single", "--steps", str(total)], check=False, capture_output=True, text=True,
                         env=ENV, timeout=WAIT)
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = torchrun(2, tmp_path / "one_to_two", "--steps", str(total), "--resume")
    assert launcher.wait(timeout=WAIT) == 0, launcher.communicate()[1][-3000:]
    initial = initial_weights(tmp_path / "initial")
    for run in (out, tmp_path / "one_to_two"):
        assert_follows(run, reference, want, initial, total)


def uninterrupted(reference: Path, steps: int) -> dict:
    """The weights of a one-process run to ``steps`` (continuing ``reference`` if it holds a checkpoint)."""
    trainer = Trainer(engine_config(reference, steps=steps, checkpoint_every=1, log_every=1),
                      resume=bool(list_checkpoints(reference)))
    trainer.run()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_follows(run: Path, reference: Path, want: dict, initial: dict, total: int) -> None:
    """``run`` ended at step ``total`` with the reference's weights, every step's loss within float rounding."""
    assert newest_step(run) == total
    assert_same_weights(load_checkpoint(run)[0], want, initial)
    losses, reference_losses = logged_losses(run), logged_losses(reference)
    assert losses.keys() == reference_losses.keys() == set(range(1, total + 1))
    for step, loss in losses.items():
        assert abs(loss - reference_losses[step]) <= 1e-5 * abs(reference_losses[step]), (run, step)


@pytest.mark.slow
@pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed not installed")
def test_deepspeed_launcher_stop_signal_and_resume_on_one_process(tmp_path):
    """``deepspeed --hostfile`` (localhost slots=2, no ssh) runs ZeRO-2 on 2 processes; SIGTERM to rank 1 stops
    both after the same step with one checkpoint and exit 143; the run continues on 1 process of engine single
    (the optimizer state from the full tensors in state.pt) and ends at the uninterrupted run's weights and losses."""
    hostfile, out, log = tmp_path / "hosts.txt", tmp_path / "run", tmp_path / "launcher.log"
    hostfile.write_text("localhost slots=2\n")
    env = {**ENV, "DS_ACCELERATOR": "cpu"}
    with open(log, "w") as output:
        launcher = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                                     "--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                                     "--module", "dsm_fast", "train", *FLAGS, "--engine", "deepspeed", "--zero-stage",
                                     "2", "--steps", "100000", "--out", str(out)],
                                    stdout=output, stderr=subprocess.STDOUT, text=True, env=env,
                                    start_new_session=True)
        wait_for(lambda: newest_step(out) >= 2 and rank_pid(launcher, 1), launcher, "the checkpoint of step 2", log)
        os.kill(rank_pid(launcher, 1), signal.SIGTERM)
        code = launcher.wait(timeout=WAIT)
    text = log.read_text()
    term_step = stopped_at(text, "SIGTERM")
    assert newest_step(out) == term_step, text[-3000:]
    assert code == 143 and "exits with return code = 143" in text, text[-3000:]  # the launcher passes it on
    total = term_step + 2  # continued by engine single: the optimizer state from state.pt's full tensors
    one = subprocess.run([sys.executable, "-m", "dsm_fast", "train", "--out", str(out), "--resume", "--engine",
                          "single", "--steps", str(total)], check=False, capture_output=True, text=True,
                         timeout=WAIT, env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    reference = tmp_path / "reference"
    assert_follows(out, reference, uninterrupted(reference, total), initial_weights(tmp_path / "initial"), total)



def test_two_nodes_of_one_process_each_rendezvous_on_127_0_0_1(tmp_path):
    """The multi-node recipe of the README on one machine: torchrun --nnodes 2 --node-rank 0|1, one process each."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "run"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), "-m",
                               "dsm_fast", "train", *FLAGS, "--engine", "ddp", "--steps", "2", "--out", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
             for rank in (1, 0)]
    for node in nodes:
        assert node.wait(timeout=WAIT) == 0, node.communicate()[1][-3000:]
    assert newest_step(out) == 2 and load_checkpoint(out)[1]["world_size"] == 2
