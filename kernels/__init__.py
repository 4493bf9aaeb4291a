"""Triton kernels of dsm_fast, installed as ``dsm_fast.kernels``.

Each op lives in its own module: its plain-PyTorch ``*_ref``, the Triton kernels, their launchers,
the autograd Functions and the public function. Kernels depend only on torch and triton.
"""
