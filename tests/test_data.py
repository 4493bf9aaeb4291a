"""Data: demo patches, user files, shuffled batches with exact positions, the analytic mixture."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dsm_fast.data import DataError, GaussianScaleMixture, ImageBatches, load_images
from dsm_fast.data.demo import demo_patches


def test_demo_patches_are_cached_and_splits_disjoint(tmp_path, monkeypatch):
    monkeypatch.setenv("DSM_FAST_CACHE", str(tmp_path))
    train = demo_patches(3, 32, "train")
    test = demo_patches(3, 32, "test")
    assert train.dtype == np.uint8 and train.shape[1:] == (3, 32, 32) and len(train) > 1000 and len(test) > 100
    assert (tmp_path / "demo_train_c3_s32.npy").is_file()
    assert np.array_equal(demo_patches(3, 32, "train"), train)
    assert train.std() > 20  # natural photographs, not a constant fill
    gray = demo_patches(1, 32, "test")
    assert gray.shape[1] == 1 and len(gray) == len(test)


def test_folder_and_npy_loaders_validate(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    images = load_images(folder, channels=3, size=16)
    assert images.shape == (3, 3, 16, 16) and images.dtype == np.uint8
    assert load_images(folder, channels=1, size=16).shape == (3, 1, 16, 16)
    with pytest.raises(DataError, match="expects 32×32"):
        load_images(folder, channels=3, size=32)
    np.save(tmp_path / "ok.npy", images)
    assert np.array_equal(load_images(tmp_path / "ok.npy", 3, 16), images)
    np.save(tmp_path / "float.npy", images.astype(np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_images(tmp_path / "float.npy", 3, 16)
    gray = load_images(tmp_path / "ok.npy", 1, 16)  # a colour array seen through the luma, as folders are read
    assert gray.shape == (3, 1, 16, 16) and np.array_equal(np.asarray(gray), load_images(folder, 1, 16))
    np.save(tmp_path / "gray.npy", np.asarray(gray))
    with pytest.raises(DataError, match=r"shape \(1, 16, 16\)"):
        load_images(tmp_path / "gray.npy", 3, 16)
    with pytest.raises(DataError, match="not found"):
        load_images(tmp_path / "missing.npy", 3, 16)


def test_batches_cover_each_epoch_and_resume_exactly():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    stream = ImageBatches(images, seed=3, flip=False)
    first_epoch = torch.cat([stream.next_batch(5) for _ in range(2)]).flatten(1)[:, 0] * 255
    assert sorted(first_epoch.round().int().tolist()) == list(range(10))
    stream.next_batch(3)
    state = stream.state_dict()
    expected = [stream.next_batch(4) for _ in range(3)]
    again = ImageBatches(images, seed=3, flip=False)
    again.load_state_dict(state)
    for want in expected:
        assert torch.equal(again.next_batch(4), want)


def test_shards_partition_an_epoch_and_flips_are_seeded():
    images = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8)
    shards = [ImageBatches(images, seed=1, rank=r, world=3, flip=False).epoch_order(0) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(12))
    a, b = ImageBatches(images, seed=1), ImageBatches(images, seed=1)
    assert torch.equal(a.next_batch(8), b.next_batch(8))
    flipped = [ImageBatches(images, seed=s).next_batch(12) for s in range(4)]
    assert any(not torch.equal(flipped[0], f) for f in flipped[1:])


def test_mixture_log_prob_is_the_closed_form(seed):
    mixture = GaussianScaleMixture(dim=3, sigmas=(1.0, 4.0))
    y, t = torch.randn(5, 3, dtype=torch.float64), 0.7
    direct = torch.log(sum(0.5 * torch.exp(torch.distributions.Normal(0, math.sqrt(s * s + t)).log_prob(y).sum(1))
                           for s in (1.0, 4.0)))
    torch.testing.assert_close(mixture.log_prob(y, t), direct)
    draws = GaussianScaleMixture(dim=1000).sample(4000, torch.Generator().manual_seed(seed))
    radius2 = draws.square().mean(dim=1)
    near_1, near_16 = (radius2 - 1).abs() < 0.5, (radius2 - 16).abs() < 4
    assert bool((near_1 | near_16).all()) and abs(near_1.float().mean().item() - 0.5) < 0.05


def test_16_bit_transparent_and_palette_images_become_the_right_8_bit_values(tmp_path):
    """16-bit gray is scaled (not clipped at 255), alpha is composited onto black, palettes are expanded; the
    same conversion serves dsm-fast data prepare (imagenet64.read_image)."""
    from dsm_fast.data.imagenet64 import read_image

    ramp = np.linspace(0, 65535, 8 * 8).round().astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "a16.png")
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, np.arange(8, dtype=np.uint8)[None, :] * 36  # red, alpha 0 … 252
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b_rgba.png")
    palette = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) % 4, "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.save(tmp_path / "c_palette.png", transparency=0)
    gray16, red, pal = load_images(tmp_path, channels=3, size=8).astype(np.int64)
    want16 = np.rint(ramp.astype(np.float64) * 255 / 65535)
    assert np.array_equal(gray16[0], want16) and np.array_equal(gray16[1], want16)  # was 99.5% saturated
    assert np.array_equal(red[0], np.rint(200 * rgba[..., 3].astype(np.float64) / 255)) and not red[1:].any()
    assert np.array_equal(pal[:, 0, :4], [[0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 255]])
    Image.fromarray(ramp).resize((64, 64), Image.Resampling.NEAREST).save(tmp_path.parent / "big16.png")
    prepared = read_image(tmp_path.parent / "big16.png").astype(np.int64)
    assert np.array_equal(prepared[:, ::8, ::8], np.broadcast_to(want16, (3, 8, 8)))
    Image.fromarray(np.zeros((8, 8), dtype=np.float32), "F").save(tmp_path / "d_float.tif")
    with pytest.raises(DataError, match="d_float.tif: floating-point pixels are not supported"):
        load_images(tmp_path, channels=3, size=8)
