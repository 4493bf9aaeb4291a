"""csrc/: the CUDA C++ NormAct compiles with nvcc (no GPU needed), its loader's fallbacks, and on a GPU with the
extension built, its outputs against the reference."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from dsm_fast.kernels.norm_act import scaled_norm_act_adjoint_ref, scaled_norm_act_ref
from torch.utils.cpp_extension import include_paths

from dsm_fast import cuda_ext
from dsm_fast.tools.testing import TOLERANCES, assert_rel_close

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# The flags torch's CUDAExtension passes (implicit half/bf16 conversions off), for the H100/H200 architecture.
NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
              "-arch=sm_90"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cuda_source_compiles(source, tmp_path):
    command = ["nvcc", "-c", str(CSRC / source), "-o", str(tmp_path / "out.o"), *NVCC_FLAGS,
               *(f"-I{p}" for p in include_paths())]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out.o").stat().st_size > 0


def test_loader_auto_falls_back_quietly_and_explicit_request_fails_loudly(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_import", lambda: (None, "the CUDA extension dsm_fast._cuda is not built (test)"))
    assert not cuda_ext.is_available() and cuda_ext.resolve("auto") is False and cuda_ext.resolve("off") is False
    for call in (lambda: cuda_ext.resolve("on"), cuda_ext.require):
        with pytest.raises(RuntimeError, match="not built"):
            call()
    with pytest.raises(ValueError, match="unknown CUDA extension mode"):
        cuda_ext.resolve("maybe")


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_ext.is_available(), reason="needs a GPU and the built extension dsm_fast._cuda")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cuda_norm_act_equals_reference(dtype, seed):
    h = torch.randn(3, 5, 9, 7, device="cuda", dtype=dtype) * 2 + 1
    k_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    k = 1 + 0.3 * torch.randn(3, 5, device="cuda", dtype=k_dtype)
    grad_out = torch.randn_like(h)
    assert_rel_close(cuda_ext.norm_act_forward(h, k), scaled_norm_act_ref(h, k), TOLERANCES[dtype], "forward", seed)
    assert_rel_close(list(cuda_ext.norm_act_adjoint(h, k, grad_out)),
                     [x.detach() for x in scaled_norm_act_adjoint_ref(h, k, grad_out)], TOLERANCES[dtype], "adjoint",
                     seed)
