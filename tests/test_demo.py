"""`cxredit demo` end to end with a tiny bundle, run twice (the second run reuses its work)."""

import json

from cxredit.cli import main
from cxredit.data.io import read_png_text

SECTIONS = ("summary", "samples", "reconstructions", "separability", "directions", "edits",
            "ctr", "identity", "metrics", "provenance")


def test_demo_runs_reports_and_reruns(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--weights", str(tiny_bundle), "--n-healthy", "6",
            "--n-cardio", "6", "--n-project", "3", "--project-steps", "4", "--n-edit", "3",
            "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "separability" in text and "report" in text and "cxredit demo ->" in text
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["n_healthy"] == 6 and m["data"]["n_cardiomegaly"] == 6 and m["data"]["phantom"]
    for key in ("generation", "reconstruction", "separability", "directions", "edit", "targets"):
        assert key in m, key
    assert set(m["reconstruction"]) == {"encoder", "projection"}
    assert m["reconstruction"]["projection"]["n"] == 6 and m["edit"]["n"] == 3
    assert "pair_demo" in m["directions"]["names"] and "lda" in m["directions"]["names"]
    assert m["edit"]["direction"] == "pair_demo" and len(m["edit"]["ctr_mean"]) == 7
    assert len(m["edit"]["ssim_true_counterfactual"]) == 7  # phantoms: the truth is measured
    assert len(m["targets"]) == 4
    html = (out / "report.html").read_text()
    for sec in SECTIONS:
        assert f'id="{sec}"' in html, sec
    assert "http://" not in html and "https://" not in html
    assert read_png_text(out / "I_star.png")["cxredit:synthetic"] == "true"
    assert read_png_text(out / "edit_sweep.png")["cxredit:synthetic"] == "true"
    first = m["reconstruction"]["projection"]["ssim"]
    assert main(args) == 0  # re-run: the test set and projections are reused, same numbers
    again = json.loads((out / "metrics.json").read_text())
    assert again["reconstruction"]["projection"]["ssim"] == first


def test_demo_without_weights_says_how_to_make_them(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--weights", str(tmp_path / "none"),
                 "--no-progress"]) == 2
    assert "make-weights" in capsys.readouterr().err


def test_demo_with_a_wplus_encoder(tmp_path_factory, capsys):
    """A bundle whose E predicts W+ (started from a W encoder) runs the whole demo: W+
    latents, W+ pair directions, a W LDA direction (of the layer means), edits along them."""
    import numpy as np

    from conftest import build_tiny_bundle
    from cxredit.bundle import load_bundle

    bundle = build_tiny_bundle(tmp_path_factory.mktemp("wplus"), encoder_space="w+")
    b = load_bundle(bundle)
    assert b.E.space == "w+"
    out = tmp_path_factory.mktemp("wplus_demo")
    assert main(["demo", "--out", str(out), "--weights", str(bundle), "--n-healthy", "5",
                 "--n-cardio", "5", "--n-project", "2", "--project-steps", "2", "--n-edit", "2",
                 "--no-progress"]) == 0
    assert "cxredit demo ->" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    files = m["directions"]["files"]  # the demo's own direction in out, the bundle's in it
    assert np.load(out / files["pair_demo"])["v"].shape == (b.G.num_ws, b.G.w_dim)
    assert np.load(bundle / files["lda"])["v"].shape == (b.G.w_dim,)
    assert len(m["edit"]["compare"]["lda"]["ctr_mean"]) == 7  # a W edit of W+ latents
    assert np.isfinite(m["reconstruction"]["encoder"]["ssim"])
    assert len(m["edit"]["ctr_mean"]) == 7 and np.isfinite(m["edit"]["ctr_mean"]).all()
