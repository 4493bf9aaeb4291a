"""NVIDIA DALI loader of a prepared ImageNet64 split (the only module that imports ``nvidia.dali``).

Optional: ``pip install nvidia-dali-cuda130`` (the ``dali`` extra). The host reads uint8 rows from the
memory-mapped array (sorted gather, :class:`~dsm_fast.data.memmap.SortedGather`) and hands them to an
external source; the pipeline moves them to the GPU, flips at random, converts to float [0, 1] and, if
asked, draws the noise (t log-uniform, ε ~ N(0, I), so that y = x + √t ε is formed on the GPU): the host
never touches float images. Outputs reach torch through DLPack without a copy; DALI prefetches
``prefetch`` batches ahead. With ``device_id=None`` the same pipeline runs CPU-only.

Semantic differences from the CPU loader (:class:`~dsm_fast.data.memmap.MemmapBatches`):
- Order and flips are the same (per seed, epoch, rank and world size, across epoch boundaries and after a
  resume): the host computes the B flip bits of each batch, the GPU applies them. x is bit-identical in the
  CPU-only mode (tested); on the GPU the division by 255 may differ in the last bit.
- The optional noise (``next_noisy_batch``) comes from DALI's generator, seeded by (seed, rank, position at
  build): reproducible, but not the trainer's per-global-position noise, which keeps a run independent of the
  world size; the trainer therefore draws its own t and ε (on the GPU) and uses ``next_batch``.
- The input is fed from this process (no worker processes), so starting DALI before or after CUDA makes no
  difference here (the docs/method.md §7.3 constraint is about forked workers); the pipeline is built on first use.
"""
from __future__ import annotations

import math
import os
from collections import deque

import numpy as np
import torch

from .images import shard_state
from .memmap import MemmapBatches, SortedGather

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    IMPORT_ERROR: ImportError | None = None
except ImportError as error:  # the optional extra is not installed
    IMPORT_ERROR = error


def is_available() -> bool:
    return IMPORT_ERROR is None


def device_index(device: str) -> int | None:
    """DALI's ``device_id`` for the trainer's device string: None (CPU-only) for the CPU; else the CUDA index
    (``cuda`` alone: the local rank, LOCAL_RANK)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return None
    index = torch.device("cuda" if device == "auto" else device).index
    return index if index is not None else int(os.environ.get("LOCAL_RANK", "0"))


def unavailable_reason(device_id: int | None) -> str | None:
    """Why a DALI pipeline on ``device_id`` cannot run here, or None."""
    if IMPORT_ERROR is not None:
        return f"NVIDIA DALI is not installed ({IMPORT_ERROR}); pip install nvidia-dali-cuda130, or use --loader cpu"
    if device_id is not None and not torch.cuda.is_available():
        return "CUDA is not available for a GPU pipeline (DALI runs CPU-only with --device cpu)"
    return None


def build_pipeline(source, batch_size: int, device_id: int | None, seed: int, flip: bool,
                   noise: tuple[float, float] | None, prefetch: int):
    """``source()`` → (uint8 (B, 3, H, W), int32 (B,) flip bits) → x float [0, 1], and (t (B, 1), ε like x) with
    noise."""

    @pipeline_def(batch_size=batch_size, num_threads=2, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch, exec_dynamic=True)
    def pipeline():
        rows, flips = fn.external_source(source=source, num_outputs=2, batch=True, layout=["CHW", ""],
                                         dtype=[types.UINT8, types.INT32])
        if device_id is not None:
            rows = rows.gpu()  # uint8 over PCIe: a quarter of the float bytes
        if flip:
            rows = fn.flip(rows, horizontal=flips)  # per-sample argument: 1 mirrors the width axis
        x = fn.cast(rows, dtype=types.FLOAT) / 255.0
        if noise is None:
            return x
        log_t = fn.random.uniform(range=[math.log(noise[0]), math.log(noise[1])], shape=[1])  # p(t) ∝ 1/t
        t = dmath.exp(log_t)
        return x, t.gpu() if device_id is not None else t, fn.random.normal(x)

    pipe = pipeline()
    pipe.build()
    return pipe


class DaliBatches:
    """Training batches of a prepared split through DALI; same interface and state as the CPU loader."""

    quantized = True

    def __init__(self, images: np.ndarray, seed: int = 0, rank: int = 0, world: int = 1,
                 device_id: int | None = None, flip: bool = True, noise: tuple[float, float] | None = None,
                 prefetch: int = 2):
        reason = unavailable_reason(device_id)
        if reason is not None:
            raise RuntimeError(reason)
        self.rows = SortedGather(images)
        self.orders = MemmapBatches(images, seed=seed, rank=rank, world=world)  # the CPU loader's orders and flips
        self.seed, self.rank, self.device_id = seed, rank, device_id
        self.flip, self.noise, self.prefetch = flip, noise, prefetch
        self.pipe, self.batch_size = None, 0
        self.load_state_dict({"epoch": 0, "offset": 0})

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.rows.shape[1:])

    def _feed(self) -> tuple[np.ndarray, np.ndarray]:
        """The next uint8 batch and its flip bits, as the CPU loader walks them; remembers the position after it."""
        parts, flips, taken = [], [], 0
        while taken < self.batch_size:
            if self._offset >= len(self._order):
                self._epoch, self._offset = self._epoch + 1, 0
                self._order, self._flips = self.orders.epoch_order(self._epoch), self.orders.epoch_flips(self._epoch)
            end = self._offset + self.batch_size - taken
            parts.append(self._order[self._offset:end])
            flips.append(self._flips[self._offset:end])
            taken += len(parts[-1])
            self._offset += len(parts[-1])
        self._fed.append((self._epoch, self._offset))
        return self.rows[torch.cat(parts)].numpy(), torch.cat(flips).to(torch.int32).numpy()

    def _outputs(self, batch_size: int) -> list[torch.Tensor]:
        if self.pipe is None or batch_size != self.batch_size:
            self._restart(self.state_dict(), batch_size)
        outputs = self.pipe.run()
        self.epoch, self.offset = self._fed.popleft()
        return [torch.from_dlpack(out.as_tensor()) for out in outputs]

    def next_batch(self, batch_size: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._outputs(batch_size)[0].to(device=device, dtype=dtype)

    def next_noisy_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, t (B,), ε) drawn inside the pipeline (needs ``noise=(t_min, t_max)``); y = x + √t ε."""
        if self.noise is None:
            raise RuntimeError("DaliBatches was built without noise=(t_min, t_max)")
        x, t, eps = self._outputs(batch_size)
        return x, t.view(-1), eps

    def _restart(self, state: dict[str, int], batch_size: int) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._epoch, self._offset = self.epoch, self.offset
        self._order, self._flips = self.orders.epoch_order(self.epoch), self.orders.epoch_flips(self.epoch)
        self._fed = deque()
        self.batch_size, self.pipe = batch_size, None
        if batch_size:
            seed = (self.seed * 1_000_003 + self.rank * 7_919 + self.epoch * 104_729 + self.offset) % 2**31
            self.pipe = build_pipeline(self._feed, batch_size, self.device_id, seed, self.flip, self.noise,
                                       self.prefetch)

    def state_dict(self) -> dict[str, int]:
        """The position after the last batch handed out (prefetched batches are drawn again on resume)."""
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._restart(state, self.batch_size)

    def shared_position(self, states: list[dict[str, int]]) -> dict[str, int]:
        return self.orders.shared_position(states)

    def seek(self, shared: dict[str, int]) -> None:
        self.load_state_dict(shard_state(shared, self.rank, self.orders.world))
