"""The whole training step as one CUDA graph: captured once, replayed with static input buffers.

A step function ``fn(*inputs) → dict of tensors`` that does everything on the device (forward, backward, the
optimizer's update, the EMA, the bad-step counters) and never reads a value on the host can be captured: the
first ``warmup`` calls run eagerly on a side stream (they are real steps; they also create the optimizer's state
and let torch.compile finish compiling), the next call allocates static copies of its inputs, captures ``fn`` on
them and replays it; every later call copies its inputs into those buffers (the loader's batch, the noise) and
replays. What the graph reads besides its inputs must be device memory updated in place (a capturable
optimizer's tensor learning rate). Outputs are cloned, so a value kept by the caller survives the next replay.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

Outputs = dict[str, torch.Tensor]


class GraphedStep:
    """``fn`` captured in a CUDA graph after ``warmup`` eager calls; shapes, dtypes and devices must stay fixed."""

    def __init__(self, fn: Callable[..., Outputs], warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.fn, self.warmup, self.calls = fn, warmup, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: list[torch.Tensor] = []
        self.static_outputs: Outputs = {}
        self.stream = torch.cuda.Stream()

    def __call__(self, *inputs: torch.Tensor) -> Outputs:
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        if self.graph is None:
            self._capture(inputs)
        else:
            self._copy_in(inputs)
        self.graph.replay()
        return {k: v.clone() for k, v in self.static_outputs.items()}

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        self.static_inputs = [x.clone() for x in inputs]
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = self.fn(*self.static_inputs)

    def _copy_in(self, inputs: tuple[torch.Tensor, ...]) -> None:
        for static, x in zip(self.static_inputs, inputs):
            if static.shape != x.shape or static.dtype != x.dtype:
                raise RuntimeError(f"a CUDA graph replays fixed shapes: captured {tuple(static.shape)} "
                                   f"{static.dtype}, got {tuple(x.shape)} {x.dtype}")
            static.copy_(x, non_blocking=True)
