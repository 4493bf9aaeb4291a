"""Batches straight from a memory-mapped uint8 array (a prepared split): the CPU loader, and the row reader the
DALI loader feeds its pipeline from. Each batch reads only its own rows, in ascending file order."""
from __future__ import annotations

import numpy as np
import torch

from .images import ImageBatches


class SortedGather:
    """Row access to a (memory-mapped) uint8 array by index tensors: rows are read in ascending file order (few
    page faults, sequential read-ahead) and returned in the asked order. Only the asked rows are read."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        index = np.asarray(index, dtype=np.int64)
        order = np.argsort(index, kind="stable")
        rows = np.empty((len(index), *self.shape[1:]), dtype=self.array.dtype)
        rows[order] = self.array[index[order]]
        return torch.from_numpy(rows)


class MemmapBatches(ImageBatches):
    """:class:`ImageBatches` over a memory-mapped array: the same order per (seed, epoch, rank, world), the same
    flips and state, but each batch reads only its own rows (sorted), never the whole file."""

    def __init__(self, images: np.ndarray, seed: int = 0, flip: bool = True, rank: int = 0, world: int = 1):
        # not ImageBatches.__init__: it wraps the read-only map in a tensor (a warning) and gathers in random order
        self.images = SortedGather(images)
        self.seed, self.flip, self.rank, self.world = seed, flip, rank, world
        self.load_state_dict({"epoch": 0, "offset": 0})
