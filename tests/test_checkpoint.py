"""Checkpoint files checked at load: every corruption the issue lists is named in one line; ``--resume`` falls
back to the previous good checkpoint with a warning, ``eval`` refuses; interrupted saves are swept and a resume
after a kill keeps each stats row once."""
import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import cli_error
from test_train import tiny_config

from dsm_fast.checkpoint import CheckpointError, evaluated_weights, list_checkpoints, load_checkpoint
from dsm_fast.cli import main
from dsm_fast.config import ConfigError
from dsm_fast.train import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with checkpoints at steps 0, 1 and 2 (made once)."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    Trainer(tiny_config(out, steps=2, checkpoint_every=1, log_every=1)).run()
    return out


def rewrite_state(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x5a" * 64
    path.write_bytes(bytes(data))


def garbled_rng(state):
    state["torch_rng"] = torch.zeros_like(state["torch_rng"])


def adam_garbage(state):
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"].fill_(123.0)  # finite, silently wrong


CORRUPTIONS = {
    "truncated weights": ("model.safetensors", truncate),
    "garbled weights": ("model.safetensors", garble),
    "empty state": ("state.pt", lambda p: p.write_bytes(b"")),
    "garbled state": ("state.pt", garble),
    "garbled RNG record": ("state.pt", lambda p: rewrite_state(p, garbled_rng)),
    "finite garbage in Adam's state": ("state.pt", lambda p: rewrite_state(p, adam_garbage)),
    "all-NaN weights": ("model.safetensors",
                        lambda p: save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(p).items()}, p)),
    "missing EMA": ("ema.safetensors", lambda p: p.unlink()),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_named_resume_uses_the_previous_one_and_eval_refuses(case, run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newest = list_checkpoints(copy)[-1]
    name, corrupt = CORRUPTIONS[case]
    corrupt(newest / name)
    with pytest.raises(CheckpointError, match=f"{newest}: .*{name}"):
        load_checkpoint(newest)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(copy), "--images", "4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and str(newest) in err, err
    resumed = Trainer(tiny_config(copy, steps=2, checkpoint_every=1), resume=True)
    assert resumed.step == 1
    warning = capsys.readouterr().err
    assert warning.startswith(f"warning: {newest}: ") and "resuming from an earlier checkpoint" in warning
    assert (copy / "rejected" / newest.name).is_dir() and list_checkpoints(copy)[-1].name == "step_00000001"


def test_non_finite_weights_with_matching_digests_and_bad_config_are_refused(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newest = list_checkpoints(copy)[-1]
    weights = load_file(newest / "model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, newest / "model.safetensors")
    manifest = json.loads((newest / "manifest.json").read_text())
    from dsm_fast.checkpoint import file_digest

    manifest["files"]["model.safetensors"] = file_digest(newest / "model.safetensors")
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="holds non-finite weights"):
        load_checkpoint(newest)
    for analysis in ("eval", "denoise", "sample"):  # was "NLL nan"
        with pytest.raises(SystemExit) as exit_info:
            main([analysis, str(copy), "--device", "cpu"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "non-finite weights" in err, err
    (copy / "config.json").write_text("{ not json")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(copy), "--images", "4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "config.json: unreadable" in err and len(err.strip().splitlines()) == 1


def test_resume_after_a_kill_sweeps_half_written_saves_and_keeps_each_stats_row_once(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # as after kill -9 during the save of step 2: stats rows of steps 1 and 2 written, step 2 half-written
    shutil.rmtree(list_checkpoints(copy)[-1])
    half = copy / "checkpoints" / ".tmp-step_00000002-4242"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    with (copy / "stats.jsonl").open("a") as stats:
        stats.write('{"step": 2, "loss": 1.0')  # a torn last line
    Trainer(tiny_config(copy, steps=2, checkpoint_every=1, log_every=1), resume=True).run()
    steps = [json.loads(line)["step"] for line in (copy / "stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2], steps
    assert not half.exists()


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
    with pytest.raises(SystemExit) as stop:  # and a --json that cannot be written: one line too
        main(["eval", str(out), "--images", "2", "--device", "cpu", "--json", "/sys/dsm_fast/nll.json"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "--json /sys/dsm_fast/nll.json: cannot write it" in err
    assert "--per-image /sys/dsm_fast/log_p.npy: cannot" in cli_error(  # and --per-image
        ["eval", str(out), "--images", "2", "--device", "cpu", "--per-image", "/sys/dsm_fast/log_p.npy"], capsys)


def test_evaluated_weights_take_the_ema_parameters_and_keep_the_buffers():
    weights = {"conv.weight": torch.zeros(2), "data_mean": torch.tensor(0.4)}
    ema = {"conv.weight": torch.ones(2)}
    loaded = evaluated_weights("run", weights, ema, use_ema=True)
    assert torch.equal(loaded["conv.weight"], torch.ones(2)) and loaded["data_mean"] == 0.4
    assert evaluated_weights("run", weights, None, use_ema=False) is weights
    with pytest.raises(ConfigError, match="run has no EMA weights"):
        evaluated_weights("run", weights, None, use_ema=True)
