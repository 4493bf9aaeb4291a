"""The EDM2-style attention UNet energy (dsm_fast/model/edm2.py): preset sizes, and its explicit adjoint
(dsm_fast/model/edm2_adjoint.py) against eager double backward in float64 on every route the CPU runs."""
import math
from unittest import mock

import pytest
import torch

from dsm_fast.model import GaussianStartEnergy, UNetEnergy, adjoint, build_model, parameter_count
from dsm_fast.routes import ReferenceRoute, make_route, noisy
from dsm_fast.tools.testing import (
    TOLERANCES,
    assert_rel_close,
    assert_scores_equal_autograd,
    draw_batch,
    parameter_gradients,
    perturbed,
)

TOL = 1e-10  # float64, relative

# Parameter counts (the meta device: no memory); EDM2's own XS / S at 64×64 with its 1,000-class embedding and 4
# latent channels count 124.7M / 280.2M, i.e. these plus 512·1000 / 768·1000 embedding weights and a few input ones.
COUNTS = {("edm2-tiny", 1): 485_373, ("edm2-tiny", 3): 485_661, ("edm2-xs", 3): 124_198_821,
          ("edm2-s", 1): 279_434_341, ("edm2-s", 3): 279_441_253}


@pytest.fixture
def one_thread():
    """One intra-op thread: this net's many small operators gain nothing from two, and on a loaded machine the
    second thread's spin-waits cost ~15× the CPU time (measured: 7 s vs 107 s for the test below)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("preset, channels", list(COUNTS))
def test_preset_parameter_counts(preset, channels):
    with torch.device("meta"):
        model = build_model(preset, channels)
    assert parameter_count(model) == COUNTS[preset, channels]


def test_output_is_zero_at_initialization_and_attention_is_placed():
    model = UNetEnergy(1, "edm2-tiny").double()
    x, t, _ = draw_batch(2, 1)
    assert torch.equal(model(x, t), torch.zeros(2, dtype=torch.float64))
    heads = [block.heads for block in model.unet.encoder]
    # levels 2 and 3 (16² and 8² at 64×64) after their 'down' block, 8 channels per head
    assert heads == [0] * 3 + [0] * 4 + [0] + [3] * 3 + [0] + [4] * 3
    assert model.unet.decoder[0].heads == 4 and model.unet.decoder[1].heads == 0


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("channels, energy, kernels", [(1, "paper", "torch"), (3, "paper", "torch"),
                                                       (3, "gaussian", "torch"), (3, "paper", "triton")])
def test_energy_and_scores_equal_autograd(channels, energy, kernels, seed):
    """'triton': the blocks' elementwise chains by kernels/mp_block.py's kernels, interpreted."""
    model = perturbed(build_model("edm2-tiny", channels, energy=energy).double(), 0.3)
    batch = 2 if kernels == "triton" else 4  # the interpreted kernels cost CPU per image
    assert_scores_equal_autograd(model, *draw_batch(batch, channels), TOL, seed, kernels)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("route, kernels, objective, energy, checkpoint, batch", [
    ("fused", "torch", "dual", "paper", "none", 3), ("fused", "torch", "single", "paper", "none", 3),
    ("fused", "torch", "dual", "gaussian", "none", 3), ("fused", "torch", "dual", "paper", "block", 3),
    ("functional", "torch", "dual", "paper", "none", 3), ("fused", "triton", "dual", "paper", "none", 2),
    ("fused", "triton", "single", "gaussian", "block", 2)])  # batch 2: the interpreted kernels cost CPU per image
def test_routes_parameter_gradients_equal_reference(route, kernels, objective, energy, checkpoint, batch, seed):
    """Every route and kernel choice the CPU runs against the eager double backward, the output and embedding
    gains (zero at initialization, where f ≡ 0) perturbed like every weight. 'triton': the blocks' elementwise
    chains and weight normalizations (kernels/mp_block.py), cosine attention (its forward, adjoint and the
    adjoint's backward) and the loss terms by the interpreted Triton kernels; 'block': activation checkpointing of
    the fused graph (recomputed with the same kernels)."""
    model = perturbed(build_model("edm2-tiny", 3, energy=energy).double(), 0.3)
    x, t, eps = draw_batch(batch, 3)
    expected = parameter_gradients(model, ReferenceRoute(model, objective), x, t, eps)
    model.unet.checkpoint = checkpoint
    actual = parameter_gradients(model, make_route(route, model, objective, kernels=kernels), x, t, eps)
    assert_rel_close(actual, expected, TOL, f"{route} ({kernels}, checkpoint {checkpoint}) gradients", seed)
    assert all(e.abs().max() > 0 for e in expected)  # every parameter, every gain included, carries gradient


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_fused_route_in_float32_and_bf16_autocast(one_thread, kernels, seed):
    """The trainer's precisions against the float64 reference: float32 weights within 1e-4 (measured 1.4e-8 to
    3.8e-7 over seeds 0–11 with the torch kernels, 3.0e-8 to 1.7e-7 over seeds 0–4 with the Triton ones); bf16
    autocast (on the CPU here) within 1e-2 (torch kernels: measured 1.1e-3 to 3.2e-3, the reference route's own
    double backward in the same autocast 4e-4 to 3.0e-3). The Triton kernels under bf16 autocast measured 4.7e-3 to
    9.3e-3 (seeds 0–4), too near the bound to assert: not checked here."""
    model = perturbed(UNetEnergy(3, "edm2-tiny").double(), 0.3)
    x, t, eps = draw_batch(2 if kernels == "triton" else 3, 3)
    expected = parameter_gradients(model, ReferenceRoute(model), x, t, eps)
    low = UNetEnergy(3, "edm2-tiny")
    low.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    inputs = [v.float() for v in (x, t, eps)]
    assert_rel_close(parameter_gradients(low, make_route("fused", low, kernels=kernels), *inputs), expected,
                     TOLERANCES[torch.float32], f"float32 fused ({kernels}) gradients", seed)
    if kernels == "torch":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = parameter_gradients(low, make_route("fused", low, kernels=kernels), *inputs)
        assert_rel_close(fused, expected, TOLERANCES[torch.bfloat16], f"bf16 fused ({kernels}) gradients", seed)


def test_fused_step_traces_without_graph_breaks(one_thread):
    """torch.compile sees the whole fused terms function (network, explicit adjoint, loss) as one graph."""
    route = make_route("fused", UNetEnergy(3, "edm2-tiny"), kernels="torch")
    x, t, eps = draw_batch(2, 3, dtype=torch.float32)
    explained = torch._dynamo.explain(route)(x, t, eps)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_auto_route_is_fused_and_cuda_kernels_refused():
    model = UNetEnergy(1, "edm2-tiny")
    assert make_route("auto", model).name == "fused"
    x, t, eps = draw_batch(2, 1)
    with pytest.raises(ValueError, match="no EDM2 ops"):  # the CUDA extension holds NormAct only
        adjoint.energy_and_scores(model, noisy(x, t, eps).float(), t.float(), kernels="cuda")
    with pytest.raises(ValueError, match="not a multiple of 8"):
        model(torch.rand(1, 1, 12, 12), torch.ones(1))


def test_gaussian_start_is_the_gaussian_energy():
    model = GaussianStartEnergy(1, "edm2-tiny").double()
    x, t, _ = draw_batch(2, 1)
    assert torch.equal(model.inner(x, t), torch.zeros(2, dtype=torch.float64))


def test_demo_data_trains_with_edm2_tiny(tmp_path, one_thread):
    """The demo preset with --model edm2-tiny on 16×16 patches: the held-out NLL falls below its step-0 value (the
    Gaussian start's) within 30 steps of batch 8 (measured 7.98 → 7.71 bits/dim)."""
    from dsm_fast.cli.train import held_out_nll
    from dsm_fast.config import resolve_config
    from dsm_fast.train import Trainer

    cfg = resolve_config(overrides={"model": "edm2-tiny", "steps": 30, "batch_size": 8, "image_size": 16,
                                    "eval_images": 32, "progress": False, "plots": False, "log_every": 10,
                                    "checkpoint_every": 30, "out": str(tmp_path / "run"), "device": "cpu"},
                         preset="demo")
    trainer = Trainer(cfg)
    assert trainer.cfg.route == "fused"
    before = held_out_nll(trainer, cfg)["nll_bits_per_dim"]
    trainer.run()
    after = held_out_nll(trainer, cfg)["nll_bits_per_dim"]
    assert math.isfinite(before) and after < before - 0.05, (before, after)


def test_checkpointing_saves_less_for_backward():
    """The cost report's bytes saved for backward (meta device, counted the same way for both): per-block
    checkpointing of the fused graph keeps the blocks' inputs (and ḡ at them) only."""
    from dsm_fast.tools.cost import saved_bytes_by_hooks, step_closure

    saved = {c: saved_bytes_by_hooks(step_closure("fused", "edm2-tiny", 2, 16, 3, "torch", torch.float32, c)[0])[1]
             for c in ("none", "block")}
    assert 0 < saved["block"] < 0.2 * saved["none"], saved


def test_bf16_estimate_saves_between_half_and_all_of_fp32():
    """bf16 autocast (traced on fake CPU tensors, docs/method.md §5.1): the convolution and matmul outputs saved for
    backward are bf16, what runs in fp32 stays fp32, so the bytes saved lie strictly between half and all of the
    fp32 step's; the state (fp32 weights, gradients, Adam's moments) is the fp32 step's. The fp32 trace on fake CPU
    tensors is the meta device's exactly (the two ways of tracing count alike)."""
    from dsm_fast.tools.cost import FakeTensorMode, trace_step

    fp32, bf16 = (trace_step("fused", "edm2-tiny", 2, 16, precision=p) for p in ("fp32", "bf16"))
    assert 0.5 * fp32["saved_bytes"] < bf16["saved_bytes"] < fp32["saved_bytes"], (fp32, bf16)
    assert bf16["peak_bytes"] - bf16["saved_bytes"] == fp32["peak_bytes"] - fp32["saved_bytes"]
    assert {op.dtype for op in bf16["ops"] if op.name == "aten.convolution"} == {"bf16"}
    with mock.patch("dsm_fast.tools.cost.tracing", lambda precision: (torch.device("cpu"), FakeTensorMode())):
        fake = trace_step("fused", "edm2-tiny", 2, 16)
    assert (fake["saved_bytes"], fake["kernels"]) == (fp32["saved_bytes"], fp32["kernels"])


def test_checkpointing_and_kernels_refused_where_they_do_not_apply():
    from dsm_fast.config import ConfigError, resolve_config

    assert resolve_config(overrides={"model": "edm2-tiny", "checkpoint_activations": "block"})
    for overrides in ({"model": "tiny"}, {"model": "edm2-tiny", "route": "reference"}):
        with pytest.raises(ConfigError, match="needs an EDM2 preset"):
            resolve_config(overrides={**overrides, "checkpoint_activations": "block"})
    with pytest.raises(ConfigError, match="kernels cuda has no EDM2 ops"):
        resolve_config(overrides={"model": "edm2-tiny", "kernels": "cuda"})
