"""The command line as a user meets it: help texts, one-line errors, exit codes."""

import subprocess
import sys

import pytest

from cxredit.cli import _COMMANDS, build_parser, main

EXPECTED = {"prepare", "phantoms", "info", "train-gan", "generate", "train-encoder", "invert",
            "project", "separability", "direction", "enlarge-heart", "edit", "train-segmenter",
            "train-classifier", "ctr", "fid", "export-bundle", "make-weights", "evaluate",
            "report", "serve", "demo"}


def test_help_lists_every_subcommand_with_one_line(capsys):
    assert main(["--help"]) == 0
    flat = "".join(capsys.readouterr().out.split())  # argparse wraps (even at hyphens)
    names = {name for name, *_ in _COMMANDS}
    assert EXPECTED <= names
    for name, help_, *_ in _COMMANDS:
        assert name + "".join(help_.split()) in flat, name
        assert "\n" not in help_ and len(help_) < 100


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_option_is_documented(name):
    sub = build_parser()._subparsers._group_actions[0].choices[name]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_user_errors_are_one_line_and_nonzero(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing" in err and "Traceback" not in err
    assert main(["prepare", "chexpert", "--root", str(tmp_path), "--out",
                 str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.csv" in err
    assert main(["train-gan", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                 "--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["nonsense"]) == 2
    capsys.readouterr()
    for bad, words in ((["--limit", "-1"], "--limit must be at least 1"),
                       (["--views", " , "], "names no view")):
        assert main(["prepare", "folder", "--root", str(tmp_path), "--out",
                     str(tmp_path / "s"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err
    # a damaged store: the error names the file
    (tmp_path / "st").mkdir()
    for text in ("{", "[1]", '{"format_version": 1}'):
        (tmp_path / "st" / "store.json").write_text(text)
        assert main(["info", str(tmp_path / "st")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(tmp_path / "st" / "store.json") in err


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "cxredit.cli", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("cxredit ")


@pytest.mark.parametrize("extra, words", [
    (["--seeds", "0,5-2"], "reversed"), (["--seeds", "0-"], "'0-' is not a seed"),
    (["--seeds", "a"], "'a' is not a seed"), (["--seeds", "99999999999999999999"], "2^32"),
    (["--seeds", "0-999999999999"], "2^32"), (["--seeds", "0-200000"], "more than 100,000"),
    (["--trunc", "nan"], "--trunc"), (["--trunc", "1e9"], "--trunc"),
    (["--interpolate", "-3"], "--interpolate"), (["--seeds", "4", "--interpolate", "3"],
                                                 "at least two --seeds"),
])
def test_generate_options_are_checked_before_loading(tmp_path, capsys, extra, words):
    assert main(["generate", "--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                 *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err and "nowhere" not in err
