"""The HTML report: self-contained, every section present, robust to missing data, escaped."""

import base64
import json
import re

import numpy as np
import pytest

from cxredit.cli import main
from cxredit.report import (
    SECTIONS,
    ctr_alpha_figure,
    load_metrics,
    render_report,
    write_report,
)
from cxredit.report.figures import PNG_SIGNATURE
from cxredit.runs import save_image_grid

SECTION_IDS = [sid for sid, _ in SECTIONS]
FIGURES = {"samples": "samples.png", "real": "real.png", "reconstructions": "recon.png",
           "separability_histogram": "sep.png", "edit_sweep": "figs/edit_sweep.png",
           "ctr_vs_alpha": "ctr_alpha.png"}


def full_metrics() -> dict:
    return {
        "format": "cxredit.metrics", "format_version": 1,
        "created": "2026-11-27T10:00:00Z", "command": "cxredit evaluate runs/x <script>alert(1)"
        "</script>", "cxredit_version": "0.1.0", "seconds": 12.5,
        "models": {"generator": {"path": "runs/gan/checkpoints/ckpt-000100.json",
                                 "sha256": "ab" * 32, "config": {"resolution": 64, "w_dim": 128}},
                   "encoder": {"path": "runs/enc", "sha256": "cd" * 32,
                               "config": {"trunk": "tiny"}},
                   "segmenter": {"path": "runs/seg", "sha256": "ef" * 32}},
        "data": {"store": "stores/test", "split": "test", "n": 350, "n_healthy": 100,
                 "n_cardiomegaly": 250, "phantom": True},
        "generation": {"extractor": "classifier", "fid": 12.3456, "kid": 0.00412,
                       "kid_std": 0.00101, "n_real": 1000, "n_fake": 1000, "baseline_fid": 1.234},
        "reconstruction": {"encoder": {"mse": 0.0123, "psnr": 24.56, "ssim": 0.8123,
                                       "ms_ssim": 0.9012, "n": 350},
                           "projection": {"mse": 0.0045, "psnr": 28.91, "ssim": 0.9123,
                                          "ms_ssim": 0.9567, "n": 350, "steps": 100}},
        "separability": {"encoder": {"separation": 5.123, "separation_cv": 4.912, "auc": 0.987,
                                     "auc_cv": 0.981, "balanced_accuracy": 0.95, "n_pos": 250,
                                     "n_neg": 100, "shrinkage_used": 0.031},
                         "projection": {"separation": 4.5, "separation_cv": 4.25}},
        "directions": {"names": ["pair", "lda"], "cosine": [[1.0, 0.8123], [0.8123, 1.0]],
                       "files": {"pair": "pair.npz"}},
        "edit": {"direction": "pair", "alphas": [0, 1, 2, 3], "n": 16,
                 "ctr_mean": [0.44, 0.47, 0.51, 0.55], "ctr_std": [0.02, 0.02, 0.03, 0.03],
                 "frac_past_0_5": [0.0, 0.1, 0.6, 0.9], "pushed_past_0_5": 0.85,
                 "p_cardiomegaly_mean": [0.1, 0.3, 0.7, 0.9],
                 "ssim_outside_heart": [1.0, 0.97, 0.95, 0.93],
                 "mse_outside_heart": [0.0, 0.001, 0.002, 0.003],
                 "ssim_true_counterfactual": [0.9, 0.88, 0.86, 0.84],
                 "lec": {"mse": 0.00321, "ssim": 0.9345}},
        "targets": [{"name": "cross-validated separation", "value": 4.912, "target": ">= 4.8",
                     "met": True},
                    {"name": "FID (classifier)", "value": 12.3456, "target": "<= 10",
                     "met": False}],
        "figures": dict(FIGURES),
    }


def write_run(root, metrics: dict, figures: bool = True):
    root.mkdir(parents=True, exist_ok=True)
    if figures:
        rng = np.random.default_rng(0)
        for rel in FIGURES.values():
            save_image_grid(rng.uniform(-1, 1, (4, 1, 8, 8)), root / rel, nrow=2)
    (root / "metrics.json").write_text(json.dumps(metrics))
    return root


def img_srcs(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


def assert_self_contained(page: str) -> None:
    for bad in ("http://", "https://", 'src="/', "file:", "<script", "<link", "@import",
                "url("):
        assert bad not in page, bad
    for src in img_srcs(page):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIGNATURE)


def section(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert m, sid
    return m.group(1)


def test_full_report_has_every_section_inlined_images_and_numbers(tmp_path):
    run = write_run(tmp_path / "run", full_metrics())
    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text(encoding="utf-8")
    ids = re.findall(r'<section id="([^"]+)"', page)
    assert ids == SECTION_IDS
    assert_self_contained(page)
    assert len(img_srcs(page)) == len(FIGURES)
    assert "not found" not in page
    for number in ("12.35", "0.00412", "0.001", "1.234", "24.56", "0.9567", "4.912", "5.123",
                   "0.8123", "0.85", "0.9345", "0.00321", "350", "0.031"):
        assert number in page, number
    assert "85%" in section(page, "summary")
    assert "1 of 2 met" in section(page, "summary")
    assert 'badge met' in page and 'badge missed' in page
    assert "classifier" in section(page, "metrics") and "not comparable" in page
    prov = section(page, "provenance")
    assert "ab" * 32 in prov and "<details>" in prov and "&quot;w_dim&quot;: 128" in prov
    assert "cross-validated" in section(page, "separability")
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    head = page.split("<main>")[0]
    assert "Synthetic images." in head and "none is for diagnosis" in head
    assert "Unfinished evaluation" not in page


def test_table_rows_have_words_not_raw_keys(tmp_path):
    m = full_metrics()
    m["separability"]["encoder"].update(balanced_accuracy_in_sample=0.97, rank_deficient=False,
                                        some_new_key=1.5)
    page = write_report(write_run(tmp_path / "run", m)).read_text(encoding="utf-8")
    sep = section(page, "separability")
    assert "balanced accuracy (in-sample)" in sep and "some new key" in sep
    assert "balanced_accuracy_in_sample" not in sep and "some_new_key" not in sep


def test_strings_are_escaped(tmp_path):
    m = full_metrics()
    m["models"]["generator"]["config"]["note"] = "</pre><b>x</b>"
    m["targets"][0]["name"] = "a & b <i>"
    page = render_report(m, write_run(tmp_path / "run", m))
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>x</b>" not in page and "a &amp; b &lt;i&gt;" in page


def test_ctr_plot_is_drawn_from_numbers_when_no_figure(tmp_path):
    m = full_metrics()
    del m["figures"]["ctr_vs_alpha"]
    page = render_report(m, write_run(tmp_path / "run", m))
    ctr = section(page, "ctr")
    srcs = img_srcs(ctr)
    assert len(srcs) == 1 and "drawn from metrics.json" in ctr
    assert_self_contained(page)
    assert "0.55" in ctr and "0.9" in ctr  # the per-alpha table


def test_ctr_figure_listed_but_missing_falls_back_to_drawing(tmp_path):
    m = full_metrics()
    run = write_run(tmp_path / "run", m)
    (run / FIGURES["ctr_vs_alpha"]).unlink()
    (run / FIGURES["samples"]).unlink()
    page = render_report(m, run)
    assert len(img_srcs(section(page, "ctr"))) == 1
    assert "samples.png not found" in section(page, "samples")
    assert len(img_srcs(section(page, "samples"))) == 1  # the real grid is still there


def test_ctr_alpha_figure_writes_a_png(tmp_path):
    edit = full_metrics()["edit"]
    path = ctr_alpha_figure(edit, tmp_path / "sub" / "ctr.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    only_ctr = {"alphas": [0, 1], "ctr_mean": [0.4, 0.6]}  # no std, no SSIM: one panel
    assert ctr_alpha_figure(only_ctr, tmp_path / "one.png").stat().st_size > 0
    with pytest.raises(ValueError, match="ctr_std"):
        ctr_alpha_figure({**only_ctr, "ctr_std": [0.1]}, tmp_path / "bad.png")


def test_minimal_metrics_render_every_section_with_notes(tmp_path):
    run = write_run(tmp_path / "run", {"format": "cxredit.metrics", "format_version": 1},
                    figures=False)
    page = write_report(run).read_text(encoding="utf-8")
    assert re.findall(r'<section id="([^"]+)"', page) == SECTION_IDS
    for sid in SECTION_IDS:
        assert "not measured in this run" in section(page, sid), sid
    assert not img_srcs(page)
    assert_self_contained(page)
    assert "Unfinished evaluation" in page.split("<main>")[0]  # no "seconds": it stopped early


def test_malformed_sections_become_notes_not_crashes(tmp_path):
    m = {"format": "cxredit.metrics", "format_version": 1, "edit": {"alphas": [0, 1],
         "ctr_mean": [0.4], "ssim_outside_heart": "high"}, "directions": {"names": ["a"],
         "cosine": [[1, 2]]}, "targets": "none", "separability": [1, 2], "models": {"g": "x"},
         "figures": {"samples": "../nowhere.png", "real": 3}}
    page = render_report(m, tmp_path)
    assert re.findall(r'<section id="([^"]+)"', page) == SECTION_IDS
    assert "CTR plot could not be drawn" in section(page, "ctr")
    assert "does not have one value per alpha" in section(page, "identity")


@pytest.mark.parametrize("doc, match", [
    (None, "no metrics.json"),
    ({"format": "something.else", "format_version": 1}, "not a cxredit metrics file"),
    ({"format": "cxredit.metrics", "format_version": 99}, "unsupported metrics format_version"),
    ("not json", "not valid JSON"),
])
def test_bad_metrics_give_a_one_line_error_naming_the_file(tmp_path, doc, match):
    if doc is not None:
        text = doc if isinstance(doc, str) else json.dumps(doc)
        (tmp_path / "metrics.json").write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        load_metrics(tmp_path)
    assert "\n" not in str(e.value) and "metrics.json" in str(e.value)


def test_cli_end_to_end(tmp_path, capsys):
    run = write_run(tmp_path / "run", full_metrics())
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert_self_contained((run / "report.html").read_text(encoding="utf-8"))
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    # Relative figure paths resolve against the run folder, not the output folder.
    assert len(img_srcs(out.read_text(encoding="utf-8"))) == len(FIGURES)


def test_cli_error_is_one_line(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text(json.dumps({"format": "other"}))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "metrics.json" in err and "not a cxredit metrics" in err
