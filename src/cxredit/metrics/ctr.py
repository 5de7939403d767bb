"""Cardiothoracic ratio (CTR) and Dice from heart/lung masks (numpy or torch, batched).

Geometry (pixel j spans [j, j+1] in x, so edges are integer positions):

- MRD: greatest horizontal extent of the heart to the patient's right (image left) of the
  midline = max(midline - left edge of the heart, 0);
- MLD: the same to the patient's left (image right) = max(right edge of the heart - midline, 0);
- ID: greatest internal thoracic width = max over rows holding both lungs of
  (outer edge of the left lung, on image right) - (outer edge of the right lung, on image left);
- CTR = (MRD + MLD) / ID.

This is `cxredit.data.phantom.ctr_from_masks`, batched and with a default midline.

Default midline (no spine position known): the middle between the lungs' outer edges at the
row of ID. We chose the thoracic centre over the centre between the lungs' inner edges because
the inner edges are the heart borders themselves (the heart mask hides the lung behind it), so
an inner-edge midline would move with the very heart enlargement that CTR is meant to measure.
"""

from __future__ import annotations

import numpy as np

from cxredit.data.phantom import MASK_NAMES  # channel order

__all__ = ["MASK_NAMES", "ctr", "dice"]


def _numpy_bool(masks) -> np.ndarray:
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    return np.asarray(masks).astype(bool, copy=False)


def _first(a: np.ndarray) -> np.ndarray:
    """Index of the first True along the last axis (0 where none)."""
    return np.argmax(a, axis=-1)


def _past_last(a: np.ndarray) -> np.ndarray:
    """One past the index of the last True along the last axis (R where none)."""
    return a.shape[-1] - np.argmax(a[..., ::-1], axis=-1)


def ctr(masks, midline: float | np.ndarray | None = None) -> dict:
    """CTR and its parts from heart/lung masks.

    Args:
        masks: bool/uint8 (numpy or torch) [N,3,R,R] or [3,R,R] in `MASK_NAMES` order.
        midline: midline x in pixel units (pixel j spans [j, j+1]): a float, an array [N], or
            None for the middle between the lungs' outer edges at the row of ID.

    Returns:
        dict with "ctr", "mrd", "mld", "id" and "midline" (pixels): float64 arrays [N] for
        batched input, floats for a single [3,R,R] mask set. NaN where the heart or a row with
        both lungs is missing (MRD/MLD stay defined when only the lungs are missing but a
        midline was given).
    """
    m = _numpy_bool(masks)
    single = m.ndim == 3
    if single:
        m = m[None]
    if m.ndim != 4 or m.shape[1] != 3 or m.shape[2] != m.shape[3]:
        raise ValueError(f"masks must be [N,3,R,R] or [3,R,R] (heart, right_lung, left_lung), "
                         f"got {tuple(np.shape(masks))}")
    N = m.shape[0]
    heart, right, left = m[:, 0], m[:, 1], m[:, 2]

    # ID: per row, left lung's outer (image-right) edge - right lung's outer (image-left) edge
    both = right.any(-1) & left.any(-1)  # [N,R] rows holding both lungs
    r_edge = _first(right).astype(np.float64)  # [N,R]
    l_edge = _past_last(left).astype(np.float64)
    width = np.where(both, l_edge - r_edge, -np.inf)
    row = np.argmax(width, axis=-1)  # first row of greatest width
    has_lungs = both.any(-1)
    take = np.arange(N)
    thoracic = np.where(has_lungs, width[take, row], np.nan)

    if midline is None:
        mid = np.where(has_lungs, (r_edge[take, row] + l_edge[take, row]) / 2, np.nan)
    else:
        mid = np.broadcast_to(np.asarray(midline, np.float64), (N,)).copy()

    cols = heart.any(-2)  # [N,R] columns holding heart
    has_heart = cols.any(-1)
    h_left = _first(cols).astype(np.float64)
    h_right = _past_last(cols).astype(np.float64)
    mrd = np.where(has_heart, np.maximum(mid - h_left, 0.0), np.nan)
    mld = np.where(has_heart, np.maximum(h_right - mid, 0.0), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (mrd + mld) / thoracic
    ratio = np.where(has_heart & has_lungs, ratio, np.nan)
    out = {"ctr": ratio, "mrd": mrd, "mld": mld, "id": thoracic, "midline": mid}
    if single:
        return {k: float(v[0]) for k, v in out.items()}
    return out


def dice(pred, target, empty: float = 1.0) -> np.ndarray:
    """Dice overlap 2|P & T| / (|P| + |T|) per image and mask.

    Args:
        pred: bool/uint8 (numpy or torch) [N,C,R,R] or [C,R,R] (C = 3 for heart, lungs).
        target: same shape.
        empty: value where both masks are empty (default 1: nothing to find, nothing found).

    Returns:
        float64 [N,C] (or [C] for unbatched input).
    """
    p, t = _numpy_bool(pred), _numpy_bool(target)
    if p.shape != t.shape or p.ndim not in (3, 4):
        raise ValueError(f"pred and target must both be [N,C,R,R] or [C,R,R], got {p.shape} "
                         f"and {t.shape}")
    inter = (p & t).sum((-2, -1)).astype(np.float64)
    total = (p.sum((-2, -1)) + t.sum((-2, -1))).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2 * inter / total, empty)


def measure_ctr(segmenter, images: list[str] | None = None, store=None, split: str | None = None,
                query: str | None = None, out=None, overlay_dir=None, device: str | None = None,
                batch: int = 64) -> list[dict]:
    """CTR of X-rays from segmenter masks; the API of `cxredit ctr`.

    Args:
        segmenter: segmenter run folder or checkpoint.
        images: image files, or
        store: a store (rows selected by `split` / `query`).
        out: optional CSV (id, ctr, mrd, mld, id_width, midline), written atomically.
        overlay_dir: optional PNGs of each image with its heart and lung masks outlined.
        device: torch device.

    Returns:
        One dict per image: id, ctr, mrd, mld, id_width, midline (pixels).
    """
    import os
    from pathlib import Path

    import pandas as pd
    import torch

    from cxredit.data.store import select_images
    from cxredit.train.segmenter import load_segmenter, predict_masks

    if (images is None) == (store is None):
        raise ValueError("give either --images or --store")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seg = load_segmenter(segmenter, dev)
    sel = select_images(seg.config["resolution"], images, store, split, query,
                        model="the segmenter expects", purpose="to measure")
    ids = sel.ids
    x = sel.fetch(range(len(ids)))
    masks = predict_masks(seg, x.to(dev), batch=batch).cpu().numpy()
    m = ctr(masks)
    res = [{"id": i, "ctr": float(m["ctr"][k]), "mrd": float(m["mrd"][k]),
            "mld": float(m["mld"][k]), "id_width": float(m["id"][k]),
            "midline": float(m["midline"][k])} for k, i in enumerate(ids)]
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(res).to_csv(out.with_suffix(".tmp"), index=False)
        os.replace(out.with_suffix(".tmp"), out)
    if overlay_dir:
        from scipy.ndimage import binary_erosion

        from cxredit.data.io import output_stems, read_png_text, write_png

        for k, (i, name) in enumerate(zip(ids, output_stems(ids, rows=store is not None))):
            img = (x[k, 0].numpy() + 1) / 2
            for c, value in ((0, 1.0), (1, 0.0), (2, 0.0)):  # heart white, lungs black outline
                edge = masks[k, c] & ~binary_erosion(masks[k, c])
                img = np.where(edge, value, img)
            prov = {"Description": f"cxredit CTR overlay, CTR {res[k]['ctr']:.3f}"}
            if store is None and Path(i).suffix.lower() == ".png":
                # an overlay of a cxredit edit is as synthetic as the edit: keep its marks
                src = {k2: v for k2, v in read_png_text(i).items() if k2.startswith("cxredit:")}
                if src.get("cxredit:synthetic") == "true":
                    prov = {**src, "Description": "SYNTHETIC EDIT made by cxredit, with its CTR "
                            f"overlay (CTR {res[k]['ctr']:.3f}); not for diagnosis"}
            write_png(Path(overlay_dir) / f"{name}_ctr.png", img, provenance=prov)
    return res
