"""Latent files: `.npz` with `w` ([N, w_dim] "w" or [N, num_ws, w_dim] "w+") and `ids`,
plus a JSON sidecar (same name, `.json`) naming the generator checkpoint (with its sha256),
the space and how the latents were obtained. Written atomically.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from cxredit import __version__

LATENTS_FORMAT_VERSION = 1


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def read_sidecar(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a latents/direction `.npz` ({} when there is none); a damaged one
    is a one-line error naming it."""
    side = sidecar_path(path)
    if not side.exists():
        return {}
    try:
        info = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{side}: not a valid sidecar JSON ({e})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{side}: not a valid sidecar JSON (not an object)")
    return info


def save_latents(path: str | os.PathLike, w: np.ndarray, ids: list[str], info: dict,
                 **arrays: np.ndarray) -> Path:
    """Write latents + sidecar.

    Args:
        path: `.npz` file.
        w: [N, w_dim] or [N, num_ws, w_dim] float32.
        ids: N identifiers (store rows or file paths).
        info: sidecar fields; must contain "generator" ({"path", "sha256"}) and "method".
        **arrays: extra per-image arrays (e.g. ssim, psnr) of length N.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: latents must be written to a .npz file")
    w = np.asarray(w, np.float32)
    if w.ndim not in (2, 3) or len(w) != len(ids):
        raise ValueError(f"w must be [N, w_dim] or [N, num_ws, w_dim] with N = {len(ids)} ids, "
                         f"got {list(w.shape)}")
    for k, v in arrays.items():
        if len(v) != len(ids):
            raise ValueError(f"array {k!r} has {len(v)} rows, expected {len(ids)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, w=w, ids=np.asarray(ids, dtype=str), **arrays)
    os.replace(tmp, path)
    side = {"format": "cxredit.latents", "format_version": LATENTS_FORMAT_VERSION,
            "space": "w" if w.ndim == 2 else "w+", "count": len(ids), "w_dim": int(w.shape[-1]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cxredit": __version__, **info}
    stmp = sidecar_path(path).with_suffix(".json.tmp")
    stmp.write_text(json.dumps(side, indent=2))
    os.replace(stmp, sidecar_path(path))
    return path


def load_latents(path: str | os.PathLike) -> tuple[np.ndarray, list[str], dict, dict]:
    """Read latents.

    Returns:
        (w, ids, sidecar info, extra arrays).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: latents file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - numpy raises several types for bad files
        raise ValueError(f"{path}: not a readable .npz ({e})") from None
    if "w" not in data or "ids" not in data:
        raise ValueError(f"{path}: not a cxredit latents file (needs 'w' and 'ids')")
    info = read_sidecar(path)
    w, ids = data.pop("w"), [str(i) for i in data.pop("ids")]
    if not ids:
        raise ValueError(f"{path}: holds no latents (0 rows)")
    return w, ids, info, data
