"""What every subcommand module shares: the help formatter, the examples epilog, JSON output, the step-shape
options of bench and profile, and the options of the analyses of one trained run."""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

from ..config import ConfigError, choices


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows an option's default once: not when the help already names it, nor for None or on/off flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool) or "(default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


FILE_IN_THE_WAY = "a part of the path is a file"


def unwritable(option: str, path, reason: str) -> ConfigError:
    """The one-line error for an output ``path`` (given by ``option``) that cannot be written, and why."""
    return ConfigError(f"{option} {path}: cannot write it ({reason})")


def cannot_write(option: str, path, error: OSError) -> ConfigError:
    """``unwritable`` with the reason an ``OSError`` gives."""
    reason = FILE_IN_THE_WAY if isinstance(error, (NotADirectoryError, FileExistsError)) else error.strerror
    return unwritable(option, path, reason or str(error))


def check_writable_folder(path, option: str, named=None) -> None:
    """One line (naming ``named``, default ``path``) unless the folder ``path`` exists and is writable or could be
    created: its nearest existing ancestor is a writable folder. Creates nothing."""
    ancestor = Path(path).absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise unwritable(option, named or path, FILE_IN_THE_WAY)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise unwritable(option, named or path, f"no write permission in {ancestor}")


def make_folder(path, option: str, named=None) -> Path:
    """``path`` as a folder, created with its parents; one line naming ``named`` (default ``path``) if it cannot
    be."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise cannot_write(option, named or path, error) from None
    return Path(path)


def write_file(path, option: str, write: Callable[[Path], object]) -> None:
    """``write(path)`` after creating the folder of ``path`` (given by ``option``); one line if it cannot be
    written."""
    make_folder(Path(path).parent, option, path)
    try:
        write(Path(path))
    except OSError as error:
        raise cannot_write(option, path, error) from None


def write_json(path: str | None, payload) -> None:
    """Write ``payload`` to ``path`` (creating its folder); a path that cannot be written is one line."""
    if path:
        write_file(path, "--json", lambda file: file.write_text(json.dumps(payload, indent=2, default=float) + "\n"))


def add_step_shape(p: argparse.ArgumentParser, preset_help: str = "UNet preset") -> None:
    """The UNet preset and the (batch, channels, size) of the synthetic images a timed step runs on."""
    p.add_argument("--preset", default="paper", help=preset_help)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", type=int, default=3, choices=choices("channels"))


def check_step_shape(args, size: bool = True) -> None:
    """Refuse an unknown --preset, and (with ``size``) an --image-size that the preset's 2^(scales − 1)
    downsampling does not divide."""
    from ..model import PRESETS

    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    down = 2 ** (len(PRESETS[args.preset].widths) - 1)
    if size and args.image_size % down:
        raise ConfigError(f"--image-size must be a multiple of {down} for preset {args.preset}")


def add_run_args(p, images: int, data: bool = True) -> None:
    """Options every analysis of one trained run shares."""
    p.add_argument("run", help="a run folder (its newest checkpoint) or one checkpoint folder")
    if data:
        p.add_argument("--data", help="images to analyse (folder or .npy) instead of the run's held-out split")
        p.add_argument("--images", type=int, default=images, help="how many images (or GSM draws)")
    p.add_argument("--out", default="analysis", help="folder for the PNG files")
    p.set_defaults(out_is_folder=True)  # checked by the dispatcher before the work (cli/__init__.py)
    p.add_argument("--json", metavar="PATH", help="write the numbers as JSON")
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)


def given_or(value: float | None, default: float) -> float:
    """An option's value where given (0 included: it is checked, not replaced by the default), else the default."""
    return default if value is None else value


def float_list(text: str, name: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{name} expects comma-separated numbers, got {text!r}") from None


def out_path(args, name: str) -> Path:
    """OUT/name, OUT (``--out``) created if needed."""
    return make_folder(args.out, "--out") / name
