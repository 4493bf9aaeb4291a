"""DeepSpeed on the CPU (DS_ACCELERATOR=cpu, gloo): ZeRO 1, 2 and 3 in two processes equal one process with the same
global batch, gradient accumulation included (ZeRO 1/2 with the first-order and the reference routes, ZeRO-3 with
the explicit adjoint and every weight partitioned); a killed run resumes from DeepSpeed's own checkpoint to the same
weights; a run moved from 2 processes to 1, or from 1 to 2 (ZeRO-2, ZeRO-3, and ZeRO-2 to ZeRO-3), continues the
uninterrupted run's losses and weights, as does a run of engine single continued under ZeRO-3
(dsm_fast/zero_state.py); each pitfall of docs/method.md §7.2 is shown, and the routes it breaks are refused in one
line."""
import dataclasses
import inspect
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from test_engine import (
    K,
    assert_same_weights,
    engine_config,
    errors,
    free_port,
    initial_weights,
    launch,
    logged_losses,
    single_run,
)

from dsm_fast.config import ConfigError
from dsm_fast.distributed import World
from dsm_fast.engine import check_engine, deepspeed_available, deepspeed_config
from dsm_fast.tools.testing import state_bytes
from dsm_fast.train import Trainer

pytestmark = pytest.mark.skipif(not deepspeed_available(),
                                reason="DeepSpeed not installed (DS_BUILD_OPS=0 pip install 'dsm_fast[deepspeed]')")

# ZeRO-3 with every weight partitioned: DeepSpeed keeps weights under 1e5 elements whole by default, which would
# leave the tiny preset unpartitioned and the ZeRO-3 case trivially equal to ZeRO-2.
ZERO3_PARTITIONED = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
EDM2 = {"model": "edm2-tiny", "lr": 1e-2}  # the attention UNet; lr: its normalized weights move well past the bound


def test_zero_1_2_3_equal_one_process_resume_after_a_kill_and_on_another_world_size(tmp_path):
    zero3_json = tmp_path / "zero3.json"
    zero3_json.write_text(json.dumps(ZERO3_PARTITIONED))
    ds = {"engine": "deepspeed", "grad_accum": 2, "log_every": 1}
    z2, z3 = {**ds, "zero_stage": 2}, {**ds, "deepspeed_config": str(zero3_json), "route": "fused"}
    z2_fused = {**z2, "route": "fused"}
    jobs = [
        {"name": "z1", "changes": {**ds, "zero_stage": 1}},
        {"name": "z2", "changes": z2},
        {"name": "z2_accum1", "changes": {**z2, "grad_accum": 1}},
        {"name": "z2_reference", "changes": {**z2, "route": "reference"}},
        {"name": "z3", "changes": z3},
        {"name": "z3_edm2", "changes": {**z3, **EDM2}, "state_bytes": True},
        {"name": "crafted", "changes": z2},
        {"name": "killed", "changes": z2, "die": (1, 3)},
    ]
    # a rank dies in the last job of each launch; the resumed runs go first in the next one
    codes = [launch(2, jobs, tmp_path, timeout=300),  # (DeepSpeed may first compile its comm op: 35–100 s)
             launch(2, [{"name": "killed+resumed", "changes": z2, "resume": True},
                        {"name": "shrink2", "changes": {**z2_fused, "steps": K // 2}},  # resumed on 1 process below
                        {"name": "shrink3", "changes": {**z3, "steps": K // 2}},
                        {"name": "killed3", "changes": z3, "die": (1, 3)}], tmp_path)]
    # another world size: 2 → 1 and 1 → 2 processes under ZeRO-2 and ZeRO-3, 1 → 2 from ZeRO-2 to ZeRO-3, and
    # (below) a one-process run of engine single continued by ZeRO-3 on 2
    launch(1, [{"name": "shrink2+resumed", "changes": z2_fused, "resume": True},
               {"name": "shrink3+resumed", "changes": z3, "resume": True},
               {"name": "grow2", "changes": {**z2_fused, "steps": K // 2}},
               {"name": "grow3", "changes": {**z3, "steps": K // 2}},
               {"name": "restage", "changes": {**z2_fused, "steps": K // 2}}], tmp_path)
    marker = craft_model_states(tmp_path / "crafted")
    Trainer(engine_config(tmp_path / "from_single", route="fused", grad_accum=2, log_every=1, steps=K // 2)).run()
    launch(2, [{"name": "killed3+resumed", "changes": z3, "resume": True},
               {"name": "grow2+resumed", "changes": z2_fused, "resume": True},
               {"name": "grow3+resumed", "changes": z3, "resume": True},
               {"name": "restage+resumed", "changes": z3, "resume": True},
               {"name": "from_single+resumed", "changes": z3, "resume": True},
               {"name": "crafted+resumed", "changes": z2, "resume": True}], tmp_path)
    # a crafted DeepSpeed file whose digest was forged to match is still refused, and its code never ran
    assert not marker.exists()
    refused = errors(tmp_path, "crafted+resumed")
    assert sorted(refused) == [0, 1], refused
    for text in refused.values():
        assert text.startswith("CheckpointError: ") and "refused, it holds objects other than tensors" in text, text
    for name, exit_codes in zip(("killed", "killed3"), codes):
        assert exit_codes[1] == 3, exit_codes
        assert errors(tmp_path, name)[0].startswith("DistributedError: rank 0/2 stopped at step 3:")
        # DeepSpeed's own checkpoints: steps 0 and 2 (before the kill) and 4 (written by the resumed run)
        assert sorted(p.name for p in (tmp_path / name / "deepspeed").glob("step_*")) == [
            "step_00000000", "step_00000002", "step_00000004"]

    start = initial_weights(tmp_path / "init")
    want = single_run(tmp_path / "single")
    for name in ("z1", "z2", "z2_accum1", "killed+resumed"):
        assert not errors(tmp_path, name), errors(tmp_path, name)
        assert_same_weights(torch.load(tmp_path / f"{name}.pt"), want, start)
    assert_same_weights(torch.load(tmp_path / "z2_reference.pt"), single_run(tmp_path / "ref", route="reference"),
                        start)
    want_fused = single_run(tmp_path / "fused", route="fused")
    moved = ("shrink2", "shrink3", "grow2", "grow3", "restage", "from_single")
    for name in ("z3", "killed3+resumed", *(f"{name}+resumed" for name in moved)):
        assert not errors(tmp_path, name), errors(tmp_path, name)
        assert_same_weights(torch.load(tmp_path / f"{name}.pt"), want_fused, start)
    # the resumed runs' losses are the uninterrupted run's, steps before and after the move, to float rounding
    uninterrupted = logged_losses(tmp_path / "z3")
    assert sorted(uninterrupted) == list(range(1, K + 1))
    for name in moved:
        resumed = logged_losses(tmp_path / name)
        assert resumed.keys() == uninterrupted.keys(), name
        for step, loss in resumed.items():
            assert loss == pytest.approx(uninterrupted[step], rel=1e-6), (name, step)
    # the EDM2-style attention UNet, every weight partitioned (its weight normalization is formed in the forward)
    assert not errors(tmp_path, "z3_edm2"), errors(tmp_path, "z3_edm2")
    edm2_start = initial_weights(tmp_path / "edm2_init", **EDM2)
    single = Trainer(engine_config(tmp_path / "edm2", route="fused", **EDM2))
    single.run()
    assert_same_weights(torch.load(tmp_path / "z3_edm2.pt"), single.model.state_dict(), edm2_start)
    # each rank holds half of every copy: weights, gradients and Adam's two moments (one process's 4 copies), plus
    # DeepSpeed's fp32 master partition, a copy apart from the fp32 weights' own: (4 + 1) / 2 / 4 = 5/8
    for rank in (0, 1):
        share = int((tmp_path / f"z3_edm2.rank{rank}.bytes").read_text()) / state_bytes(single.engine)
        assert share == pytest.approx(5 / 8, rel=0.01), (rank, share)


class _RunsCode:
    """Unpickles to a call of exec: what a hostile checkpoint file does to a ``weights_only=False`` loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def craft_model_states(run: Path) -> Path:
    """Replace the newest DeepSpeed model file of ``run`` by one that runs code when unpickled, and forge its
    digest in our manifest (so the refusal below is the unpickler's, not the digest check's)."""
    from dsm_fast.checkpoint import file_digest, list_checkpoints

    newest = list_checkpoints(run)[-1]
    target = run / "deepspeed" / newest.name / "mp_rank_00_model_states.pt"
    marker = run.parent / "code_ran"
    torch.save({"module": _RunsCode(marker)}, target)
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["native"][target.relative_to(run).as_posix()] = file_digest(target)
    (newest / "manifest.json").write_text(json.dumps(manifest))
    return marker


def _pitfalls(folder: str, port: int) -> None:
    """One process under DeepSpeed engines with grad_accum 2; writes what it measured as JSON."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      DS_ACCELERATOR="cpu")
    import deepspeed

    from dsm_fast.distributed import start
    from dsm_fast.engine import RouteModule
    from dsm_fast.model import build_model
    from dsm_fast.routes import make_route

    start("deepspeed", 30.0, "cpu")
    torch.manual_seed(0)
    x, t, eps = torch.rand(2, 3, 16, 16), torch.tensor([0.5, 2.0]), torch.randn(2, 3, 16, 16)
    y = x + t.sqrt().view(-1, 1, 1, 1) * eps
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
              "zero_allow_untested_optimizer": True}

    def engine_over(module, zero: dict):
        return deepspeed.initialize(model=module, optimizer=torch.optim.Adam(module.parameters()),
                                    config={**config, "zero_optimization": zero})[0]

    energy = build_model("tiny", channels=3, dim=16)
    engine = engine_over(energy, {"stage": 1})

    def inner_grad(model):
        y_ = y.clone().requires_grad_(True)
        return torch.autograd.grad(model(y_, t).sum(), y_)[0]

    out = {"inner_grad_ratio": float(inner_grad(engine).norm() / inner_grad(energy).norm()),
           "backward_has_create_graph": "create_graph" in inspect.signature(engine.backward).parameters}
    for route in ("reference", "fused"):  # ZeRO-3, every weight partitioned: one forward, then engine.backward
        energy = build_model("tiny", channels=3, dim=16)
        engine = engine_over(RouteModule(energy, make_route(route, energy)), ZERO3_PARTITIONED["zero_optimization"])
        try:
            engine.backward(engine(x, t, eps)["loss"].mean())
            out[route] = "ok"
        except RuntimeError as error:
            out[route] = str(error).splitlines()[0]
    (Path(folder) / "pitfalls.json").write_text(json.dumps(out))


def test_deepspeed_pitfalls(tmp_path):
    proc = multiprocessing.get_context("spawn").Process(target=_pitfalls, args=(str(tmp_path), free_port()))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0, proc.exitcode
    found = json.loads((tmp_path / "pitfalls.json").read_text())
    # engine.backward(loss) cannot build a graph of the gradient: the double backward must live in the forward
    assert not found["backward_has_create_graph"]
    # an inner autograd.grad through the engine's own output is divided by grad_accum (2): why dsm_fast wraps
    # the whole route, so the engine's outputs are the loss terms (the equality test above is the proof)
    assert found["inner_grad_ratio"] == pytest.approx(0.5, rel=1e-6)
    # ZeRO-3: the reference route's second backward meets weights released after the first; the explicit
    # adjoint's single first-order backward goes through (and equals one process: the ZeRO-3 case above)
    assert found["reference"] != "ok", found
    assert found["fused"] == "ok", found


def test_routes_zero_3_cannot_run_and_bad_configs_are_refused_in_one_line(tmp_path):
    world = World(0, 2, 0)
    for route in ("reference", "functional"):
        with pytest.raises(ConfigError, match=f"route {route} is refused under ZeRO-3.*use --route fused"):
            check_engine(engine_config(tmp_path, engine="deepspeed", zero_stage=3, route=route), world)
    check_engine(engine_config(tmp_path, engine="deepspeed", zero_stage=3, route="fused"), world)
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="route functional is refused under ZeRO-3"):
        check_engine(engine_config(tmp_path, engine="deepspeed", deepspeed_config=str(user)), world)
    with pytest.raises(ConfigError, match="--ema-decay needs the full weights"):
        check_engine(engine_config(tmp_path, engine="deepspeed", deepspeed_config=str(user), route="fused",
                                 ema_decay=0.99), world)
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu = 3 disagrees with dsm_fast's 2"):
        deepspeed_config(engine_config(tmp_path, engine="deepspeed", deepspeed_config=str(user), grad_accum=2), world)
    user.write_text(json.dumps({"gradient_clipping": 1.0}))
    with pytest.raises(ConfigError, match="gradient_clipping = 1.0 disagrees with dsm_fast's 0.0"):
        deepspeed_config(engine_config(tmp_path, engine="deepspeed", deepspeed_config=str(user)), world)
    with pytest.raises(ConfigError, match="fp64 is not supported"):
        check_engine(engine_config(tmp_path, engine="deepspeed", precision="fp64"), world)
    with pytest.raises(ConfigError, match="not divisible by world size 2 × grad_accum 8"):
        check_engine(engine_config(tmp_path, engine="deepspeed", grad_accum=8), world)


def test_generated_config_comes_from_ours(tmp_path):
    cfg = dataclasses.replace(engine_config(tmp_path, engine="deepspeed", zero_stage=2, grad_accum=2, offload=True,
                                          grad_clip=1.0), batch_size=16)
    config = deepspeed_config(cfg, World(0, 2, 0))
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (16, 4, 2)
    assert config["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert config["gradient_clipping"] == 1.0 and config["torch_autocast"]["enabled"] is False
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": "auto"}))
    merged = deepspeed_config(dataclasses.replace(cfg, deepspeed_config=str(user), offload=False, grad_clip=0.0),
                              World(0, 2, 0))
    assert merged["zero_optimization"] == {"stage": 1} and merged["train_batch_size"] == 16
    # DeepSpeed would clip at 1.0 by default: ours (no clipping) is written in
    assert merged["gradient_clipping"] == 0.0 and merged["zero_allow_untested_optimizer"] is True


def test_an_older_deepspeed_checkpoint_on_another_world_size_is_refused_in_one_line(tmp_path):
    """Without the full optimizer state (written before dsm_fast/zero_state.py), another world size is refused
    before DeepSpeed is touched; the line names the world size that can resume it."""
    from dsm_fast.engine import DeepSpeedEngine

    engine = object.__new__(DeepSpeedEngine)  # the refusal needs only the layout: no process group, no DeepSpeed
    engine.world, engine.config = World(0, 1, 0), {"zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError, match="written by 2 DeepSpeed process\\(es\\) with an older dsm_fast.*resume it "
                                          "with 2 processes and the same ZeRO options"):
        engine.load(tmp_path, 4, {}, {"engine_format": True, "world_size": 2})
