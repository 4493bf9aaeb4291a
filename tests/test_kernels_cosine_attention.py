"""kernels/cosine_attention.py against its plain-PyTorch form (kernels/cosine_attention_ref.py): the forward (o and
the log-sum-exp it saves), the adjoint, and the adjoint's backward against autograd through the reference adjoint;
the custom operators' registration; the kernel counts the cost report uses.

Runs under TRITON_INTERPRET=1 on the CPU (tests/conftest.py), so shapes are small but awkward: L not a power of two,
channels below the 16 a tile pads to, and L = 40, streamed as three float64 tiles of 16 tokens (two float32 tiles of
32). Every kernel output is allocated NaN-filled, so an element a kernel fails to write cannot pass.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from dsm_fast.kernels import cosine_attention as ca
from dsm_fast.kernels.launch import recording

from dsm_fast.model.edm2 import pixel_norm
from dsm_fast.tools.testing import TOLERANCES, assert_rel_close

SHAPES = [(2, 8, 16), (3, 12, 12), (2, 16, 40)]  # (N = batch · heads, c, L)
TOL = {torch.float64: 1e-12, torch.float32: TOLERANCES[torch.float32], torch.bfloat16: TOLERANCES[torch.bfloat16]}

pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # see conftest.py


def draw_attention_inputs(shape, device="cpu"):
    """(x, ō, Z) in float64: x = (q̂, k̂, v̂) pixel-normed per token as the model feeds it (N, c, 3, L), an incoming
    ō (N, c, L) and a cotangent Z of x̄ (N, c, 3, L)."""
    n, c, length = shape
    x = pixel_norm(torch.randn(n, c, 3, length, dtype=torch.float64, device=device) * 2, dim=1)[0]
    return x, torch.randn(n, c, length, dtype=torch.float64, device=device), torch.randn_like(x)


def reference(x, g, z):
    """(o, λ, x̄, dx, dō) by the PyTorch form in float64, the second order by autograd through its adjoint."""
    x, g = x.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    o, p = ca.cosine_attention_ref(x)
    q, k, _ = x.unbind(2)
    lse = torch.logsumexp(q.transpose(-1, -2) @ k / math.sqrt(x.shape[1]), dim=-1)
    x_bar = ca.cosine_attention_adjoint_ref(x, p, g)
    return (o, lse, x_bar, *torch.autograd.grad(x_bar, (x, g), z.double()))


def kernels(x, g, z):
    """The same by the custom operators: (o, λ, x̄, dx, dō), and x̄ by autograd through the forward op."""
    x, g = x.detach().requires_grad_(), g.detach().requires_grad_()
    o, saved = ca.cosine_attention(x)
    x_bar = ca.cosine_attention_adjoint(x, saved, g)
    through_forward = torch.autograd.grad(o, x, g, retain_graph=True)[0]
    return (o, saved[1], x_bar, *torch.autograd.grad(x_bar, (x, g), z)), through_forward


def test_reference_adjoint_is_the_vjp_of_the_reference(seed):
    x, g, _ = draw_attention_inputs((2, 8, 12))
    x.requires_grad_()
    o, p = ca.cosine_attention_ref(x)
    assert_rel_close(ca.cosine_attention_adjoint_ref(x, p, g), torch.autograd.grad(o, x, g)[0], 1e-12,
                     "explicit adjoint vs autograd", seed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_adjoint_and_second_order(shape, dtype, seed):
    inputs = [v.to(dtype) for v in draw_attention_inputs(shape)]
    expected = reference(*inputs)
    actual, through_forward = kernels(*inputs)
    for name, a, e in zip(("o", "log-sum-exp", "adjoint x̄", "second order dx", "second order dō"), actual, expected):
        assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_rel_close(a, e, TOL[dtype], f"{name} {dtype} {shape}", seed)
    assert_rel_close(through_forward, expected[2], TOL[dtype], "the forward op's backward", seed)


def test_bfloat16_storage(seed):
    """bfloat16 x, ō, Z (TF32 dots on float32 tiles) against the float64 form of the same rounded inputs."""
    x, g, z = (v.bfloat16() for v in draw_attention_inputs((2, 16, 24)))
    actual, _ = kernels(x, g, z)
    for name, a, e in zip(("o", "log-sum-exp", "x̄", "dx", "dō"), actual, reference(x, g, z)):
        assert_rel_close(a, e, TOL[torch.bfloat16], f"{name} bf16", seed)


def test_opcheck_and_third_order_refusal(seed):
    x, g, z = draw_attention_inputs((2, 8, 12))
    o, lse = ca.attention_op(x)
    for op, args in [(torch.ops.dsm_fast.cosine_attention.default, (x.clone().requires_grad_(),)),
                     (torch.ops.dsm_fast.cosine_attention_adjoint.default,
                      (x.clone().requires_grad_(), o, lse, g.clone().requires_grad_())),
                     # no gradient required: its own backward raises by design (below)
                     (torch.ops.dsm_fast.cosine_attention_adjoint_backward.default, (x, o, lse, g, z))]:
        torch.library.opcheck(op, args)
    x.requires_grad_()
    dx, _ = ca.attention_adjoint_backward_op(x, o, lse, g.requires_grad_(), z)
    with pytest.raises(RuntimeError, match="no third derivative"):
        dx.sum().backward()


def test_launch_counts_match_the_cost_table():
    """LAUNCHES (what dsm-fast profile --cost counts per call) against the launchers' recorded launches."""
    x = torch.empty(6, 64, 3, 256, device="meta")
    o, lse = torch.empty(6, 64, 256, device="meta"), torch.empty(6, 256, device="meta")
    calls = {"dsm_fast.cosine_attention": lambda: ca.attention_forward_launch(x),
             "dsm_fast.cosine_attention_adjoint": lambda: ca.attention_adjoint_launch(x, o, lse, o),
             "dsm_fast.cosine_attention_adjoint_backward": lambda: ca.attention_adjoint_backward_launch(x, o, lse, o, x)}
    for name, call in calls.items():
        with recording() as launches:
            call()
        assert len(launches) == ca.LAUNCHES[name][0], name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_on_the_gpu_at_edm2_sizes(dtype, seed):
    """EDM2-S's attention at 64×64 images (c = 64; L = 256 at 16², 64 at 8²), compiled kernels on the GPU."""
    for length in (256, 64):
        inputs = [v.to(dtype) for v in draw_attention_inputs((6, 64, length), "cuda")]
        actual, _ = kernels(*inputs)
        for name, a, e in zip(("o", "log-sum-exp", "x̄", "dx", "dō"), actual, reference(*inputs)):
            assert_rel_close(a, e, TOL[dtype], f"{name} {dtype} L={length}", seed)
