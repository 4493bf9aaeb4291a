"""One train per run folder: a second ``train`` into a folder that one is training (a fresh start or a --resume) is
refused in one line naming the holder's process id; the lock dies with its holder (kill -9), and the next start
sets aside what a crash mid-save left (a temporary folder, a step folder without a manifest)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from dsm_fast.checkpoint import list_checkpoints
from dsm_fast.cli import main

TINY = ["--model", "tiny", "--image-size", "16", "--batch-size", "4", "--eval-images", "0", "--device", "cpu",
        "--progress", "false", "--plots", "false", "--log-every", "1000"]


def refused(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``dsm-fast ARGV`` run in this process."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    return stop.value.code, capsys.readouterr().err


def test_a_second_train_into_a_running_folder_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "dsm_fast", "train", *TINY, "--steps", "100000",
                              "--checkpoint-every", "100000", "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(out):  # step 0 written: the first run holds the folder
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        for extra in ([], ["--resume"]):  # a second start, or a resume of the run that is still training
            code, err = refused(["train", *TINY, "--steps", "3", "--out", str(out), *extra], capsys)
            assert code == 2 and err.count("\n") == 1, err
            assert f"is in use by another dsm-fast train (pid {first.pid} on " in err, err
    finally:
        first.send_signal(signal.SIGKILL)  # the kernel drops the lock of a process that dies
        first.wait()
    (out / "checkpoints" / ".tmp-step_00000007-123").mkdir()  # what a crash mid-save leaves
    (out / "checkpoints" / "step_00000007").mkdir()
    assert main(["train", *TINY, "--steps", "2", "--out", str(out), "--resume"]) == 0
    assert "step_00000007 had no manifest" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000000", "step_00000002"]
    assert (out / "rejected" / "step_00000007").is_dir()
