"""The analysis subcommands end to end on tiny runs: demo images (two disjoint subsets, one of them DiffCLF) and
the GSM data; numbers in --json, PNGs in --out."""

import numpy as np
import pytest
from test_cli import cli_error

from dsm_fast.cli import main
from dsm_fast.config import TrainConfig
from dsm_fast.data import make_training_data
from dsm_fast.data.demo import demo_patches
from dsm_fast.tools.testing import read_json

TINY = ["--model", "tiny", "--image-size", "16", "--steps", "2", "--batch-size", "4", "--eval-images", "0",
        "--plots", "false", "--progress", "false", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", *TINY, "--subset", "first:40", "--out", str(root / "first")]) == 0
    assert main(["train", *TINY, "--subset", "last:40", "--objective", "diffclf", "--diffclf-levels", "4",
                 "--out", str(root / "last")]) == 0
    assert main(["train", "--data", "gsm", "--model", "radial", "--gsm-dim", "50", "--t-min", "1e-2", "--t-max",
                 "1e2", "--steps", "2", "--batch-size", "8", "--eval-images", "0", "--progress", "false",
                 "--plots", "false", "--out", str(root / "gsm")]) == 0
    return root



def test_subsets_are_disjoint_ends_of_the_training_images():
    train = demo_patches(3, 16, "train")
    first = make_training_data(TrainConfig(image_size=16, subset="first:40"))
    last = make_training_data(TrainConfig(image_size=16, subset="last:40"))
    assert np.array_equal(first.images, train[:40]) and np.array_equal(last.images, train[-40:])


def test_bad_subset_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--subset", "middle:3"])
    assert exit_info.value.code == 2 and "first:N" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["denoise", "{run}", "--show", "0", "--out", "{tmp}"], "--show"),
    (["atlas", "{run}", "--show", "0", "--out", "{tmp}"], "--show"),
    (["dimensionality", "{run}", "--t-max", "inf", "--out", "{tmp}"], "--t-max < inf"),
    (["denoise", "{run}", "--images", "2", "--out", "{tmp}/file/out"], "--out {tmp}/file/out: cannot write it"),
    (["normalization", "--steps", "1", "--plot", "{tmp}/file/n.png"], "--plot {tmp}/file/n.png: cannot write it"),
])
def test_user_mistakes_in_analyses_are_one_line(runs, args, message, capsys, tmp_path):
    (tmp_path / "file").write_text("a file where a folder is needed")
    fill = {"run": str(runs / "first"), "tmp": str(tmp_path)}
    assert message.format(**fill) in cli_error([arg.format(**fill) for arg in args], capsys)


def test_generalization_of_a_run_with_itself_is_zero_and_differs_from_another(runs, tmp_path):
    out = tmp_path / "a"
    main(["generalization", str(runs / "first"), str(runs / "first"), "--images", "6", "--out", str(out),
          "--json", str(out / "same.json")])
    same = read_json(out / "same.json")
    assert same["mean_abs_db"] < 1e-9 and same["images"] == 6
    main(["generalization", str(runs / "first"), str(runs / "last"), "--images", "6", "--out", str(out),
          "--json", str(out / "pair.json")])
    pair = read_json(out / "pair.json")
    assert pair["rms_db"] >= pair["mean_abs_db"] > 0 and pair["rms_bits"] == pytest.approx(pair["rms_db"] * 0.33219,
                                                                                             rel=1e-4)
    assert (out / "generalization.png").stat().st_size > 10_000


def test_generalization_refuses_runs_of_other_data(runs, tmp_path, capsys):
    """Runs of another kind of data or of another image shape: one line, exit code 2 (not a comparison)."""
    assert main(["train", *TINY, "--image-size", "8", "--channels", "1", "--out", str(tmp_path / "small")]) == 0
    for other, message in ((runs / "gsm", "different kinds"), (tmp_path / "small", "different shapes")):
        assert message in cli_error(["generalization", str(runs / "first"), str(other), "--out", str(tmp_path)], capsys)


def test_image_analyses_write_numbers_and_pictures(runs, tmp_path):
    out, run = tmp_path / "img", str(runs / "last")
    main(["dimensionality", run, "--images", "3", "--levels", "3", "--noise-draws", "1", "--out", str(out),
          "--json", str(out / "d.json")])
    d = read_json(out / "d.json")
    assert d["dim"] == 768 and len(d["mean_d_eff"]) == 3 and all(v > 0 for v in d["mean_d_eff"])
    main(["denoise", run, "--images", "2", "--psnrs", "20,0", "--out", str(out), "--json", str(out / "n.json")])
    assert [row["input_psnr"] for row in read_json(out / "n.json")["rows"]] == [20.0, 0.0]
    main(["atlas", run, "--images", "6", "--show", "2", "--out", str(out), "--json", str(out / "a.json")])
    atlas = read_json(out / "a.json")
    assert len(atlas["log_p_per_dim"]) == 6 and len(atlas["ranked"]["highest"]) == 2
    assert [r["contrast"] for r in atlas["contrast"]][3] == 1.0
    assert atlas["contrast"][3]["log_p_per_dim"] == pytest.approx(np.mean(atlas["log_p_per_dim"]), abs=1e-9)
    main(["sample", run, "--count", "2", "--steps", "2", "--mala-steps", "1", "--out", str(out),
          "--json", str(out / "s.json")])
    assert len(read_json(out / "s.json")["mala"]) == 2
    for name in ("dimensionality", "denoise", "denoise_psnr", "atlas", "atlas_images", "samples"):
        assert (out / f"{name}.png").stat().st_size > 5_000, name


def test_gsm_analyses(runs, tmp_path):
    out, run = tmp_path / "gsm", str(runs / "gsm")
    main(["sample", run, "--count", "20", "--steps", "3", "--out", str(out), "--json", str(out / "s.json")])
    assert read_json(out / "s.json")["mean_sq_norm_per_dim"] > 0 and (out / "samples_radial.png").is_file()
    main(["atlas", run, "--images", "10", "--out", str(out), "--json", str(out / "a.json")])
    assert read_json(out / "a.json")["dim"] == 50 and not (out / "atlas_images.png").exists()
