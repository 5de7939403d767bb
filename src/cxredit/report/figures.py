"""Figures of the report: the CTR-vs-alpha plot and images turned into data URIs.

Matplotlib draws on its own Agg canvas (never pyplot's global state), so the report can be
written from any thread or a headless server. PNGs are saved without matplotlib's
"Software" text chunk: the report is byte-for-byte reproducible from the same metrics.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_data_uri(data: bytes) -> str:
    """`data:image/png;base64,...` for PNG bytes."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not PNG data")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_data_uri(path: str | os.PathLike) -> str:
    """A PNG data URI of an image file; other formats (JPEG, ...) are converted to PNG.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is not an image Pillow can open.
    """
    data = Path(path).read_bytes()
    if data.startswith(PNG_SIGNATURE):
        return png_data_uri(data)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except UnidentifiedImageError as e:
        raise ValueError(f"{path}: not an image") from e
    return png_data_uri(buf.getvalue())


def _series(edit: dict, key: str, n: int) -> np.ndarray | None:
    """edit[key] as float [n], None when absent; a ValueError when its length is not n."""
    value = edit.get(key)
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.shape != (n,):
        raise ValueError(f"edit.{key} has {arr.size} values for {n} alphas")
    return arr


def ctr_alpha_png(edit: dict) -> bytes:
    """PNG bytes of the CTR-vs-alpha figure of an `edit` section of metrics.json.

    Left panel: mean CTR of the edited healthy images against the edit strength alpha, a
    +-1 std band, the 0.5 cardiomegaly threshold (dashed) and, on a second axis, the fraction
    of images past it. Right panel (when measured): SSIM outside the heart to the unedited
    image and, for phantoms, SSIM to the true counterfactual.

    Args:
        edit: dict with `alphas` and `ctr_mean` (same length); optional `ctr_std`,
            `frac_past_0_5`, `ssim_outside_heart`, `ssim_true_counterfactual`, `direction`, `n`.

    Raises:
        ValueError: `alphas`/`ctr_mean` missing or of different lengths.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if edit.get("alphas") is None or edit.get("ctr_mean") is None:
        raise ValueError("edit needs 'alphas' and 'ctr_mean' to draw CTR vs alpha")
    alphas = np.asarray(edit["alphas"], dtype=np.float64).reshape(-1)
    n = alphas.size
    ctr = _series(edit, "ctr_mean", n)
    std = _series(edit, "ctr_std", n)
    frac = _series(edit, "frac_past_0_5", n)
    identity = [(label, s, color) for label, s, color in (
        ("SSIM outside the heart", _series(edit, "ssim_outside_heart", n), "tab:blue"),
        ("SSIM to true counterfactual", _series(edit, "ssim_true_counterfactual", n),
         "tab:green")) if s is not None]

    fig = Figure(figsize=(10 if identity else 5.5, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if identity else 1, squeeze=False)[0]
    ax = axes[0]
    if std is not None:
        ax.fill_between(alphas, ctr - std, ctr + std, color="tab:red", alpha=0.2,
                        label="mean ± 1 std")
    ax.plot(alphas, ctr, "o-", color="tab:red", label="mean CTR")
    ax.axhline(0.5, color="0.3", ls="--", lw=1, label="cardiomegaly threshold 0.5")
    lo, hi = ax.get_ylim()
    ax.set_ylim(min(lo, 0.48), max(hi, 0.52))  # the threshold stays in view
    ax.set_xlabel("edit strength α")
    ax.set_ylabel("cardiothoracic ratio")
    who = f"{edit['direction']} direction" if edit.get("direction") else "edit"
    count = f", n={edit['n']}" if edit.get("n") is not None else ""
    ax.set_title(f"CTR vs α ({who}{count})", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    if frac is not None:
        ax2 = ax.twinx()
        (line,) = ax2.plot(alphas, frac, ":", marker="s", ms=3, color="0.35")
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel("fraction past 0.5")
        handles.append(line)
        labels.append("fraction past 0.5")
    ax.legend(handles, labels, fontsize=8, loc="upper left")
    if identity:
        ax = axes[1]
        for label, s, color in identity:
            ax.plot(alphas, s, "o-", color=color, label=label)
        vals = np.concatenate([np.asarray(s, float).ravel() for _, s, _ in identity])
        low = float(vals[np.isfinite(vals)].min()) if np.isfinite(vals).any() else float("nan")
        ax.set_ylim(max(0.0, np.floor((low - 0.05) * 10) / 10) if np.isfinite(low) else 0, 1.02)
        ax.set_xlabel("edit strength α")
        ax.set_ylabel("SSIM")
        ax.set_title("identity kept outside the heart", fontsize=10)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def ctr_alpha_figure(edit: dict, path: str | os.PathLike) -> Path:
    """Write the CTR-vs-alpha figure (see `ctr_alpha_png`) as a PNG, atomically.

    Args:
        edit: the `edit` section of metrics.json.
        path: PNG file to write (parent folders are created).

    Returns:
        The written path.
    """
    data = ctr_alpha_png(edit)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
