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

from dsm_fast.tools.release_import import InertRecord, ReleaseError, import_release, read_release

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
    edm = {**ARGS, "reparam_kwargs": "{'conversion':'inner_product','edm_like':True}"}  # another function of f
    save_release(tmp_path / "edm.pth.tar", small_state(), release_modules, args=edm)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [(tmp_path / "missing.pth.tar", tmp_path / "r1", "no such file"),
             (tmp_path / "text.pth.tar", tmp_path / "r2", "not a torch.save archive"),
             (tmp_path / "tensor.pt", tmp_path / "r3", "not a release checkpoint"),
             (tmp_path / "step.pt", tmp_path / "r4", "step is 'last'"),
             (tmp_path / "denoiser.pth.tar", tmp_path / "r5", "DenoiserModel"),
             (tmp_path / "edm.pth.tar", tmp_path / "r6", "edm_like"),
             (tmp_path / "denoiser.pth.tar", tmp_path / "full", "not an empty folder")]
    for source, out, message in cases:
        with pytest.raises(ReleaseError, match=message) as info:
            import_release(source, out)
        assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("r", "."))) == []


def test_numpy_values_in_the_records_are_read_as_numpy(tmp_path, release_modules):
    levels = release_modules.NoiseLevel(np.linspace(0, 1, 5, dtype=np.float32))
    torch.save({"step": 2, "args": argparse.Namespace(**ARGS, mean=np.float64(0.45)), "state_dict": small_state(),
                "train_perf": release_modules.PerformanceInfo(np.float64(0.5), levels)}, tmp_path / "np.pth.tar")
    release = read_release(tmp_path / "np.pth.tar")
    assert release.args.get("mean") == 0.45 and isinstance(release.args.get("mean"), np.float64)
    np.testing.assert_array_equal(release.train_perf.get("noise_levels").get("_variance"), np.linspace(0, 1, 5))
    assert release.test_perf is None


def test_json_of_the_records_is_plain(tmp_path, release_modules):
    """imported.json keeps the release's args and losses as plain values (no record objects)."""
    from dsm_fast.tools.release_import import perf_summary

    release = read_release(save_release(tmp_path / "m.pth.tar", small_state(), release_modules))
    assert perf_summary(release.train_perf) == {"loss": 0.4122, "log_normalization_constant": 3.5e4}
    assert perf_summary(release.test_perf) == {"loss": 0.4219}
    json.dumps(release.args.fields)
    assert np.isclose(release.args.get("max_noise_level")["x"], -30.0)


def release_weights(channels, seed):
    """A paper-preset UNet's weights under the release's names, every tensor perturbed (nothing at its init)."""
    from dsm_fast.model import UNetEnergy
    from dsm_fast.tools.release import to_release

    torch.manual_seed(seed)
    ours = {k: v + 0.01 * torch.randn_like(v) for k, v in UNetEnergy(channels, "paper").state_dict().items()}
    return to_release(ours, "paper", channels), ours


@pytest.mark.parametrize("channels, prefix", [(3, "network."), (1, "network.network.")])
def test_import_writes_a_run_that_eval_and_the_analyses_read(channels, prefix, tmp_path, release_modules, seed):
    from dsm_fast.analysis.runs import load_run
    from dsm_fast.cli import main

    released, ours = release_weights(channels, seed)
    assert len(released) == 85 and tuple(released["decoder.0.6.weight"].shape) == (channels, 64, 3, 3)
    assert tuple(released["noise_var_embedding.time_embed.0.weight"].shape) == (256, 64)
    path = save_release(tmp_path / "model.pth.tar", released, release_modules, prefix=prefix)
    out = tmp_path / "runs" / "paper"
    main(["import-release", str(path), "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["channels"] == channels and config["model"] == "paper" and config["batch_size"] == 128
    assert config["t_min"] == pytest.approx(1e-9) and config["t_max"] == pytest.approx(1e3)
    provenance = json.loads((out / "imported.json").read_text())
    assert provenance["step"] == 1000000 and provenance["test_perf"] == {"loss": 0.4219}
    assert provenance["release"].endswith("@c84182f") and len(provenance["sha256"]) == 64
    run = load_run(out, device="cpu")
    assert run.step == 1000000 and run.cfg.channels == channels
    loaded = run.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ours.items())
    colour = np.random.default_rng(seed).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)  # gray runs: by the luma
    np.save(tmp_path / "x.npy", colour)
    main(["eval", str(out), "--data", str(tmp_path / "x.npy"), "--images", "all", "--device", "cpu",
          "--json", str(tmp_path / "e.json")])
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["n"] == 1 and result["dim"] == channels * 4096 and np.isfinite(result["nll_bits_per_dim"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["paper"]  # no temporary folder left
    if channels == 1:  # the analyses load a run as eval does (analysis.runs.load_run, above); one runs end to end
        main(["denoise", str(out), "--data", str(tmp_path / "x.npy"), "--device", "cpu", "--images", "1",
              "--psnrs", "20", "--show", "1", "--out", str(tmp_path / "png"), "--json", str(tmp_path / "d.json")])
        assert np.isfinite(json.loads((tmp_path / "d.json").read_text())["rows"][0]["output_psnr"])


def test_another_architecture_is_refused_naming_the_first_tensor(tmp_path, release_modules, seed):
    from dsm_fast.config import ConfigError, config_from_run
    from dsm_fast.train import Trainer

    released, _ = release_weights(3, seed)
    cases = [({**released, "encoder.1.3.weight": torch.zeros(128, 128, 5, 5)}, r"'encoder\.1\.3\.weight' has shape"),
             ({k: v for k, v in released.items() if k != "middle_block.4.weight"}, r"'middle_block\.4\.weight'.*missing"),
             ({**released, "encoder.0.2.weight": torch.zeros(64)}, r"'encoder\.0\.2\.weight' is not part of"),
             ({**released, "encoder.0.0.weight": torch.zeros(64, 2, 3, 3)}, r"'encoder\.0\.0\.weight' takes 2 input"),
             ({**released, "decoder.1.3.weight": torch.full((128, 128, 3, 3), float("nan"))}, "not finite")]
    for i, (state, message) in enumerate(cases):
        path = save_release(tmp_path / f"bad{i}.pth.tar", state, release_modules)
        with pytest.raises(ReleaseError, match=message) as info:
            import_release(path, tmp_path / f"run{i}")
        assert "\n" not in str(info.value) and not (tmp_path / f"run{i}").exists()
    out = tmp_path / "good"
    import_release(save_release(tmp_path / "good.pth.tar", released, release_modules), out)
    cfg = config_from_run(out, device="cpu", steps=1000001)
    with pytest.raises(ConfigError, match="imported from .* without the optimizer state"):
        Trainer(cfg, resume=True)
