"""ImageNet64 preparation: official pickles / npz / zips and image folders, refusal of bad or hostile input,
atomic and idempotent writes, verification against the manifest, the ``dsm-fast data`` command."""
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from dsm_fast.data import DataError
from dsm_fast.data import prepare as prepare_module
from dsm_fast.data.imagenet64 import is_prepared, load_split, verify
from dsm_fast.data.prepare import prepare

ROW = 3 * 64 * 64


def official_batches(seed: int = 0, per_batch: int = 3, val: int = 4) -> dict[str, dict]:
    """Small dicts in the official layout: 'data' uint8 (N, 12288) R, G, B planes; 'labels' 1…1000; 'mean' (train)."""
    rng = np.random.default_rng(seed)
    batches = {}
    for name, n in [(f"train_data_batch_{i}", per_batch + i % 2) for i in range(1, 11)] + [("val_data", val)]:
        data = rng.integers(0, 256, (n, ROW), dtype=np.uint8)
        batch = {"data": data, "labels": rng.integers(1, 1001, n).tolist()}
        if name.startswith("train"):
            batch["mean"] = data.mean(0)
        batches[name] = batch
    return batches


def write_official(folder, batches, layout: str = "pickle"):
    """Write ``batches`` as loose pickles, loose .npz, or the three official zip archives of pickles."""
    folder.mkdir(parents=True, exist_ok=True)
    blobs = {}
    for name, batch in batches.items():
        if layout == "npz":
            np.savez(folder / f"{name}.npz", **{k: np.asarray(v) for k, v in batch.items()})
        else:
            blobs[name] = pickle.dumps(batch)
    if layout == "pickle":
        for name, blob in blobs.items():
            (folder / name).write_bytes(blob)
    elif layout == "zip":
        parts = {"Imagenet64_train_part1.zip": range(1, 6), "Imagenet64_train_part2.zip": range(6, 11)}
        for archive, numbers in parts.items():
            with zipfile.ZipFile(folder / archive, "w") as zf:
                for i in numbers:
                    zf.writestr(f"{archive[:-4]}/train_data_batch_{i}", blobs[f"train_data_batch_{i}"])
        with zipfile.ZipFile(folder / "Imagenet64_val.zip", "w") as zf:
            zf.writestr("val_data", blobs["val_data"])
    return folder


def expected(batches, split):
    names = [f"train_data_batch_{i}" for i in range(1, 11)] if split == "train" else ["val_data"]
    images = np.concatenate([batches[n]["data"] for n in names]).reshape(-1, 3, 64, 64)
    return images, np.concatenate([batches[n]["labels"] for n in names])


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("layout", ["pickle", "zip", "npz"])
def test_prepare_reads_every_official_layout(layout, tmp_path):
    batches = official_batches()
    src = write_official(tmp_path / "src", batches, layout)
    manifest, written = prepare(src, tmp_path / "out", progress=False)
    assert written and is_prepared(tmp_path / "out") and leftovers(tmp_path) == []
    for split in ("train", "val"):
        images, labels = load_split(tmp_path / "out", split)
        want_images, want_labels = expected(batches, split)
        assert isinstance(images, np.memmap) and images.dtype == np.uint8
        np.testing.assert_array_equal(images, want_images)
        np.testing.assert_array_equal(labels, want_labels)
        assert manifest["splits"][split]["count"] == len(want_images)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["splits"]["train"]["images"]["sha256"] == manifest["splits"]["train"]["images"]["sha256"]
    assert len(on_disk["sources"]) == (3 if layout == "zip" else 11)
    verify(tmp_path / "out", progress=False)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def corrupt_cases(tmp_path):
    marker = tmp_path / "pwned"
    good = official_batches()
    bad_shape = {**good["train_data_batch_2"], "data": np.zeros((3, 64 * 64), np.uint8)}
    bad_labels = {**good["train_data_batch_3"], "labels": [0, 5, 1001, 7]}
    floats = {**good["val_data"], "data": good["val_data"]["data"].astype(np.float32)}
    return marker, {
        "truncated": ("train_data_batch_1", pickle.dumps(good["train_data_batch_1"])[:5000], "truncated or corrupt"),
        "wrong shape": ("train_data_batch_2", pickle.dumps(bad_shape), r"shape \(N, 12288\)"),
        "bad labels": ("train_data_batch_3", pickle.dumps(bad_labels), "labels must lie in 1..1000"),
        "float data": ("val_data", pickle.dumps(floats), "uint8"),
        "extra key": ("train_data_batch_4", pickle.dumps({**good["train_data_batch_4"], "x": 1}), "expected keys"),
        "hostile top level": ("train_data_batch_5", pickle.dumps(Evil(marker)), "refused to load global"),
        "hostile inside": ("val_data", pickle.dumps({**good["val_data"], "labels": Evil(marker)}), "refused"),
    }


@pytest.mark.parametrize("case", ["truncated", "wrong shape", "bad labels", "float data", "extra key",
                                  "hostile top level", "hostile inside"])
def test_bad_input_names_the_file_and_writes_nothing(case, tmp_path):
    marker, cases = corrupt_cases(tmp_path)
    name, blob, message = cases[case]
    src = write_official(tmp_path / "src", official_batches())
    (src / name).write_bytes(blob)
    with pytest.raises(DataError, match=message) as info:
        prepare(src, tmp_path / "out", progress=False)
    assert name in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert not marker.exists()  # the hostile pickle was refused, never executed


def test_bad_archives_and_missing_splits(tmp_path):
    src = write_official(tmp_path / "src", official_batches(), "zip")
    (src / "Imagenet64_val.zip").write_bytes((src / "Imagenet64_val.zip").read_bytes()[:100])
    with pytest.raises(DataError, match="Imagenet64_val.zip"):
        prepare(src, tmp_path / "out", progress=False)
    (src / "Imagenet64_val.zip").unlink()
    with pytest.raises(DataError, match="missing val_data"):
        prepare(src, tmp_path / "out", progress=False)
    write_official(tmp_path / "src", {"val_data": official_batches()["val_data"]}, "npz")
    (src / "val_data").write_bytes(b"")
    with pytest.raises(DataError, match="val_data found twice"):
        prepare(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_crash_mid_write_leaves_nothing_that_looks_valid(tmp_path, monkeypatch):
    batches = official_batches()
    src = write_official(tmp_path / "src", batches)
    calls = {"n": 0}
    real_write = prepare_module.ArrayWriter.write

    def crash_on_fourth(self, images, labels):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        real_write(self, images, labels)

    monkeypatch.setattr(prepare_module.ArrayWriter, "write", crash_on_fourth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []

    monkeypatch.setattr(prepare_module.ArrayWriter, "write", real_write)
    prepare(src, tmp_path / "out", progress=False)
    before = (tmp_path / "out" / "manifest.json").read_text()
    (src / "val_data").write_bytes(pickle.dumps(official_batches(seed=1)["val_data"]))  # new input, then a crash
    calls["n"] = 0
    monkeypatch.setattr(prepare_module.ArrayWriter, "write", crash_on_fourth)
    with pytest.raises(RuntimeError):
        prepare(src, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "manifest.json").read_text() == before  # the old dataset is intact
    verify(tmp_path / "out", progress=False)

    killed = tmp_path / ".out2.tmp-99999"  # what a SIGKILL would leave: hidden, manifest-less, then swept
    killed.mkdir()
    (killed / "train_images.npy").write_bytes(b"\0" * 128)
    assert not is_prepared(tmp_path / "out2")
    monkeypatch.setattr(prepare_module.ArrayWriter, "write", real_write)
    prepare(src, tmp_path / "out2", progress=False)
    assert not killed.exists() and is_prepared(tmp_path / "out2")


def test_second_run_does_nothing_and_changed_input_rebuilds(tmp_path):
    src = write_official(tmp_path / "src", official_batches())
    out = tmp_path / "out"
    _, written = prepare(src, out, progress=False)
    stamp = (out / "train_images.npy").stat().st_mtime_ns
    assert written and prepare(src, out, progress=False)[1] is False
    os.utime(src / "val_data", ns=(1, 1))  # same contents, new timestamp: decided by sha256
    assert prepare(src, out, progress=False)[1] is False and (out / "train_images.npy").stat().st_mtime_ns == stamp
    new_val = official_batches(seed=7)["val_data"]
    (src / "val_data").write_bytes(pickle.dumps(new_val))
    assert prepare(src, out, progress=False)[1] is True
    np.testing.assert_array_equal(load_split(out, "val")[0], new_val["data"].reshape(-1, 3, 64, 64))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare(src, tmp_path / "mine", progress=False)


def test_verify_detects_modified_and_truncated_files(tmp_path):
    out = tmp_path / "out"
    prepare(write_official(tmp_path / "src", official_batches()), out, progress=False)
    images = out / "train_images.npy"
    raw = bytearray(images.read_bytes())
    raw[-1] ^= 0xFF
    images.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train_images.npy: sha256 differs"):
        verify(out, progress=False)
    images.write_bytes(bytes(raw[:-10]))
    with pytest.raises(DataError, match="bytes, the manifest says"):
        verify(out, progress=False)


def test_image_folders_are_box_resized_with_class_labels(tmp_path):
    src = tmp_path / "src"
    colours = {"train/cat/a.png": (200, 10, 10), "train/cat/b.jpg": (10, 200, 10), "train/dog/c.png": (0, 0, 255),
               "val/x.png": (7, 8, 9)}
    for rel, colour in colours.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (97, 130), colour).save(src / rel)
    Image.fromarray(np.tile(np.arange(128, dtype=np.uint8)[None, :, None], (128, 1, 3))).save(src / "val/ramp.png")
    manifest, _ = prepare(src, tmp_path / "out", progress=False)
    train, labels = load_split(tmp_path / "out", "train")
    assert train.shape == (3, 3, 64, 64) and labels.tolist() == [1, 1, 2]
    assert np.abs(train[0].astype(int) - np.array([200, 10, 10])[:, None, None]).max() == 0
    assert abs(int(train[1, 1].mean()) - 200) <= 2  # JPEG, but still the same flat colour
    val, val_labels = load_split(tmp_path / "out", "val")
    assert val_labels.tolist() == [0, 0]
    np.testing.assert_allclose(val[0, 0, 0], np.arange(64) * 2 + 0.5, atol=0.5)  # ramp: mean of pixel pairs
    assert np.ptp(val[1].reshape(3, -1), axis=1).tolist() == [0, 0, 0]
    assert manifest["source_kind"] == "image folders" and prepare(src, tmp_path / "out", progress=False)[1] is False
    Image.new("RGB", (5, 5)).save(src / "val/x.png")
    assert prepare(src, tmp_path / "out", progress=False)[1] is True


def test_cli_prepare_verify_and_one_line_errors(tmp_path):
    src = write_official(tmp_path / "src", official_batches(), "zip")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dsm_fast", "data", *args], capture_output=True, text=True,
                              timeout=120, check=False)

    out = str(tmp_path / "out")
    proc = cli("prepare", "--src", str(src), "--out", out, "--no-progress")
    assert proc.returncode == 0 and "prepared" in proc.stdout and "train 35" in proc.stdout, proc.stderr
    assert "up to date" in cli("prepare", "--src", str(src), "--out", out, "--no-progress").stdout
    assert cli("verify", out, "--no-progress").returncode == 0
    (tmp_path / "out" / "val_labels.npy").write_bytes(b"x")
    for proc in (cli("verify", out, "--no-progress"),
                 cli("prepare", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2"))):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "val_labels.npy" in cli("verify", out, "--no-progress").stderr


def test_a_partial_set_needs_train_files_and_says_so_everywhere(tmp_path, capsys):
    from dsm_fast.cli import main

    batches = official_batches()
    write_official(tmp_path / "src", {k: v for k, v in batches.items() if k in ("train_data_batch_1",
                                                                                "train_data_batch_2", "val_data")})
    with pytest.raises(DataError, match="missing train_data_batch_3, .*train_data_batch_10 .*--train-files 1,2"):
        prepare(tmp_path / "src", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="missing train_data_batch_3 "):
        prepare(tmp_path / "src", tmp_path / "out", progress=False, train_files=(1, 3))
    manifest, written = prepare(tmp_path / "src", tmp_path / "out", progress=False, train_files=(1, 2))
    assert written and manifest["train_files"] == [1, 2] and manifest["splits"]["train"]["count"] == 4 + 3
    images, _ = load_split(tmp_path / "out", "train")
    names = ["train_data_batch_1", "train_data_batch_2"]
    np.testing.assert_array_equal(images, np.concatenate([batches[n]["data"] for n in names]).reshape(-1, 3, 64, 64))
    assert prepare(tmp_path / "src", tmp_path / "out", progress=False, train_files=(1, 2))[1] is False
    manifest, written = prepare(tmp_path / "src", tmp_path / "out", progress=False, train_files=(2,))
    assert written and manifest["train_files"] == [2] and manifest["splits"]["train"]["count"] == 3

    out = str(tmp_path / "out")
    assert main(["data", "prepare", "--src", str(tmp_path / "src"), "--out", out, "--train-files", "1,2",
                 "--no-progress"]) == 0
    assert main(["data", "verify", out, "--no-progress"]) == 0
    assert main(["train", "--data", out, "--model", "tiny", "--batch-size", "2", "--steps", "1", "--eval-images", "0",
                 "--plots", "false", "--progress", "false", "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    assert main(["eval", str(tmp_path / "run"), "--images", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed if "partial: train_data_batch 1, 2 of 10" in line] == \
        ["prepared:", "ok:", "data:"]  # prepare, verify, eval
    for bad in ("0,1", "1,1", "x"):
        with pytest.raises(SystemExit) as stop:
            main(["data", "prepare", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "o2"), "--train-files",
                  bad])
        error = capsys.readouterr().err
        assert stop.value.code == 2 and len(error.strip().splitlines()) == 1 and "--train-files" in error


def test_a_full_prepare_records_all_ten_train_files(tmp_path):
    src = write_official(tmp_path / "src", official_batches())
    manifest, _ = prepare(src, tmp_path / "out", progress=False)
    assert manifest["train_files"] == list(range(1, 11))


def test_luma_is_pils_convert_L_for_every_colour():
    """All 2^24 RGB colours: luma (and the folder/demo reader to_channels) give exactly PIL's convert('L')."""
    from dsm_fast.data.images import luma, to_channels

    v = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([v >> 16, (v >> 8) & 255, v & 255], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)
    want = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(luma(rgb, axis=2)[:, :, 0], want)
    np.testing.assert_array_equal(to_channels(rgb[:64, :64], 1)[0], want[:64, :64])
    rounded = np.rint(rgb[:64].astype(np.float64) @ [0.299, 0.587, 0.114])  # what a float formula would give
    assert (rounded != want[:64]).any()  # so the test above could fail


def test_gray_view_of_a_prepared_colour_split(tmp_path, monkeypatch):
    from dsm_fast.data.images import GrayView, check_images

    prepare(write_official(tmp_path / "src", official_batches()), tmp_path / "out", progress=False)
    colour, _ = load_split(tmp_path / "out", "train")
    gray = check_images(GrayView(colour), "train", 1, 64)
    want = np.stack([np.asarray(Image.fromarray(img.transpose(1, 2, 0)).convert("L"))[None] for img in colour])
    assert gray.shape == (len(colour), 1, 64, 64) and len(gray) == len(colour)
    np.testing.assert_array_equal(np.asarray(gray), want)
    np.testing.assert_array_equal(gray[np.array([5, 0, 5])], want[[5, 0, 5]])
    np.testing.assert_array_equal(gray[3], want[3])
    assert isinstance(gray[2:9], GrayView) and np.array_equal(np.asarray(gray[2:9]), want[2:9])
    monkeypatch.setattr(GrayView, "BLOCK", 4)  # converted in blocks of 4 rows: the same array
    np.testing.assert_array_equal(np.asarray(gray), want)


def test_a_damaged_npy_header_is_named_with_the_command_that_checks_it(tmp_path, capsys):
    from dsm_fast.cli import main

    prepare(write_official(tmp_path / "src", official_batches()), tmp_path / "out", progress=False)
    images = tmp_path / "out" / "train_images.npy"
    raw = bytearray(images.read_bytes())
    raw[19] = ord("(")  # inside the header's dict: numpy's parser raises tokenize.TokenError
    images.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train_images.npy: cannot read as .npy \(damaged .*\); check the dataset "
                                        r"with: dsm-fast data verify"):
        load_split(tmp_path / "out", "train")
    with pytest.raises(SystemExit) as stop:  # a .npy given as --data: the same line
        main(["train", "--model", "tiny", "--image-size", "16", "--device", "cpu", "--data", str(images), "--out",
              str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "train_images.npy: cannot read as .npy" in err, err
