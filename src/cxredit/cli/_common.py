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


# What --resume may still be given: where the data and run are, the new length, and how to run.
RESUME_OPTIONS = {"--data", "--out", "--gan", "--kimg", "--resume", "--device", "--no-progress",
                  "--compile"}


def refuse_changes_on_resume(args: argparse.Namespace) -> None:
    """A resumed run continues exactly as its config.json says: an option that would change
    the run (--set, --batch, --lr, --preset, ...) is an error instead of being ignored."""
    if not getattr(args, "resume", False):
        return
    bad = [t for t in getattr(args, "_given", []) if t not in RESUME_OPTIONS]
    if bad:
        raise ValueError(f"{bad[0]} cannot change a resumed run: --resume continues the run in "
                         f"--out exactly as its config.json says (only --kimg may change); "
                         "start a new run in another --out to train with other settings")


def _add_image_source(p: argparse.ArgumentParser) -> None:
    """--images FILES... | --store STORE [--split] [--query]: what invert/project read."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files (PNG/JPEG/DICOM)")
    src.add_argument("--store", help="store folder")
    p.add_argument("--split", choices=["train", "val", "test"], help="store split")
    p.add_argument("--query", help="store label query, e.g. \"Cardiomegaly==1\"")

