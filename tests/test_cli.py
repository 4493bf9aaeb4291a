"""The console script: help, one-line errors with exit code 2, and an end-to-end train → eval → bench."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from dsm_fast.cli import COMMANDS, main

TINY = ["--model", "tiny", "--image-size", "16", "--batch-size", "4", "--device", "cpu"]


def run_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "dsm_fast", *args], check=False, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    assert all(option.count("(default:") <= 1 for option in options), "an option names its default twice"
    assert "(default: None)" not in text


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "missing.yaml"], "config file not found"),
    (["train", "--steps", "many"], "steps expects int"),
    (["train", "--data", "nowhere.npy"], "data not found"),
    (["eval", "no_such_run"], "no checkpoint found"),
    (["bench", "--preset", "huge"], "unknown preset"),
    (["train", *TINY, "--cuda-graph"], "--cuda-graph needs a CUDA device"),
    (["train", "--route", "compiled"], "compilation is --compile"),
    (["bench", "--routes", "reference+compile"], "route reference cannot be compiled"),
    (["bench", "--routes", "fused+graph", "--device", "cpu"], "+graph (--cuda-graph) needs a CUDA device"),
])
def test_user_mistakes_end_in_one_line_with_exit_code_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command, options", [
    ("bench", ["--json", "{file}/x.json"]), ("profile", ["--json", "{file}/x.json"]),
    ("normalization", ["--json", "{file}/x.json"]), ("restore", ["runs/any", "--task", "superres", "--out", "{file}"]),
    ("denoise", ["runs/any", "--out", "{file}/analysis"])])
def test_an_unwritable_output_fails_before_the_work(command, options, tmp_path, monkeypatch, capsys):
    """--json or an analysis' --out under a file: one line, exit code 2, and the command's work never starts."""
    (tmp_path / "file").write_text("a file where a folder is needed")
    add, _ = COMMANDS[command]
    monkeypatch.setitem(COMMANDS, command, (add, lambda args: pytest.fail("the work started")))
    err = cli_error([command, *(option.format(file=tmp_path / "file") for option in options)], capsys)
    assert "cannot write it (a part of the path is a file)" in err


def test_config_file_rejects_unknown_keys_and_wrong_shapes(tmp_path):
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    proc = run_cli("train", "--config", str(tmp_path / "bad.yaml"), check=False)
    assert proc.returncode == 2 and "unknown config key 'stepz'" in proc.stderr
    np.save(tmp_path / "gray.npy", np.zeros((4, 1, 16, 16), dtype=np.uint8))
    proc = run_cli("train", *TINY, "--data", str(tmp_path / "gray.npy"), "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "the run expects (3, 16, 16)" in proc.stderr and "Traceback" not in proc.stderr


def test_train_eval_resume_end_to_end(tmp_path):
    (tmp_path / "run.toml").write_text('objective = "dual"\nsteps = 4\nlog_every = 2\n')
    out = str(tmp_path / "run")
    proc = run_cli("train", "--config", str(tmp_path / "run.toml"), *TINY, "--out", out, "--eval-images", "16",
                   "--ema-decay", "0.5", "--energy", "gaussian")  # the EMA holds parameters; buffers come from weights
    assert "held-out NLL:" in proc.stdout
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())  # what ran, 'auto' decided once
    assert (resolved["route"], resolved["kernels"], resolved["compile"]) == ("fused", "torch", "off")
    run_cli("train", "--config", str(tmp_path / "run.toml"), *TINY, "--out", out, "--steps", "6", "--resume",
            "--eval-images", "0", "--ema-decay", "0.5")
    proc = run_cli("eval", out, "--images", "12", "--ema", "--denoise", "--per-image", str(tmp_path / "logp.csv"),
                   "--json", str(tmp_path / "nll.json"), "--device", "cpu")
    result = json.loads((tmp_path / "nll.json").read_text())
    assert result["checkpoint"].endswith("step_00000006") and result["n"] == 12
    assert np.isfinite(result["nll_bits_per_dim"]) and len(result["denoising"]) == 9
    assert f"{result['nll_bits_per_dim']:.4f}" in proc.stdout
    per_image = np.loadtxt(tmp_path / "logp.csv", delimiter=",", skiprows=1)
    assert per_image.shape == (12, 2)


def test_bench_times_every_route_side_by_side(tmp_path):
    proc = run_cli("bench", "--preset", "tiny", "--batch-size", "2", "--image-size", "16", "--steps", "2",
                   "--warmup", "1", "--routes", "score,reference", "--device", "cpu", "--json", str(tmp_path / "b.json"))
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["route"] for r in rows] == ["score", "reference"]
    assert all(r["ms_per_step"] > 0 and np.isfinite(r["final_loss"]) for r in rows)
    assert rows[1]["speedup_vs_reference"] == 1.0 and "× ref" in proc.stdout


def test_bench_keeps_the_routes_it_finished_when_stopped(tmp_path, monkeypatch):
    """benchmarks/gpu_check.sh stops a bench at its time limit: the JSON already holds every finished route."""
    from dsm_fast.tools import bench

    timed = bench.step_function

    def stopped_at_reference(spec, *args, **kwargs):
        if spec == "reference":
            raise KeyboardInterrupt  # what the time limit's signal ends the process with
        return timed(spec, *args, **kwargs)

    monkeypatch.setattr(bench, "step_function", stopped_at_reference)
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--preset", "tiny", "--batch-size", "2", "--image-size", "16", "--steps", "1", "--warmup", "0",
              "--routes", "score,reference", "--device", "cpu", "--json", str(tmp_path / "b.json")])
    assert stop.value.code == 130
    row, = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert row["route"] == "score" and row["ms_per_step"] > 0


def test_eval_on_the_analytic_data_prints_the_exact_nll(tmp_path):
    out = str(tmp_path / "gsm")
    run_cli("train", "--data", "gsm", "--model", "radial", "--gsm-dim", "50", "--gsm-sigmas", "1,4", "--t-min", "1e-2",
            "--t-max", "1e2", "--steps", "3", "--batch-size", "8", "--eval-images", "0", "--out", out)
    proc = run_cli("eval", out, "--images", "64", "--variance-correction", "--json", str(tmp_path / "e.json"))
    result = json.loads((tmp_path / "e.json").read_text())
    assert "exact NLL of the same samples" in proc.stdout and result["dim"] == 50
    assert 0 < result["exact_nll_bits_per_dim"] < 5 and np.isfinite(result["nll_bits_per_dim"])


def cli_error(argv, capsys) -> str:
    """Run ``main(argv)`` in-process; it must end with exit code 2 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("args, message", [
    (["--route", "bogus"], "route must be"),
    (["--model", "bogus"], "model must be one of paper"),
    (["--device", "bogus"], "device must be auto, cpu"),
    (["--gsm-dim", "0"], "gsm_dim must be positive"),
    (["--gsm-sigmas=-1,0"], "gsm_sigmas must be positive"),
    (["--image-size", "0"], "image_size must be in 1"),
    (["--image-size", "-8"], "image_size must be in 1"),
    (["--image-size", "4096"], "image_size must be in 1"),
    (["--t-max", "inf"], "t_max < inf"),
    (["--time-weight", "nan"], "time_weight must be ≥ 0 and finite"),
    (["--warmup-steps", "-5"], "warmup_steps must be ≥ 0"),
    (["--grad-clip", "-1"], "grad_clip must be ≥ 0"),
    (["--eval-images", "-1"], "eval_images must be ≥ 0"),
    (["--optimizer", "apex"], "--optimizer apex asked for"),
])
def test_bad_option_values_end_in_one_line(args, message, tmp_path, capsys):
    err = cli_error(["train", *TINY, "--eval-images", "0", "--out", str(tmp_path / "r"), *args], capsys)
    assert message in err


def test_bad_paths_and_data_end_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert "is a file" in cli_error(["train", *TINY, "--out", str(tmp_path / "file")], capsys)
    np.save(tmp_path / "one.npy", np.zeros((1, 3, 16, 16), dtype=np.uint8))
    err = cli_error(["train", *TINY, "--data", str(tmp_path / "one.npy"), "--out", str(tmp_path / "r")], capsys)
    assert "no held-out images" in err and not (tmp_path / "r").exists()


def test_resume_takes_the_runs_options_and_refuses_changes(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["train", *TINY, "--steps", "1", "--eval-images", "0", "--progress", "false", "--plots", "false",
                 "--out", out]) == 0
    # the --help example: everything else comes from config.json (was a 77-line size-mismatch traceback)
    assert main(["train", "--out", out, "--steps", "2", "--lr", "1e-4", "--resume"]) == 0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (saved["model"], saved["image_size"], saved["steps"], saved["lr"]) == ("tiny", 16, 2, 1e-4)
    assert "image_size is 32, the run was made with 16" in cli_error(
        ["train", "--out", out, "--image-size", "32", "--resume"], capsys)
    assert "batch_size is 8" in cli_error(["train", "--out", out, "--batch-size", "8", "--resume"], capsys)
    assert "holds no run to resume" in cli_error(["train", "--out", str(tmp_path / "none"), "--resume"], capsys)
    assert not (tmp_path / "none").exists()
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == saved
    assert "--batch-size must be positive" in cli_error(["eval", out, "--batch-size", "0"], capsys)


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path):
    import signal
    import time

    out = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "dsm_fast", "train", *TINY, "--steps", "100000", "--log-every", "1",
                             "--checkpoint-every", "100000", "--eval-images", "0", "--progress", "false", "--out",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((out / "stats.jsonl").is_file()
                                               and (out / "stats.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM at step" in lines[0] and "checkpoint saved at" in lines[0], err
    from dsm_fast.checkpoint import list_checkpoints, load_checkpoint

    step = int(lines[0].split("SIGTERM at step ")[1].split(":")[0])
    assert step >= 2 and load_checkpoint(list_checkpoints(out)[-1])[1]["step"] == step


def test_a_compile_that_fell_back_is_recorded_and_the_run_resumes(tmp_path, monkeypatch, failing_compiler, capsys):
    """A backward that fails to compile: one warning, the step runs eagerly, the summary line and config.json say so
    (compile stays 'on', the reason beside it), and --resume of the run is not refused."""
    import torch

    compile_for_real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_for_real(fn, backend=failing_compiler("backward")))
    out = tmp_path / "r"
    with pytest.warns(RuntimeWarning, match=r"route fused failed \(RuntimeError: cannot lower the backward graph\)"):
        assert main(["train", *TINY, "--route", "fused", "--compile", "--steps", "2", "--log-every", "1", "--eval-images", "0",
                     "--progress", "false", "--plots", "false", "--out", str(out)]) == 0
    assert "; torch.compile fell back to eager at step 0: RuntimeError: cannot lower" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["compile"] == "on" and saved["compile_fell_back"].startswith("step 0: RuntimeError: cannot lower")
    from dsm_fast.config import resolve_config

    assert resolve_config(str(out / "config.json")).compile == "on"  # a run's config.json still reads as --config
    assert len([row for row in (out / "stats.jsonl").read_text().splitlines() if row]) == 2  # both steps trained, none skipped
    with pytest.warns(RuntimeWarning, match="cannot lower the backward graph"):
        assert main(["train", "--out", str(out), "--steps", "3", "--compile", "on", "--resume"]) == 0
    assert "done: step 3" in capsys.readouterr().out


def test_bench_says_which_compile_fell_back(tmp_path, monkeypatch, failing_compiler, capsys):
    import torch

    compile_for_real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_for_real(fn, backend=failing_compiler("forward")))
    with pytest.warns(RuntimeWarning, match="cannot lower the forward graph"):
        assert main(["bench", "--preset", "tiny", "--batch-size", "2", "--image-size", "16", "--steps", "1", "--warmup",
                     "0", "--routes", "score+compile", "--device", "cpu", "--json", str(tmp_path / "b.json")]) == 0
    row, = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert row["route"] == "score+compile (fell back)" and row["compile_fell_back"].startswith("RuntimeError: cannot")
    assert "score+compile (fell back): torch.compile failed (RuntimeError: cannot lower the forward graph); timed " \
           "eagerly" in capsys.readouterr().out


def test_bench_channels_last_rows_train_the_same_network(tmp_path):
    """+channels-last changes the memory layout only: the same weights and batches give the same losses."""
    run_cli("bench", "--preset", "tiny", "--batch-size", "2", "--image-size", "16", "--steps", "2", "--warmup", "1",
            "--routes", "score,score+channels-last,fused,fused+channels-last", "--device", "cpu",
            "--json", str(tmp_path / "b.json"))
    losses = {r["route"]: r["final_loss"] for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert losses["score+channels-last"] == pytest.approx(losses["score"], rel=1e-4)
    assert losses["fused+channels-last"] == pytest.approx(losses["fused"], rel=1e-4)


@pytest.mark.parametrize("where", ["under_a_file", "read_only", "long_name"])
def test_an_out_that_cannot_be_created_is_one_line(tmp_path, capsys, where):
    (tmp_path / "file").write_text("")
    out = {"under_a_file": tmp_path / "file" / "run", "read_only": "/sys/dsm_fast_run",
           "long_name": tmp_path / ("r" * 256)}[where]
    assert "cannot create the run folder" in cli_error(["train", *TINY, "--eval-images", "0", "--out", str(out)], capsys)


@pytest.mark.parametrize("line, kind", [("steps: 5.5", "int"), ("steps: true", "int"), ("lr: yes", "float"),
                                        ("progress: 2", "bool"), ("out: 7", "str"), ("gsm_sigmas: [1, true]", "tuple")])
def test_config_file_values_are_typed_like_the_command_line(tmp_path, capsys, line, kind):
    (tmp_path / "run.yaml").write_text(line + "\n")
    assert f"{line.split(':')[0]} expects {kind}" in cli_error(["train", "--config", str(tmp_path / "run.yaml")], capsys)


def test_fewer_training_images_than_the_batch_is_said_before_training(tmp_path, capsys):
    np.save(tmp_path / "two.npy", np.random.default_rng(0).integers(0, 256, (3, 3, 16, 16), dtype=np.uint8))
    assert main(["train", *TINY, "--data", str(tmp_path / "two.npy"), "--steps", "1", "--eval-images", "0",
                 "--progress", "false", "--plots", "false", "--out", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert "warning: 2 training image(s), fewer than --batch-size 4" in captured.err
    assert captured.out.index("training tiny") >= 0 and captured.err.count("\n") == 1
