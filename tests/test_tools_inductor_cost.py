"""The compiled-step cost (dsm_fast/tools/inductor_cost.py): Inductor's kernels for an H100, counted on the CPU."""
import pytest

pytest.importorskip("triton")

from dsm_fast.kernels.norm_act import LAUNCHES

from dsm_fast.tools import cost, inductor_cost


def test_compiled_fused_step_is_inductors_kernels_and_the_custom_ops():
    """The tiny preset's fused route (Triton custom ops), compiled: every NormAct call is its module's launches,
    the convolutions' FLOPs are the eager step's, and fusion leaves fewer launches and bytes than eager."""
    costs = inductor_cost.compiled_step_costs("fused", "tiny", batch=2, image_size=16)
    ops = costs["forward"] + costs["backward"]
    eager = cost.trace_step("fused", "tiny", batch=2, image_size=16, kernels="triton")
    eager_norm_acts = [op for op in eager["ops"] if op.name == "dsm_fast.norm_act"]
    norm_acts = [op for op in costs["forward"] if op.name == "dsm_fast.norm_act"]
    assert len(norm_acts) == len(eager_norm_acts) > 0
    assert all(op.kernels == LAUNCHES["dsm_fast.norm_act"][0] for op in norm_acts)
    assert {op.name for op in costs["backward"]} >= {"dsm_fast.norm_act_adjoint_backward", "triton"}
    assert sum(op.flops for op in ops) == pytest.approx(eager["flops"], rel=0.02)
    assert 0 < sum(op.kernels for op in ops) < eager["kernels"]
    assert 0 < sum(op.bytes for op in ops) < eager["bytes"]
    assert all(op.bytes > 0 for op in ops if op.name == "triton")


def test_graph_launch_cost_is_below_the_fitted_compiled_one():
    assert 0 < inductor_cost.GRAPH_LAUNCH_S < 5e-6
    adam = inductor_cost.adam_cost("tiny")
    assert adam.kernels >= 1 and adam.bytes % (inductor_cost.ADAM_PASSES * 4) == 0


def test_fit_recovers_a_known_launch_cost_and_memory_efficiency():
    from dsm_fast.tools.cost import H100

    parts = {"a": (0.004, 20e9, 300), "b": (0.002, 12e9, 900), "c": (0.010, 60e9, 600)}
    measured = {a: inductor_cost.step_ms(p, H100, 6e-6, 0.25) for a, p in parts.items()}
    tau, eta = inductor_cost.fit_compiled(parts, measured, H100)
    assert tau == pytest.approx(6e-6, abs=0.3e-6) and eta == pytest.approx(0.25, abs=0.003)


def test_breakdown_adds_up_to_the_step_largest_first():
    from dsm_fast.tools.cost import H100, OpCost

    ops = [OpCost("triton", 1, 0, 4e8, "fp32"), OpCost("dsm_fast.norm_act", 3, 0, 9e8, "fp32"),
           OpCost("aten.convolution", 1, 3e12, 2e8, "tf32"), OpCost("triton", 1, 0, 1e8, "fp32")]
    rows = inductor_cost.breakdown(ops, H100, 2e-6, 0.2)
    assert rows[0]["op"] == "aten.convolution"
    assert [r["kernels"] for r in rows if r["op"] == "triton"] == [2]
    total = inductor_cost.step_ms(inductor_cost.step_parts(ops, H100), H100, 2e-6, 0.2)
    assert sum(r["ms"] for r in rows) == pytest.approx(total)
    assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)


def test_a_convolution_with_few_output_tiles_runs_at_their_share_of_the_sms():
    """docs/method.md §5.4: the paper preset's first convolution (128 × 64 × 64² outputs) fills the H100; the weight
    gradient of the convolution double backward as a forward convolution (64 × 64 × 3², batch and channels swapped)
    has 5 tiles of 128², so its FLOPs take 132 / 5 times as long."""
    from dsm_fast.tools.cost import H100, OpCost

    assert inductor_cost.conv_sm_fraction([128, 64, 64, 64]) == 1.0
    small = inductor_cost.conv_sm_fraction([64, 64, 3, 3])
    assert small == pytest.approx(5 / 132)
    full, swapped = OpCost("aten.convolution", 1, 4e10, 1e6, "tf32"), OpCost("aten.convolution", 1, 4e10, 1e6, "tf32",
                                                                             small)
    ratio = inductor_cost.step_parts([swapped], H100)[0] / inductor_cost.step_parts([full], H100)[0]
    assert ratio == pytest.approx(132 / 5)
