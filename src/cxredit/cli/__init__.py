"""Command-line interface: `cxredit <command> [options]`.

Thin by design: each subcommand parses its options and calls the Python API. User errors
(bad paths, unreadable files, bad queries) end with one line on stderr and exit status 2;
anything else is a bug and keeps its traceback.

The commands live in modules by pipeline stage (data, train, latent, evaluation, app); each
registers itself with `@command` from `_common` when this package imports it, and
`build_parser` orders them by `PIPELINE_ORDER`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from cxredit import __version__

# Importing the command modules registers their commands in _COMMANDS.
from cxredit.cli import app, data, evaluation, latent, train  # noqa: F401
from cxredit.cli._common import _COMMANDS, _add_image_source, _add_runtime, command, log
from cxredit.cli.train import gan_config_from_args

__all__ = ["PIPELINE_ORDER", "_COMMANDS", "_add_image_source", "_add_runtime", "build_parser",
           "command", "gan_config_from_args", "log", "main"]


# ------------------------------------------------------------------------------------- parser
# `cxredit --help` lists the commands in the order of the pipeline (DESIGN.md).
PIPELINE_ORDER = ("prepare", "phantoms", "info", "train-gan", "generate", "train-encoder",
                  "invert", "project", "separability", "enlarge-heart", "direction", "edit",
                  "train-segmenter", "train-classifier", "ctr", "fid", "export-bundle",
                  "make-weights", "evaluate", "report", "serve", "demo")


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless X is None or False (nothing to say)
    or the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (one subparser per registered command)."""
    parser = argparse.ArgumentParser(
        prog="cxredit",
        description="Disease-aware editing of chest X-rays with StyleGAN2.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cxredit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    order = {name: i for i, name in enumerate(PIPELINE_ORDER)}
    for name, help_, add, run in sorted(_COMMANDS, key=lambda c: order.get(c[0], len(order))):
        p = sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".",
                           formatter_class=_DefaultsHelp)
        add(p)
        # each option's name and default: main() lists the options given (`args._given`)
        p.set_defaults(_run=run, _options={a.dest: (a.option_strings[-1], a.default)
                                           for a in p._actions
                                           if a.option_strings and a.dest != "help"})
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cxredit` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version or a usage error: report the status, in-process
        return int(e.code or 0)
    # the options given a value other than their default, by name (however abbreviated)
    args._given = [name for dest, (name, default) in getattr(args, "_options", {}).items()
                   if getattr(args, dest, default) != default]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError) as e:
        # User errors: one line, no traceback (XrayReadError and StoreError are ValueErrors).
        if args.verbose:
            raise
        if isinstance(e, FileExistsError) and e.filename:  # mkdir over a file
            msg = f"{e.filename}: exists and is not a folder"
        elif isinstance(e, OSError) and e.filename and e.strerror:
            msg = f"{e.filename}: {e.strerror}"
        else:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"cxredit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not getattr(e, "one_line", False) or args.verbose:  # e.g. NonFiniteLossError
            raise
        print(f"cxredit {args.command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cxredit: interrupted (finished work is kept; re-run to resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `cxredit info STORE | head`: the reader left; not an error
        # Python would report the failed flush of stdout at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

