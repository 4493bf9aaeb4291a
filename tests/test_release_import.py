"""Importing the paper's released checkpoints: checkpoints built here in the release's format (torch.save of step,
args as an argparse.Namespace, state_dict under network. prefixes, the release's own perf classes), read without
running code from them, mapped onto the paper preset, written as a run that eval and the analyses read; a hostile
pickle, another architecture and the release's denoiser models refused in one line."""
import argparse
import json
import os
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch

from dsm_fast.release_import import InertRecord, ReleaseError, import_release, read_release

ARGS = {"dataset": "ImageNet64", "grayscale": False, "model": "EnergyModel", "network": "UNet",
        "reparam_kwargs": "{'conversion':'inner_product'}", "min_noise_level": {"x": 90.0, "unit": "psnr"},
        "max_noise_level": {"x": -30.0, "unit": "psnr"}, "train_batch_size": 128, "lr": 0.0005,
        "num_training_steps": 1000000, "lr_decay_every": 100000}


@pytest.fixture
def release_modules(monkeypatch):
    """The release's classes that its checkpoints pickle, under their module names (main, noise)."""
    main, noise = types.ModuleType("main"), types.ModuleType("noise")

    class PerformanceInfo:
        def __init__(self, loss, noise_levels, log_normalization_constant=None):
            self.loss, self.noise_levels = loss, noise_levels
            self.log_normalization_constant = log_normalization_constant

    class NoiseLevel:
        def __init__(self, variance):
            self._variance = variance

    for cls, module in ((PerformanceInfo, main), (NoiseLevel, noise)):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return types.SimpleNamespace(PerformanceInfo=PerformanceInfo, NoiseLevel=NoiseLevel)


def save_release(path, state_dict, modules, args=None, prefix="network.", step=1000000):
    """torch.save in the release's layout; the perfs hold tensors (the release's noise levels) and floats."""
    levels = modules.NoiseLevel(torch.logspace(-9, 3, 17))
    torch.save({"step": step, "args": argparse.Namespace(**(ARGS if args is None else args)),
                "state_dict": OrderedDict((prefix + k, v) for k, v in state_dict.items()),
                "train_perf": modules.PerformanceInfo(0.4122, levels, 3.5e4),
                "test_perf": modules.PerformanceInfo(0.4219, levels)}, path)
    return path


def small_state(channels=3):
    return OrderedDict([("encoder.0.0.weight", torch.randn(64, channels, 3, 3)), ("encoder.0.1.weight", torch.ones(64))])


def test_the_reader_keeps_the_release_classes_as_inert_records(tmp_path, release_modules):
    path = save_release(tmp_path / "model.pth.tar", small_state(), release_modules, prefix="network.network.")
    for name in ("main", "noise"):  # reading does not need (or import) the release's modules
        del sys.modules[name]
    release = read_release(path)
    assert release.step == 1000000 and list(release.state_dict) == ["encoder.0.0.weight", "encoder.0.1.weight"]
    assert isinstance(release.args, InertRecord) and release.args.pickled_name == "argparse.Namespace"
    assert release.args.get("min_noise_level") == {"x": 90.0, "unit": "psnr"} and release.args.get("lr") == 0.0005
    assert release.train_perf.pickled_name == "main.PerformanceInfo" and release.train_perf.get("loss") == 0.4122
    levels = release.test_perf.get("noise_levels")
    assert levels.pickled_name == "noise.NoiseLevel" and torch.equal(levels.get("_variance"), torch.logspace(-9, 3, 17))
    assert "main" not in sys.modules and "noise" not in sys.modules


class Payload:
    """What a hostile checkpoint hides: unpickling it calls os.system (here: creates a file)."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


@pytest.mark.parametrize("where", ["args", "state_dict", "top"])
def test_a_malicious_pickle_is_refused_without_running_it(where, tmp_path, release_modules):
    sentinel = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(sentinel)))  # the payload is live: unpickled naively, it runs
    assert sentinel.exists()
    sentinel.unlink()
    state = small_state()
    payload = {"step": 1, "args": argparse.Namespace(**ARGS), "state_dict": state}
    if where == "args":
        payload["args"] = argparse.Namespace(**ARGS, f=Payload(sentinel))
    elif where == "state_dict":
        payload["state_dict"] = {**state, "extra": Payload(sentinel)}
    else:
        payload = Payload(sentinel)
    torch.save(payload, tmp_path / "evil.pth.tar")
    with pytest.raises(ReleaseError, match="refused: the pickle asks for posix.system") as info:
        read_release(tmp_path / "evil.pth.tar")
    assert "\n" not in str(info.value) and not sentinel.exists()
    with pytest.raises(ReleaseError, match="refused"):
        import_release(tmp_path / "evil.pth.tar", tmp_path / "run")
    assert not sentinel.exists() and not (tmp_path / "run").exists()


def test_unreadable_and_foreign_files_are_refused_in_one_line(tmp_path, release_modules):
    (tmp_path / "text.pth.tar").write_text("not a checkpoint")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"step": "last", "state_dict": small_state()}, tmp_path / "step.pt")
    denoiser = {**ARGS, "model": "DenoiserModel", "reparam_kwargs": "{'output_scaling':1,'residual':True}"}
    save_release(tmp_path / "denoiser.pth.tar", small_state(), release_modules, args=denoiser)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [(tmp_path / "missing.pth.tar", tmp_path / "r1", "no such file"),
             (tmp_path / "text.pth.tar", tmp_path / "r2", "not a torch.save archive"),
             (tmp_path / "tensor.pt", tmp_path / "r3", "not a release checkpoint"),
             (tmp_path / "step.pt", tmp_path / "r4", "step is 'last'"),
             (tmp_path / "denoiser.pth.tar", tmp_path / "r5", "DenoiserModel"),
             (tmp_path / "denoiser.pth.tar", tmp_path / "full", "not an empty folder")]
    for source, out, message in cases:
        with pytest.raises(ReleaseError, match=message) as info:
            import_release(source, out)
        assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("r", "."))) == []


def test_json_of_the_records_is_plain(tmp_path, release_modules):
    """imported.json keeps the release's args and losses as plain values (no record objects)."""
    from dsm_fast.release_import import perf_summary

    release = read_release(save_release(tmp_path / "m.pth.tar", small_state(), release_modules))
    assert perf_summary(release.train_perf) == {"loss": 0.4122, "log_normalization_constant": 3.5e4}
    assert perf_summary(release.test_perf) == {"loss": 0.4219}
    json.dumps(release.args.fields)
    assert np.isclose(release.args.get("max_noise_level")["x"], -30.0)
