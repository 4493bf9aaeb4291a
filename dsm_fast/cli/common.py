"""What every subcommand module shares: the help formatter, the examples epilog and JSON output."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows an option's default once: not when the help already names it, nor for None or on/off flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool) or "(default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def write_json(path: str | None, payload) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=float) + "\n")
