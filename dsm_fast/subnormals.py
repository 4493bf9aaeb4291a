"""Float32 subnormals on the CPU, flushed to zero (FTZ/DAZ) on every intra-op thread while a run trains or benches.

Where they arise. The paper's Normalization keeps the mean channel variance V of its input (s_c = sqrt(V / (v_c +
eps) + eps) ≈ 1 where v_c ≈ V ≫ eps) and each bias-free convolution (PyTorch's default initialization) and GELU
shrinks it, by a further ~eps per layer once V ≪ eps²: at initialization the paper preset's NormAct inputs reach
v_c ≈ 1e-37 in the middle block and the decoder, below float32's smallest normal 1.2e-38. The squares behind v_c
in the forward and, above all, the backward's convolutions, products and sums then make millions of subnormals, each
an x86 microcode assist: a fused step 4–7× slower on the CPU (README, Speed); GPUs take subnormals at full speed.

Why flushing changes nothing beyond float32 rounding. A flushed value δ has magnitude < 1.2e-38. In s_c² = V /
(v_c + eps) + eps, v_c enters beside eps = 1e-5 (V / (v_c + eps) moves by a relative < δ / eps ≈ 1e-33) and V / (v_c
+ eps) beside eps (moving by < δ / eps through V, next to s_c² ≥ eps): s_c moves by a relative < 1e-27, float32
rounds at 6e-8. A gradient entry < 1.2e-38, unrepresentable in float32 with or without flushing, moves Adam's update
g / (√v̂ + 1e-8) by < lr · 1.2e-30. tests/test_subnormals.py: a flushed float32 step's gradients equal float64's within float32's
tolerance (measured: 4e-7, as unflushed).

Every thread. ``torch.set_flush_denormal`` sets the calling thread's MXCSR only; ATen's and oneDNN's OpenMP
workers keep their own. So the flag is also set on each thread of libgomp's team (GOMP_parallel through ctypes),
and restored the same way; where torch's OpenMP runtime is not libgomp, on the calling thread only (threads the
OpenMP pool starts later inherit it).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import torch

SMALLEST_NORMAL = torch.finfo(torch.float32).tiny  # 1.18e-38
_TEAM_FUNCTION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # void fn(void *data), what GOMP_parallel runs per thread


def flushing() -> bool:
    """Whether the calling thread flushes float32 subnormals (half the smallest normal comes out as 0)."""
    return float(torch.tensor(SMALLEST_NORMAL, dtype=torch.float32) * 0.5) == 0.0


@functools.cache
def _openmp_parallel():
    """GOMP_parallel(fn, data, num_threads, flags) of the libgomp this process loaded (torch's first), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line}
    except OSError:
        return None
    paths = sorted(paths, key=lambda path: (not path.startswith(os.path.dirname(torch.__file__)), path))
    for path in paths:
        try:
            parallel = ctypes.CDLL(path).GOMP_parallel
        except (OSError, AttributeError):
            continue
        parallel.argtypes, parallel.restype = [_TEAM_FUNCTION, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint], None
        return parallel
    return None


def set_flush_denormal(on: bool) -> bool:
    """``torch.set_flush_denormal(on)`` on the calling thread and on every thread of the intra-op OpenMP team;
    False where the CPU cannot flush (then nothing changed)."""
    if not torch.set_flush_denormal(on):
        return False
    parallel = _openmp_parallel()
    if parallel is not None and torch.get_num_threads() > 1:
        parallel(_TEAM_FUNCTION(lambda data: torch.set_flush_denormal(on)), None, torch.get_num_threads(), 0)
    return True


@contextlib.contextmanager
def flushed_subnormals(device: torch.device, dtype: torch.dtype):
    """Within: float32 subnormals flush to zero on the CPU, every intra-op thread (the previous state is restored
    after); yields whether they do (False on CUDA, for float64, and on a CPU that cannot flush)."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        yield False
        return
    before = flushing()
    flushed = set_flush_denormal(True)
    try:
        yield flushed
    finally:
        if flushed:
            set_flush_denormal(before)
