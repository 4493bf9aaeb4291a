"""DeepSpeed on the CPU (DS_ACCELERATOR=cpu, gloo): ZeRO 1 and 2 in two processes equal one process with the
same global batch, gradient accumulation included, for the first-order and the reference routes; a killed
run resumes from DeepSpeed's own checkpoint to the same weights; the pitfalls of method.md §7 are shown."""
import dataclasses
import inspect
import json
import os
from pathlib import Path

import pytest
import torch
from test_engines import assert_same_weights, errors, initial_weights, launch, single_run, tiny_config

from dsm_fast.config import ConfigError
from dsm_fast.distributed import World
from dsm_fast.engine import check_engine, deepspeed_available, deepspeed_config

pytestmark = pytest.mark.skipif(not deepspeed_available(),
                                reason="DeepSpeed not installed (DS_BUILD_OPS=0 pip install 'dsm_fast[deepspeed]')")


def test_zero_1_and_2_equal_one_process_and_resume_after_a_kill(tmp_path):
    ds = {"engine": "deepspeed", "grad_accum": 2}
    jobs = [
        {"name": "z1", "changes": {**ds, "zero_stage": 1}},
        {"name": "z2", "changes": {**ds, "zero_stage": 2}},
        {"name": "z2_accum1", "changes": {**ds, "zero_stage": 2, "grad_accum": 1}},
        {"name": "z2_reference", "changes": {**ds, "zero_stage": 2, "route": "reference"}},
        {"name": "killed", "changes": {**ds, "zero_stage": 2}, "die": (1, 3)},
    ]
    codes = launch(2, jobs, tmp_path)
    assert codes[1] == 3, codes
    assert errors(tmp_path, "killed")[0].startswith("DistributedError: rank 0/2 stopped at step 3:")
    assert [p.name for p in (tmp_path / "killed" / "deepspeed").glob("step_*")] == ["step_00000002"]
    launch(2, [{"name": "killed+resumed", "changes": {**ds, "zero_stage": 2}, "resume": True}], tmp_path)

    start = initial_weights(tmp_path / "init")
    want = single_run(tmp_path / "single")
    for name in ("z1", "z2", "z2_accum1", "killed+resumed"):
        assert not errors(tmp_path, name), errors(tmp_path, name)
        assert_same_weights(torch.load(tmp_path / f"{name}.pt"), want, start)
    assert_same_weights(torch.load(tmp_path / "z2_reference.pt"), single_run(tmp_path / "ref", route="reference"),
                        start)


def _pitfalls(folder: str) -> None:
    """One process under a DeepSpeed engine with grad_accum 2; writes what it measured as JSON."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PITFALL_PORT"], RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    import deepspeed

    from dsm_fast.distributed import start
    from dsm_fast.model import build_model

    start("deepspeed", 30.0, "cpu")
    torch.manual_seed(0)
    energy = build_model("tiny", channels=3, dim=16)
    y, t = torch.rand(2, 3, 16, 16), torch.tensor([0.5, 2.0])
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=energy, optimizer=torch.optim.Adam(energy.parameters()), config=config)

    def inner_grad(model):
        y_ = y.clone().requires_grad_(True)
        return torch.autograd.grad(model(y_, t).sum(), y_)[0]

    out = {"inner_grad_ratio": float(inner_grad(engine).norm() / inner_grad(energy).norm()),
           "backward_has_create_graph": "create_graph" in inspect.signature(engine.backward).parameters}
    (Path(folder) / "pitfalls.json").write_text(json.dumps(out))


def test_deepspeed_pitfalls(tmp_path, monkeypatch):
    from test_engines import free_port

    monkeypatch.setenv("PITFALL_PORT", str(free_port()))
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=_pitfalls, args=(str(tmp_path),))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0, proc.exitcode
    found = json.loads((tmp_path / "pitfalls.json").read_text())
    # engine.backward(loss) cannot build a graph of the gradient: the double backward must live in the forward
    assert not found["backward_has_create_graph"]
    # an inner autograd.grad through the engine's own output is divided by grad_accum (2): why dsm_fast wraps
    # the whole route, so the engine's outputs are the loss terms (the equality test above is the proof)
    assert found["inner_grad_ratio"] == pytest.approx(0.5, rel=1e-6)


def test_zero_3_reference_and_bad_configs_are_refused_in_one_line(tmp_path):
    world = World(0, 2, 0)
    with pytest.raises(ConfigError, match="ZeRO-3 is refused"):
        check_engine(tiny_config(tmp_path, engine="deepspeed", zero_stage=3), world)
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="ZeRO-3 is refused"):
        check_engine(tiny_config(tmp_path, engine="deepspeed", deepspeed_config=str(user)), world)
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu = 3 disagrees with dsm_fast's 2"):
        deepspeed_config(tiny_config(tmp_path, engine="deepspeed", deepspeed_config=str(user), grad_accum=2), world)
    with pytest.raises(ConfigError, match="fp64 is not supported"):
        check_engine(tiny_config(tmp_path, engine="deepspeed", precision="fp64"), world)
    with pytest.raises(ConfigError, match="not divisible by world size 2 × grad_accum 8"):
        check_engine(tiny_config(tmp_path, engine="deepspeed", grad_accum=8), world)


def test_generated_config_comes_from_ours(tmp_path):
    cfg = dataclasses.replace(tiny_config(tmp_path, engine="deepspeed", zero_stage=2, grad_accum=2, offload=True,
                                          grad_clip=1.0), batch_size=16)
    config = deepspeed_config(cfg, World(0, 2, 0))
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (16, 4, 2)
    assert config["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert config["gradient_clipping"] == 1.0 and config["torch_autocast"]["enabled"] is False
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": "auto"}))
    merged = deepspeed_config(dataclasses.replace(cfg, deepspeed_config=str(user), offload=False), World(0, 2, 0))
    assert merged["zero_optimization"] == {"stage": 1} and merged["train_batch_size"] == 16
