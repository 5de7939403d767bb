"""The command registry and the option helpers that several command modules share."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

log = logging.getLogger("cxredit")

# (name, one-line help, add_arguments, run) — filled by @command in the command modules.
_COMMANDS: list[tuple[str, str, Callable, Callable]] = []


def command(name: str, help: str):
    """Register `run(args) -> int` as a subcommand whose options are set by `add(parser)`."""

    def deco(add: Callable[[argparse.ArgumentParser], None]):
        def wrap(run: Callable[[argparse.Namespace], int]):
            _COMMANDS.append((name, help, add, run))
            return run

        return wrap

    return deco


def _add_runtime(p: argparse.ArgumentParser, device: bool = True, progress: bool = True) -> None:
    """Options every long-running command shares: --device and --no-progress."""
    if device:
        p.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_image_source(p: argparse.ArgumentParser) -> None:
    """--images FILES... | --store STORE [--split] [--query]: what invert/project read."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files (PNG/JPEG/DICOM)")
    src.add_argument("--store", help="store folder")
    p.add_argument("--split", choices=["train", "val", "test"], help="store split")
    p.add_argument("--query", help="store label query, e.g. \"Cardiomegaly==1\"")

