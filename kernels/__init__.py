"""Triton kernels of dsm_fast, installed as ``dsm_fast.kernels``.

Each op lives in its own module: its plain-PyTorch ``*_ref``, the Triton kernels, their launchers,
the autograd Functions and the public function. Kernels depend only on torch and triton. NormAct's
reference is the module norm_act_ref.py (re-exported by norm_act.py): the model runs that formula
too, and it must import without Triton. Launchers launch through launch.py's ``launch()``, which
``recording()`` turns into a record of the launch (for compiling each configuration without a GPU).
"""
