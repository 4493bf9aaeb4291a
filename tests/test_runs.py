"""Runs that bend without breaking, on one process: one ``train`` per run folder (an OS lock, released when its
holder dies), interrupted saves set aside at the next start, and one line for each operating-system error a
user can cause (an uncreatable --out, a full disk during a checkpoint, a damaged prepared file)."""
import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_train import tiny_config

from dsm_fast.checkpoint import list_checkpoints
from dsm_fast.cli import main
from dsm_fast.train import Trainer

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


@pytest.mark.parametrize("where", ["under_a_file", "read_only", "long_name"])
def test_an_out_that_cannot_be_created_is_one_line(tmp_path, capsys, where):
    (tmp_path / "file").write_text("")
    out = {"under_a_file": tmp_path / "file" / "run", "read_only": "/sys/dsm_fast_run",
           "long_name": tmp_path / ("r" * 256)}[where]
    code, err = refused(["train", *TINY, "--steps", "1", "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot create the run folder" in err, err


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(out, steps=2, checkpoint_every=1))
    from dsm_fast import checkpoint

    real_save = checkpoint.torch.save

    def full_at_step_2(obj, path, *args, **kwargs):
        if "step_00000002" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_at_step_2)
    with pytest.raises(checkpoint.CheckpointError, match=r"could not write the checkpoint of step 2 to .*\(No space "
                                                         r"left on device; it needs about [\d.]+ MiB, free [\d.]+ MiB\)"
                                                         r"; the earlier checkpoints are intact"):
        trainer.run()
    assert [checkpoint.checkpoint_step(p) for p in list_checkpoints(out)] == [0, 1]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    code, err = refused(["eval", str(out), "--images", "2", "--device", "cpu", "--json", "/sys/dsm_fast/nll.json"],
                        capsys)
    assert code == 2 and err.count("\n") == 1 and "--json /sys/dsm_fast/nll.json: cannot write it" in err, err


@pytest.mark.parametrize("line, kind", [("steps: 5.5", "int"), ("steps: true", "int"), ("lr: yes", "float"),
                                        ("progress: 2", "bool"), ("out: 7", "str"), ("gsm_sigmas: [1, true]", "tuple")])
def test_config_file_values_are_typed_like_the_command_line(tmp_path, capsys, line, kind):
    (tmp_path / "run.yaml").write_text(line + "\n")
    code, err = refused(["train", "--config", str(tmp_path / "run.yaml")], capsys)
    key = line.split(":")[0]
    assert code == 2 and err.count("\n") == 1 and f"{key} expects {kind}" in err, err


def test_fewer_training_images_than_the_batch_is_said_before_training(tmp_path, capsys):
    np.save(tmp_path / "two.npy", np.random.default_rng(0).integers(0, 256, (3, 3, 16, 16), dtype=np.uint8))
    assert main(["train", *TINY, "--data", str(tmp_path / "two.npy"), "--steps", "1", "--out", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert "warning: 2 training image(s), fewer than --batch-size 4" in captured.err
    assert captured.out.index("training tiny") >= 0 and captured.err.count("\n") == 1


def test_a_damaged_npy_header_is_named_with_the_command_that_checks_it(tmp_path, capsys):
    from test_imagenet64 import official_batches, write_official

    from dsm_fast.data import DataError
    from dsm_fast.data.imagenet64 import load_split
    from dsm_fast.data.prepare import prepare

    prepare(write_official(tmp_path / "src", official_batches()), tmp_path / "out", progress=False)
    images = tmp_path / "out" / "train_images.npy"
    raw = bytearray(images.read_bytes())
    raw[19] = ord("(")  # inside the header's dict: numpy's parser raises tokenize.TokenError
    images.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train_images.npy: cannot read as .npy \(damaged .*\); check the dataset "
                                        r"with: dsm-fast data verify"):
        load_split(tmp_path / "out", "train")
    code, err = refused(["train", *TINY, "--data", str(images), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and err.count("\n") == 1 and "train_images.npy: cannot read as .npy" in err, err
