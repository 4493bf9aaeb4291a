"""dsm_fast/config.py: the one home of every option's choices and help text, read by the CLI and the modules."""
import argparse
import dataclasses
import subprocess
import sys

import pytest

from dsm_fast.config import KERNELS, SWITCH, ConfigError, TrainConfig, choices


def test_config_imports_neither_routes_nor_torch():
    """The modules import the vocabularies from config, never the reverse (and --help stays instant)."""
    code = ("import sys, dsm_fast.config; "
            "print(sorted(m for m in ('dsm_fast.routes', 'dsm_fast.losses', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_every_closed_option_refuses_a_value_outside_its_choices():
    closed = [f for f in dataclasses.fields(TrainConfig) if f.metadata["choices"]]
    assert {f.name for f in closed} >= {"route", "kernels", "compile", "precision", "engine", "loader", "objective",
                                        "optimizer", "energy", "channels", "zero_stage"}
    for f in closed:
        with pytest.raises(ConfigError, match=f"^{f.name} must be .* or {f.metadata['choices'][-1]}"):
            dataclasses.replace(TrainConfig(), **{f.name: "bogus" if isinstance(f.default, str) else 7}).validate()
        assert f.default in f.metadata["choices"]


def options_of(command: str) -> dict[str, argparse.Action]:
    from dsm_fast.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {flag: action for action in sub.choices[command]._actions for flag in action.option_strings}


def test_the_cli_reads_choices_and_help_from_config():
    train = options_of("train")
    for f in dataclasses.fields(TrainConfig):
        assert train["--" + f.name.replace("_", "-")].help.startswith(f.metadata["help"]), f.name
    bench, profile = options_of("bench"), options_of("profile")
    assert bench["--kernels"].choices == choices("kernels") == ("auto", *KERNELS)
    assert bench["--precision"].choices == profile["--precision"].choices == choices("precision")
    assert bench["--loader"].choices == choices("loader") and bench["--channels"].choices == choices("channels")
    assert profile["--cuda"].choices == SWITCH == choices("compile")


def test_the_adjoint_implements_every_kernel_choice():
    from dsm_fast.model.adjoint import NORM_ACT_OPS

    assert tuple(NORM_ACT_OPS) == KERNELS
