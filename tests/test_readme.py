"""The README's commands: every `cxredit ...` line parses; the Python API block runs."""

import re
import shlex
from pathlib import Path

import pytest

from cxredit.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _commands() -> list[str]:
    cmds = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("cxredit "):
                cmds.append(line)
    return cmds


def test_readme_has_the_two_commands_first():
    first = _blocks("bash")[0]
    assert "make demo" in first and "make test" in first


@pytest.mark.parametrize("line", _commands())
def test_every_readme_command_parses(line):
    args = shlex.split(line)[1:]
    try:
        ns = build_parser().parse_args(args)
    except SystemExit as e:  # argparse reports a usage error this way
        pytest.fail(f"README command does not parse ({e.code}): {line}")
    assert ns._run is not None


def test_readme_python_api_block_runs(tiny_bundle, tmp_path, monkeypatch, capsys):
    from cxredit.data.io import write_png
    from cxredit.data.phantom import render, sample_case

    code = next(b for b in _blocks("python") if "load_bundle" in b)
    s, h = sample_case(3, cardiomegaly=False)
    write_png(tmp_path / "xray.png", render(s, h, 48).image)
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"weights/demo"', repr(str(tiny_bundle))), "README", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("0 [")  # three edits + the phantom pair
    ctr_a, ctr_c = map(float, lines[3].split())
    assert ctr_c > ctr_a  # the counterfactual has the bigger heart
