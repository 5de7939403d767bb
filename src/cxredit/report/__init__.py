"""`cxredit report RUN_DIR`: one self-contained HTML page summarising an evaluation run.

The page inlines every image as a base64 PNG data URI and carries its stylesheet inline: no
JavaScript, no CDN, no web fonts, no links out. It opens offline, can be mailed, and can be
archived next to the run.

Input: ``RUN_DIR/metrics.json``, written by ``cxredit evaluate`` / ``cxredit demo``.
The contract (format version 1) — every key except ``format`` and ``format_version`` is
optional; a missing section is rendered as "not measured in this run", never an error::

    {
     "format": "cxredit.metrics", "format_version": 1,
     "created": "2026-11-27T10:00:00Z",            # ISO 8601
     "command": "cxredit evaluate ...",             # a string, or an argv list
     "cxredit_version": "0.1.0",
     "models": {"generator": {"path": ..., "sha256": ..., "config": {...}},
                "encoder": {...}, "segmenter": {...}, "classifier": {...}},   # any names
     "data": {"store": ..., "split": ..., "n": 350, "n_healthy": 100,
              "n_cardiomegaly": 250, "phantom": true},
     "generation": {"extractor": "classifier", "fid": 12.3, "kid": 0.004, "kid_std": 0.001,
                    "n_real": 1000, "n_fake": 1000,
                    "baseline_fid": 1.2},           # real vs real (two halves), same extractor
     "reconstruction": {"encoder": {"mse", "psnr", "ssim", "ms_ssim", "n"},
                        "projection": {"mse", "psnr", "ssim", "ms_ssim", "n", "steps"}},
     "separability": {"<space, e.g. encoder or projection>": {
                        "separation": 5.1, "separation_cv": 4.9, "auc": .., "auc_cv": ..,
                        "balanced_accuracy": .., "n_pos": .., "n_neg": .., ...}},  # any scalars
     "directions": {"names": ["pair", "lda"], "cosine": [[1, 0.8], [0.8, 1]],
                    "files": {"pair": "pair.npz"}},
     "edit": {"direction": "pair", "alphas": [0, 1, 2, 3], "n": 16,
              # per-alpha lists, one value per alpha:
              "ctr_mean": [..], "ctr_std": [..], "frac_past_0_5": [..],
              "p_cardiomegaly_mean": [..],          # classifier probability (optional)
              "ssim_outside_heart": [..], "mse_outside_heart": [..],
              "ssim_true_counterfactual": [..],     # phantoms only (optional)
              "pushed_past_0_5": 0.85,              # healthy images past CTR 0.5 at some alpha
              "lec": {"mse": .., "ssim": ..}},      # latent editing consistency (optional)
     "targets": [{"name": "cross-validated separation", "value": 4.9, "target": ">= 4.8",
                  "met": true}, ...],
     "figures": {"samples": "samples.png", "real": "real.png",
                 "reconstructions": "recon.png", "separability_histogram": "sep.png",
                 "edit_sweep": "edit_sweep.png", "ctr_vs_alpha": "ctr_alpha.png"}
    }

Paths (``figures``, model paths, direction files) are relative to RUN_DIR or absolute; a
missing figure file is a note on the page. Without ``figures.ctr_vs_alpha`` the CTR plot is
drawn from ``edit.alphas``/``edit.ctr_mean`` (writers can produce the same PNG with
`ctr_alpha_figure`).

Sections, in page order, each a ``<section id=...>``: summary, samples, reconstructions,
separability, directions, edits, ctr, identity, metrics, provenance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cxredit.report.figures import ctr_alpha_figure, ctr_alpha_png
from cxredit.report.html import SECTIONS, render_page
from cxredit.report.sections import RENDERERS

__all__ = ["FORMAT", "FORMAT_VERSION", "SECTIONS", "check_metrics", "ctr_alpha_figure",
           "ctr_alpha_png", "load_metrics", "render_report", "write_report"]

FORMAT = "cxredit.metrics"
FORMAT_VERSION = 1


def check_metrics(doc: object, source: str = "metrics") -> dict:
    """Return `doc` if it is a metrics document this version reads; else a one-line ValueError
    naming `source`."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{source}: not a cxredit metrics file (format {found!r}, "
                         f"expected {FORMAT!r})")
    version = doc.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ValueError(f"{source}: unsupported metrics format_version {version!r} "
                         f"(this cxredit reads version {FORMAT_VERSION})")
    return doc


def _metrics_path(run_dir: str | os.PathLike) -> Path:
    p = Path(run_dir)
    return p if p.suffix == ".json" and not p.is_dir() else p / "metrics.json"


def load_metrics(run_dir: str | os.PathLike) -> dict:
    """Read and check RUN_DIR/metrics.json (a path to the JSON file itself is accepted too).

    Raises:
        ValueError: one line naming the file, when it is missing, not JSON, or not a
            supported cxredit metrics document.
    """
    path = _metrics_path(run_dir)
    if not path.is_file():
        raise ValueError(f"{path}: no metrics.json here (write one with `cxredit evaluate` "
                         "or `cxredit demo`)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from e
    return check_metrics(doc, str(path))


def render_report(metrics: dict, base_dir: str | os.PathLike) -> str:
    """The report page as a string.

    Args:
        metrics: a metrics document (see the module docstring).
        base_dir: folder that relative paths in `metrics` are relative to (the run folder).
    """
    return render_page(check_metrics(metrics), Path(base_dir), RENDERERS)


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Render RUN_DIR/metrics.json into a self-contained HTML file, written atomically.

    Args:
        run_dir: run folder holding metrics.json (or the metrics.json file itself).
        out: HTML file to write (default: RUN_DIR/report.html).

    Returns:
        The written path.
    """
    src = _metrics_path(run_dir)
    metrics = load_metrics(src)
    page = render_report(metrics, src.parent)
    out = Path(out) if out is not None else src.parent / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
