"""Trainer: bit-exact resume, non-finite steps, atomic checkpoints."""

import pytest
import torch

from dsm_fast.checkpoint import list_checkpoints, load_checkpoint
from dsm_fast.config import ConfigError
from dsm_fast.tools.testing import tiny_config
from dsm_fast.train import Trainer, TrainingStopped


def test_resume_is_bit_exact(tmp_path):
    straight = Trainer(tiny_config(tmp_path / "a"))
    straight.run()
    Trainer(tiny_config(tmp_path / "b", steps=3)).run()
    resumed = Trainer(tiny_config(tmp_path / "b"), resume=True)
    assert resumed.step == 3
    resumed.run()
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    for name, value in straight.ema.params.items():
        assert torch.equal(value, resumed.ema.params[name]), name
    assert straight.data.state_dict() == resumed.data.state_dict()


def test_crash_mid_step_resumes_exactly(tmp_path, monkeypatch):
    straight = Trainer(tiny_config(tmp_path / "a", steps=4))
    straight.run()
    crashing = Trainer(tiny_config(tmp_path / "b", steps=4))
    real_call, calls = crashing.route.__class__.__call__, {"n": 0}

    def crash_on_third(self, x, t, eps):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real_call(self, x, t, eps)

    monkeypatch.setattr(crashing.route.__class__, "__call__", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()
    monkeypatch.undo()
    assert int(load_checkpoint(tmp_path / "b")[1]["step"]) == 2
    resumed = Trainer(tiny_config(tmp_path / "b", steps=4), resume=True)
    resumed.run()
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path / "nan", steps=50, max_bad_steps=3, checkpoint_every=4))
    real_call = trainer.route.__class__.__call__
    poisoned = {"steps": {2, 5, 6, 7}}

    def sometimes_nan(self, x, t, eps):
        terms = real_call(self, x, t, eps)
        if trainer.step in poisoned["steps"]:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(trainer.route.__class__, "__call__", sometimes_nan)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(TrainingStopped, match="3 non-finite losses in a row at step 8: the update to step 5 diverged"
                                              ".*--resume continues from the newest healthy one, step 4"):
        trainer.run()
    assert trainer.skipped.total == 4 and trainer.step == 8
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    weights, state, _ = load_checkpoint(tmp_path / "nan")  # no checkpoint written at the stop: step 4 is the newest
    assert state["step"] == 4 and state["bad_total"] == 1
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_divergence_keeps_the_healthy_checkpoint_and_resume_recovers(tmp_path):
    """The issue's case: --lr 1e6 blows the weights up to |w| ~ 1e6 in one finite step; the losses after it are
    non-finite. Checkpointing every step, the stop names step 0 (before the diverging update) and sets the rest
    aside; two retries with the same lr stop the same way and step 0 survives; a sane lr then trains on."""
    out = tmp_path / "r"
    for attempt in range(3):
        with pytest.raises(TrainingStopped, match="5 non-finite losses in a row at step 6: the update to step 1 "
                                                  "diverged.*--resume continues from .* step 0 "):
            Trainer(tiny_config(out, steps=20, lr=1e6, max_bad_steps=5, checkpoint_every=1, ema_decay=0.0),
                    resume=attempt > 0).run()
        assert [p.name for p in list_checkpoints(out)] == ["step_00000000"]
        assert [p.name for p in (out / "rejected").iterdir()] and not (out / "rejected" / "step_00000000").exists()
    resumed = Trainer(tiny_config(out, steps=3, lr=1e-3, checkpoint_every=1, ema_decay=0.0), resume=True)
    assert resumed.step == 0
    summary = resumed.run()
    assert summary["step"] == 3 and summary["skipped_steps"] == 0
    assert max(float(p.detach().abs().max()) for p in resumed.model.parameters()) < 10
    assert [p.name for p in list_checkpoints(out)] == ["step_00000001", "step_00000002", "step_00000003"]


def test_a_streak_that_ended_between_reads_still_rolls_back_before_it(tmp_path, monkeypatch):
    """Counters read every 4 steps: bad steps from states 3, 4, 5, a good one from 6, the read at 8 sees the
    streak of 3 with none in a row now; the checkpoint of step 4 (inside the streak) must not be named."""
    trainer = Trainer(tiny_config(tmp_path / "r", steps=12, max_bad_steps=3, log_every=4, checkpoint_every=4))
    real_call = trainer.route.__class__.__call__

    def nan_from_3_to_5(self, x, t, eps):
        terms = real_call(self, x, t, eps)
        return {**terms, "loss": terms["loss"] * float("nan")} if 3 <= trainer.step <= 5 else terms

    monkeypatch.setattr(trainer.route.__class__, "__call__", nan_from_3_to_5)
    with pytest.raises(TrainingStopped, match="3 non-finite losses in a row at step 8: the update to step 3 diverged"
                                              ".*continues from the newest healthy one, step 0 "):
        trainer.run()


def test_a_run_of_only_skipped_steps_fails(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path / "r", steps=2, max_bad_steps=5))
    real_call = trainer.route.__class__.__call__

    def always_nan(self, x, t, eps):
        terms = real_call(self, x, t, eps)
        return {**terms, "loss": terms["loss"] * float("nan")}

    monkeypatch.setattr(trainer.route.__class__, "__call__", always_nan)
    with pytest.raises(TrainingStopped, match="all 2 steps of this run were skipped"):
        trainer.run()


def test_checkpoints_are_complete_and_pruned(tmp_path):
    Trainer(tiny_config(tmp_path / "r", steps=10, checkpoint_every=2)).run()
    folders = list_checkpoints(tmp_path / "r")
    assert [f.name for f in folders] == ["step_00000006", "step_00000008", "step_00000010"]
    assert not [p for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert {p.name for p in folders[-1].iterdir()} == {"model.safetensors", "ema.safetensors", "state.pt",
                                                       "manifest.json"}
    assert (tmp_path / "r" / "config.json").is_file() and (tmp_path / "r" / "stats.jsonl").read_text().count("\n") == 5


def test_existing_run_needs_resume_and_bad_sizes_are_refused(tmp_path):
    Trainer(tiny_config(tmp_path / "r", steps=1)).run()
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(tiny_config(tmp_path / "r", steps=1))
    with pytest.raises(ConfigError, match="multiple of 8"):
        Trainer(tiny_config(tmp_path / "s", image_size=20))
