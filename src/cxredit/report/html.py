"""The HTML of the report: one self-contained page, one `<section id=...>` per topic.

Every string taken from metrics.json goes through `esc` (html.escape) before it reaches the
page; numbers go through `fmt` (3-4 significant digits). A section whose data is missing
shows a short "not measured in this run" note; one whose data is malformed shows what went
wrong, so a half-finished run still gets a report.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cxredit.report.figures import ctr_alpha_png, image_data_uri, png_data_uri

log = logging.getLogger(__name__)

NOT_MEASURED = "not measured in this run"

# (id, title) in page order; the ids are stable (tests and links rely on them).
SECTIONS = (("summary", "Summary"), ("samples", "Generated and real images"),
            ("reconstructions", "Reconstructions"), ("separability", "Separability"),
            ("directions", "Directions"), ("edits", "Edits"), ("ctr", "CTR vs edit strength"),
            ("identity", "Identity preservation"), ("metrics", "Generation metrics"),
            ("provenance", "Provenance"))

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 color:#1d2330;background:#f6f7f9;margin:0}
header,main,footer{max-width:1100px;margin:0 auto;padding:0 20px}
header{padding-top:18px}h1{font-size:1.6em;margin:.2em 0}.sub{color:#5b6475;margin:0}
nav{margin:10px 0 4px}nav a{margin-right:12px;color:#2456a6;text-decoration:none}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:6px 20px 16px;
 margin:16px 0}h2{font-size:1.25em;border-bottom:1px solid #eceef2;padding-bottom:4px}
h3{font-size:1.05em;margin:1.1em 0 .4em}h4{margin:.9em 0 .3em}
table{border-collapse:collapse;margin:8px 0;font-size:.93em}
th,td{border-bottom:1px solid #e6e8ee;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f1f3f6;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#6b7385;font-style:italic;margin:6px 0}.warn{background:#fff6e0;
 border-left:4px solid #e0a800;padding:6px 10px;margin:8px 0}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:.85em;
 background:#e6e8ee;color:#333}.badge.met{background:#d8f3dc;color:#176b2c}
.badge.missed{background:#fde0e0;color:#9b1c1c}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{border:1px solid #e1e4ea;border-radius:6px;padding:8px 12px;min-width:150px}
.card .v{font-size:1.35em;font-weight:600;font-variant-numeric:tabular-nums}
.card .k{color:#5b6475;font-size:.85em}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:8px 0}figure img{max-width:100%;image-rendering:pixelated;
 border:1px solid #e1e4ea}figcaption{color:#5b6475;font-size:.88em}
.extractor{font-size:1.1em}code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;
 font-size:.88em}pre{background:#f6f7f9;padding:8px;overflow-x:auto}
footer{color:#8a92a3;font-size:.85em;padding-bottom:24px}
"""


class Safe(str):
    """Text that is already safe HTML (built by this module from escaped parts)."""


def esc(value: object) -> str:
    """HTML-escaped text of any value (quotes included: safe inside attributes too)."""
    return html.escape(str(value), quote=True)


def fmt(value: object) -> str:
    """Safe HTML text of a metric value: 3-4 significant digits, '—' for None."""
    if value is None:
        return "—"
    if isinstance(value, Safe):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return f"<code>{esc(json.dumps(value, sort_keys=True))}</code>"
    return esc(value)


def _is_num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def td(value: object) -> str:
    return f'<td class="num">{fmt(value)}</td>' if _is_num(value) else f"<td>{fmt(value)}</td>"


def table(head: list[str], rows: list[list[str]], num_cols: set[int] | None = None) -> str:
    """A table from escaped header texts and rows of ready cells (`td`, or `<th>` row labels).

    `num_cols`: columns whose header is right-aligned over numbers (default: all but the first).
    """
    num_cols = set(range(1, len(head))) if num_cols is None else num_cols
    ths = "".join(f'<th class="num">{h}</th>' if i in num_cols else f"<th>{h}</th>"
                  for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{ths}</tr></thead><tbody>{body}</tbody></table>"


def note(text: str) -> str:
    """A muted note; `text` must already be safe HTML."""
    return f'<p class="note">{text}</p>'


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


# Words for metrics.json keys that tables show without a label of their own.
KEY_WORDS = {
    "balanced_accuracy_in_sample": "balanced accuracy (in-sample)",
    "rank_deficient": "within-class covariance singular (shrinkage needed)",
    "baseline_kid": "baseline KID (real vs real)",
    "baseline_fid": "baseline FID (real vs real)",
    "latent_rel": "latent change after the round trip (relative)",
    "kid_std": "KID std", "n_real": "real images", "n_fake": "generated images",
}


def pretty_key(key: object) -> str:
    """A readable row name for a metrics.json key: `KEY_WORDS`, else underscores as spaces."""
    return KEY_WORDS.get(str(key), str(key).replace("_", " "))


def kv_table(items: list[tuple[str, object]]) -> str:
    """Two-column (what, value) table of the items whose value is present."""
    rows = [[f"<th>{esc(pretty_key(k))}</th>", td(v)] for k, v in items if v is not None]
    return f"<table><tbody>{''.join('<tr>' + ''.join(r) + '</tr>' for r in rows)}</tbody></table>"


def keyed_table(columns: dict[str, dict], order: tuple[str, ...], labels: dict[str, str],
                col_labels: dict[str, str] | None = None) -> str:
    """Rows = union of the scalar keys of the column dicts (`order` first), columns = dicts."""
    keys = [k for k in order if any(k in c for c in columns.values())]
    for c in columns.values():
        keys += [k for k, v in c.items() if k not in keys and _is_scalar(v)]
    head = ["metric"] + [esc((col_labels or {}).get(name, name)) for name in columns]
    rows = [[f"<th>{esc(labels.get(k, pretty_key(k)))}</th>"] +
            [td(c.get(k)) for c in columns.values()]
            for k in keys]
    return table(head, rows)


def per_alpha_table(edit: dict, series: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """Table with one row per alpha and one column per series present with the right length.

    Returns the table ('' when no series is present) and notes on malformed series.
    """
    alphas = edit.get("alphas")
    if not isinstance(alphas, list) or not alphas:
        return "", []
    cols, notes = [], []
    for key, label in series:
        v = edit.get(key)
        if v is None:
            continue
        if not isinstance(v, list) or len(v) != len(alphas):
            notes.append(note(f"edit.{esc(key)} does not have one value per alpha; not shown"))
            continue
        cols.append((label, v))
    if not cols:
        return "", notes
    rows = [[td(a)] + [td(v[i]) for _, v in cols] for i, a in enumerate(alphas)]
    head = ["α"] + [esc(label) for label, _ in cols]
    return table(head, rows, num_cols=set(range(len(head)))), notes


@dataclass
class Context:
    """What every section renderer needs besides the metrics."""

    metrics: dict
    base_dir: Path

    @property
    def figures(self) -> dict:
        return _dict(self.metrics.get("figures"))

    def section(self, key: str) -> dict:
        return _dict(self.metrics.get(key))

    def resolve(self, rel: object) -> Path:
        p = Path(str(rel))
        return p if p.is_absolute() else self.base_dir / p

    def figure(self, key: str, caption: str) -> str:
        """`<figure>` with figures[key] inlined, or a note when absent/missing/unreadable."""
        rel = self.figures.get(key)
        if not rel:
            return note(f"{esc(caption)}: {NOT_MEASURED}")
        path = self.resolve(rel)
        if not path.is_file():
            return note(f"{esc(caption)}: figure file {esc(rel)} not found")
        try:
            uri = image_data_uri(path)
        except (OSError, ValueError) as e:
            return note(f"{esc(caption)}: figure {esc(rel)} could not be read ({esc(e)})")
        return figure_html(uri, caption)


def command_text(metrics: dict) -> str | None:
    """The recorded command line (a string, or an argv list joined shell-style)."""
    command = metrics.get("command")
    if isinstance(command, list):
        return shlex.join(str(c) for c in command)
    return None if command is None else str(command)


def _png_width(uri: str) -> int | None:
    """Width from the IHDR chunk of a base64 PNG data URI (no full decode)."""
    try:
        head = base64.b64decode(uri.split(",", 1)[1][:32])
        return int.from_bytes(head[16:20], "big") if head[:8] == b"\x89PNG\r\n\x1a\n" else None
    except (ValueError, IndexError):
        return None


def figure_html(uri: str, caption: str) -> str:
    # Grids of 16-64 px images are tiny on screen: show them enlarged by an integer factor
    # (pixelated, so no interpolation invents detail).
    width = _png_width(uri)
    style = f' style="width:{width * min(8, 480 // width)}px"' if width and width < 240 else ""
    return (f'<figure><img src="{uri}" alt="{esc(caption)}"{style}>'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def render_page(metrics: dict, base_dir: Path, sections: dict[str, Callable[[Context], str]]
                ) -> str:
    """The whole page: header, navigation, every section of SECTIONS, footer."""
    ctx = Context(metrics, Path(base_dir))
    parts = []
    for sid, title in SECTIONS:
        try:
            body = sections[sid](ctx)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            # A malformed section must not cost the user the rest of the report.
            log.warning("report section %s: %s", sid, e)
            body = note(f"this section could not be rendered from metrics.json: {esc(e)}")
        parts.append(f'<section id="{sid}"><h2>{esc(title)}</h2>{body}</section>')
    sub = " · ".join(esc(x) for x in (metrics.get("created"), command_text(metrics)) if x)
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title in SECTIONS)
    version = metrics.get("cxredit_version")
    notices = ('<p class="warn"><b>Synthetic images.</b> Every sample, reconstruction and edit '
               "on this page was made by a generative model (cxredit; each PNG also carries "
               "this in its metadata): none is a real radiograph, and none is for "
               "diagnosis.</p>")
    if "seconds" not in metrics:  # written last: without it, the run stopped part-way
        notices += ('<p class="warn"><b>Unfinished evaluation.</b> metrics.json holds only the '
                    "stages finished before the run stopped; run it again (finished work is "
                    "reused) to complete this report.</p>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>cxredit report: {esc(Path(base_dir).resolve().name)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<header><h1>cxredit evaluation report</h1><p class=\"sub\">{sub}</p>"
        f"<nav>{nav}</nav>{notices}</header><main>{''.join(parts)}</main>"
        f"<footer>Written by cxredit report from metrics.json"
        f"{' of cxredit ' + esc(version) if version else ''}. Self-contained: every image is "
        "inlined; the file opens offline.</footer></body></html>\n")


def ctr_plot_uri(edit: dict) -> str:
    """Data URI of the CTR-vs-alpha figure drawn from the numbers of the edit section."""
    return png_data_uri(ctr_alpha_png(edit))
