"""Loader benchmarks (pytest-benchmark): each loader of a prepared ImageNet64 folder delivers a batch as the
trainer takes it; before it is timed, its batches are checked against the in-RAM ImageBatches.

    pytest benchmarks/test_loader_bench.py --benchmark-only        # timings
    pytest benchmarks --benchmark-disable                          # CI: correctness only, one run each
"""
import pickle

import numpy as np
import pytest
import torch

from dsm_fast.config import TrainConfig
from dsm_fast.data import ImageBatches
from dsm_fast.data import dali as dali_module
from dsm_fast.data.imagenet64 import load_split, prepared_batches
from dsm_fast.data.prepare import prepare

LOADERS = {"cpu": "MemmapBatches", "dali": "DaliBatches"}  # --loader value → class it must resolve to
BATCH = 128


@pytest.fixture(scope="module")
def bench_set(tmp_path_factory):
    """2,200 synthetic images in the official pickle layout, bench_set once."""
    root = tmp_path_factory.mktemp("bench64")
    (root / "src").mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"train_data_batch_{i}", 200) for i in range(1, 11)] + [("val_data", 200)]:
        payload = {"data": rng.integers(0, 256, (n, 3 * 64 * 64), dtype=np.uint8), "labels": [1] * n}
        (root / "src" / name).write_bytes(pickle.dumps(payload))
    prepare(root / "src", root / "out", progress=False)
    return root / "out"


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_loader(benchmark, loader, bench_set):
    if loader == "dali" and not dali_module.is_available():
        pytest.skip("DALI not installed (pip install nvidia-dali-cuda130)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stream = prepared_batches(TrainConfig(data=str(bench_set), loader=loader, device=device, seed=2),
                              load_split(bench_set, "train")[0])
    assert type(stream).__name__ == LOADERS[loader]
    reference = ImageBatches(np.array(load_split(bench_set, "train")[0]), seed=2)
    for _ in range(20):  # crosses an epoch boundary (2,000 images)
        batch = stream.next_batch(BATCH, device)
        want = reference.next_batch(BATCH)
        if device == "cpu":
            assert torch.equal(batch.cpu(), want)
        else:  # GPU division by 255 may differ in the last bit
            torch.testing.assert_close(batch.cpu(), want, rtol=0, atol=1e-6)
    benchmark.extra_info["images_per_round"] = BATCH
    batch = benchmark(stream.next_batch, BATCH, device)
    assert batch.shape == (BATCH, 3, 64, 64) and batch.dtype == torch.float32
