"""One way to launch a Triton kernel, so that a launcher can also be run without launching.

The launchers of this package call ``launch(kernel, grid, *args, **meta)`` rather than ``kernel[grid](...)``. Inside
:func:`recording`, the call is written down — kernel, grid, arguments, constexprs and launch options — instead of
run. Run on meta tensors of a layer's shapes, a launcher then states exactly the configurations (block sizes, warps,
argument dtypes) it would launch on a GPU, with no GPU: dsm_fast/tools/ptx.py compiles each of them for named GPUs.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_records: list[Launch] | None = None


@dataclass(frozen=True, eq=False)
class Launch:
    """A kernel launch: the @triton.jit function, the grid, the positional arguments and the keyword ones
    (constexprs such as ``BLOCK`` and options such as ``num_warps``)."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    meta: dict


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, or, inside :func:`recording`, its :class:`Launch` recorded instead."""
    if _records is not None:
        _records.append(Launch(kernel, tuple(grid), args, meta))
        return
    kernel[grid](*args, **meta)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within the block, launches are recorded into the list it yields, not run (not thread-safe; not nestable)."""
    global _records
    if _records is not None:
        raise RuntimeError("recording() does not nest")
    _records = []
    try:
        yield _records
    finally:
        _records = None
