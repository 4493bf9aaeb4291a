"""Float32 subnormals flushed on the CPU (dsm_fast/subnormals.py): on every intra-op thread, only inside a float32 run,
restored after, and without changing the step beyond float32 rounding."""
import json

import torch
from dsm_fast.kernels.norm_act_ref import normalization_scale

from dsm_fast.config import TrainConfig
from dsm_fast.model import UNetEnergy
from dsm_fast.routes import make_route
from dsm_fast.subnormals import SMALLEST_NORMAL, flushed_subnormals, flushing
from dsm_fast.tools.testing import TOLERANCES, assert_rel_close
from dsm_fast.train import Trainer

CPU = torch.device("cpu")


def test_every_thread_flushes_inside_and_none_after():
    x = torch.full((1 << 20,), 1e-20)  # x·x = 1e-40, subnormal; the product is split over the intra-op threads
    assert not flushing() and bool((x * x != 0).all())
    with flushed_subnormals(CPU, torch.float32) as flushed:
        assert flushed and flushing() and not bool((x * x).any()), f"{torch.get_num_threads()} threads"
    assert not flushing() and bool((x * x != 0).all())
    for device, dtype in ((CPU, torch.float64), (torch.device("cuda"), torch.float32)):
        with flushed_subnormals(device, dtype) as flushed:
            assert not flushed and not flushing()


def test_a_float32_run_flushes_and_a_float64_run_does_not(tmp_path, monkeypatch):
    seen = {}
    for precision in ("fp32", "fp64"):
        cfg = TrainConfig(model="tiny", image_size=16, batch_size=2, steps=2, precision=precision, device="cpu",
                          out=str(tmp_path / precision), progress=False, eval_images=0, plots=False).validate()
        trainer = Trainer(cfg)

        def step(step=trainer.train_step, precision=precision):
            seen.setdefault(precision, flushing())
            return step()

        monkeypatch.setattr(trainer, "train_step", step)
        summary = trainer.run()
        record = json.loads((tmp_path / precision / "config.json").read_text())
        assert summary.get("flush_denormal") == record.get("flush_denormal") == (True if precision == "fp32" else None)
        assert not flushing()
    assert seen == {"fp32": True, "fp64": False}


def test_flushing_changes_the_step_by_less_than_float32_rounding(seed):
    """The paper preset at initialization: variances ≈ 1e-37 deep inside, millions of subnormal gradient entries in
    float32. s_c = sqrt(V/(v_c + eps) + eps) with v_c flushed equals float64's; the parameter gradients of a flushed
    float32 step equal float64's within float32's tolerance."""
    var = torch.tensor([[1e-30], [1e-36], [1e-39], [1e-44]], dtype=torch.float64)[None]  # (1, C, 1): v_c
    with flushed_subnormals(CPU, torch.float32):
        scale = normalization_scale(var.float())
    assert_rel_close(scale, normalization_scale(var), 1e-7, "s_c of flushed variances", seed)
    model = UNetEnergy(3, "paper").double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    t, eps = torch.tensor([1e-3, 10.0], dtype=torch.float64), torch.randn(x.shape, dtype=torch.float64)
    gradients = {}
    for name, dtype, flush in (("float64", torch.float64, False), ("float32", torch.float32, False),
                               ("flushed", torch.float32, True)):
        model.zero_grad(set_to_none=True)
        model.to(dtype)
        with flushed_subnormals(CPU, dtype if flush else torch.float64):
            make_route("fused", model, kernels="torch")(x.to(dtype), t.to(dtype), eps.to(dtype))["loss"].mean().backward()
        gradients[name] = [p.grad.double() for p in model.parameters()]
        model.double()
    subnormal = sum(int(((g != 0) & (g.abs() < SMALLEST_NORMAL)).sum()) for g in gradients["float32"])
    assert subnormal > 100_000, f"only {subnormal} subnormal gradient entries: the test no longer exercises flushing"
    assert_rel_close(gradients["flushed"], gradients["float64"], TOLERANCES[torch.float32], "flushed float32", seed)
