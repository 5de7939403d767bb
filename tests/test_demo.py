"""`cxredit demo` end to end at toy size, run twice (the second run resumes finished stages)."""

import json

from cxredit.cli import main


def test_demo_runs_and_reruns(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path / "demo"), "--n-healthy", "4", "--n-cardio", "6",
            "--n-train", "32", "--gan-kimg", "0.032", "--resolution", "32", "--no-progress"]
    assert main(args) == 0
    first = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert first["test_set"]["healthy"] == 4 and first["test_set"]["cardiomegaly"] == 6
    assert first["test_set"]["ctr_healthy"][1] < 0.5 < first["test_set"]["ctr_cardiomegaly"][0]
    assert (tmp_path / "demo" / "samples" / "grid.png").exists()
    assert main(args) == 0  # nothing left to do: must still summarise
    second = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert second["gan"]["kimg"] == first["gan"]["kimg"]
    assert "cxredit demo ->" in capsys.readouterr().out
