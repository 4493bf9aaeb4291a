"""Loaders of a prepared ImageNet64 folder: the memory-mapped CPU loader is ImageBatches (order, flips, shards,
resume), the val split feeds evaluation, the loader choice falls back or fails as documented, and the DALI
pipeline (CPU-only mode where DALI is installed) yields the very same batches."""
import numpy as np
import pytest
import torch
from test_data_imagenet64 import official_batches, write_official

from dsm_fast.config import TrainConfig
from dsm_fast.data import DataError, ImageBatches, make_test_data, make_training_data
from dsm_fast.data import dali as dali_module
from dsm_fast.data.imagenet64 import load_split
from dsm_fast.data.memmap import MemmapBatches, SortedGather
from dsm_fast.data.prepare import prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet64")
    prepare(write_official(root / "src", official_batches(per_batch=4)), root / "out", progress=False)
    return root / "out"


def config(path, **changes):
    return TrainConfig(**{"data": str(path), "device": "cpu", **changes})


def test_sorted_gather_returns_the_asked_order(prepared):
    images, _ = load_split(prepared, "train")
    index = torch.tensor([7, 2, 30, 2, 0])
    assert torch.equal(SortedGather(images)[index], torch.from_numpy(np.asarray(images)[index.numpy()]))


@pytest.mark.parametrize("world", [1, 3])
def test_memmap_batches_are_image_batches(prepared, world):
    images, _ = load_split(prepared, "train")
    for rank in range(world):
        mapped = MemmapBatches(images, seed=5, rank=rank, world=world)
        in_ram = ImageBatches(np.array(images), seed=5, rank=rank, world=world)
        for _ in range(9):  # several epochs: 45 images, 1–3 shards, batches of 7
            assert torch.equal(mapped.next_batch(7), in_ram.next_batch(7))
        assert mapped.state_dict() == in_ram.state_dict()


def test_prepared_folder_trains_on_train_and_evaluates_on_val(prepared):
    stream = make_training_data(config(prepared, loader="cpu"))
    assert isinstance(stream, MemmapBatches) and stream.sample_shape == (3, 64, 64)
    assert isinstance(make_training_data(config(prepared)), MemmapBatches)  # auto on a CPU device: quietly
    stream.next_batch(10)
    state = stream.state_dict()
    uninterrupted = [stream.next_batch(16) for _ in range(4)]
    resumed = make_training_data(config(prepared, loader="cpu"))
    resumed.load_state_dict(state)
    for want in uninterrupted:
        assert torch.equal(resumed.next_batch(16), want)
    x, quantized = make_test_data(config(prepared), 3)
    val, _ = load_split(prepared, "val")
    assert quantized and torch.equal(x, torch.from_numpy(np.array(val[:3])).float() / 255)
    with pytest.raises(DataError, match=r"\(3, 32, 32\)"):
        make_training_data(config(prepared, image_size=32))


def test_explicit_dali_fails_loudly_auto_falls_back(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(dali_module, "IMPORT_ERROR", ImportError("No module named 'nvidia.dali'"))
    with pytest.raises(DataError, match="loader dali: NVIDIA DALI is not installed") as info:
        make_training_data(config(prepared, loader="dali"))
    assert "\n" not in str(info.value)
    assert isinstance(make_training_data(config(prepared, device="auto")), MemmapBatches)
    np.save(tmp_path / "plain.npy", np.zeros((4, 3, 64, 64), np.uint8))
    with pytest.raises(DataError, match="prepared datasets only"):
        make_training_data(config(tmp_path / "plain.npy", loader="dali"))


needs_dali = pytest.mark.skipif(not dali_module.is_available(), reason="DALI not installed (pip install "
                                "nvidia-dali-cuda130); its CPU-only mode runs these tests")


@needs_dali
def test_dali_cpu_only_yields_the_cpu_loaders_batches_and_resumes(prepared):
    stream = make_training_data(config(prepared, loader="dali", seed=3))
    assert isinstance(stream, dali_module.DaliBatches) and stream.device_id is None
    reference = MemmapBatches(load_split(prepared, "train")[0], seed=3)
    for _ in range(4):
        assert torch.equal(stream.next_batch(12), reference.next_batch(12))
    state = stream.state_dict()  # of the batches handed out, not of those DALI prefetched
    assert state == reference.state_dict()
    uninterrupted = [stream.next_batch(12) for _ in range(5)]
    resumed = make_training_data(config(prepared, loader="dali", seed=3))
    resumed.load_state_dict(state)
    for want in uninterrupted:
        assert torch.equal(resumed.next_batch(12), want)


@needs_dali
def test_dali_noise_is_drawn_in_the_pipeline(prepared):
    images, _ = load_split(prepared, "train")
    stream = dali_module.DaliBatches(images, seed=1, noise=(1e-4, 1e2))
    x, t, eps = stream.next_noisy_batch(40)
    assert x.shape == eps.shape == (40, 3, 64, 64) and t.shape == (40,)
    assert bool(((t >= 1e-4) & (t <= 1e2)).all()) and t.log().std() > 1  # spread over decades
    assert abs(float(eps.mean())) < 0.01 and abs(float(eps.std()) - 1) < 0.01
    assert torch.equal(x, MemmapBatches(images, seed=1).next_batch(40))


@pytest.mark.parametrize("loader", ["cpu", pytest.param("dali", marks=needs_dali)])
def test_training_on_a_prepared_set_resumes_bit_exactly(prepared, loader, tmp_path):
    """N steps + resume + N steps on the prepared files = 2N steps: weights and data position."""
    from dsm_fast.train import Trainer

    def run_config(out, steps):
        return config(prepared, loader=loader, model="tiny", batch_size=4, steps=steps, out=str(out),
                      progress=False, log_every=2, checkpoint_every=100, eval_images=0).validate()

    straight = Trainer(run_config(tmp_path / "straight", 4))
    straight.run()
    Trainer(run_config(tmp_path / "split", 2)).run()
    resumed = Trainer(run_config(tmp_path / "split", 4), resume=True)
    assert resumed.step == 2 and resumed.data.state_dict() != straight.data.state_dict()
    resumed.run()
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    assert straight.data.state_dict() == resumed.data.state_dict()


@pytest.mark.parametrize("loader", ["cpu", pytest.param("dali", marks=needs_dali)])
def test_grayscale_run_on_a_prepared_colour_set(prepared, loader, tmp_path):
    """--channels 1 reads the colour files through PIL's luma: training batches, evaluation images, a short run."""
    from PIL import Image

    from dsm_fast.train import Trainer

    train, _ = load_split(prepared, "train")
    stream = make_training_data(config(prepared, channels=1, loader=loader, seed=2))
    assert stream.sample_shape == (1, 64, 64)
    colour = MemmapBatches(train, seed=2).next_batch(9)  # the same rows and flips, in colour
    want = [np.asarray(Image.fromarray(np.round(img.numpy() * 255).astype(np.uint8).transpose(1, 2, 0)).convert("L"))
            for img in colour]
    assert torch.equal(stream.next_batch(9), torch.from_numpy(np.stack(want)[:, None]).float() / 255)
    x, _ = make_test_data(config(prepared, channels=1), 2)
    val, _ = load_split(prepared, "val")
    assert torch.equal(x[0, 0], torch.from_numpy(np.array(Image.fromarray(val[0].transpose(1, 2, 0)).convert("L")))
                       .float() / 255)
    if loader == "cpu":  # the trainer takes either stream the same way
        cfg = config(prepared, channels=1, loader=loader, model="tiny", batch_size=4, steps=2, progress=False,
                     out=str(tmp_path / "gray"), eval_images=0).validate()
        trainer = Trainer(cfg)
        assert trainer.model.unet.channels == 1 and np.isfinite(trainer.run()["loss"])
