"""Make I* without Photoshop: enlarge the cardiac silhouette of an X-ray by a smooth warp.

The paper obtains I* by editing an image by hand. Here a displacement field widens the heart
transversely: each row is pushed outward from the heart's centre by

    x' = x + g(y) * D(x),   D(x) = k_side * (x - c) * (1 - t^2)^2,  t = (x - c) / (rho * hw)

where c and hw are the heart's horizontal centre and half width, rho sets how far the
displacement reaches (exactly zero beyond rho * hw: compact support, so pixels away from the
heart are untouched), and g(y) is 1 over the heart's height and fades smoothly to 0 above and
below it. `k_side` differs between sides: by default the patient's left border (image right)
moves twice as far as the right border, as in left-ventricular enlargement. Every row map is
strictly increasing when k < 1.25 (the minimum of d/dt [t (1 - t^2)^2] is -0.8), so the warp is
invertible; it is applied by inverting each row map numerically (backward warping).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

RHO = 2.5  # reach of the displacement in heart half-widths
_K_MAX = 1.2  # safety margin below 1.25, where a row map stops being monotonic


@dataclass(frozen=True)
class HeartBox:
    """Heart bounding box in pixels (x0, y0 inclusive; x1, y1 exclusive)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> HeartBox:
        """Bounding box of a boolean heart mask [H,W]."""
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            raise ValueError("the heart mask is empty")
        return cls(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))

    @classmethod
    def parse(cls, text: str) -> HeartBox:
        """From "x0,y0,x1,y1"."""
        try:
            x0, y0, x1, y1 = (float(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"--heart-box must be x0,y0,x1,y1, got {text!r}") from None
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"--heart-box {text!r}: x1 > x0 and y1 > y0 are required")
        return cls(x0, y0, x1, y1)


def _smoothstep(u: np.ndarray) -> np.ndarray:
    u = np.clip(u, 0.0, 1.0)
    return u * u * (3 - 2 * u)


def row_maps(shape: tuple[int, int], box: HeartBox, scale: float,
             left_share: float = 2 / 3) -> tuple[np.ndarray, np.ndarray]:
    """Forward displacement of every pixel column, per row.

    Args:
        shape: (H, W).
        box: heart box.
        scale: wanted heart width ratio after/before (e.g. 1.25).
        left_share: share of the widening on the patient's left (image right) border.

    Returns:
        (g [H] vertical weights, D [W] horizontal displacement at full weight) so that
        x' = x + g[y] * D[x].
    """
    if not 1.0 <= scale <= 2.0:
        raise ValueError(f"--scale must be between 1 and 2, got {scale}")
    if not 0.0 <= left_share <= 1.0:
        raise ValueError(f"left share must be in [0, 1], got {left_share}")
    h, w = shape
    c = (box.x0 + box.x1 - 1) / 2
    hw = max((box.x1 - box.x0) / 2, 1.0)
    cy = (box.y0 + box.y1 - 1) / 2
    hh = max((box.y1 - box.y0) / 2, 1.0)
    # border displacement wanted: (scale - 1) * width, split between the two sides
    bump_at_border = (1 - (1 / RHO) ** 2) ** 2
    k_right = (scale - 1) * 2 * left_share / bump_at_border  # image right = patient's left
    k_left = (scale - 1) * 2 * (1 - left_share) / bump_at_border
    if max(k_left, k_right) > _K_MAX:
        limit = 1 + _K_MAX * bump_at_border / (2 * max(left_share, 1 - left_share))
        raise ValueError(f"--scale {scale} is too large for an invertible warp "
                         f"(at most {limit:.2f} with this left share)")
    x = np.arange(w, dtype=np.float64)
    t = (x - c) / (RHO * hw)
    bump = np.where(np.abs(t) < 1, (1 - t**2) ** 2, 0.0)
    D = np.where(x >= c, k_right, k_left) * (x - c) * bump
    s = np.abs(np.arange(h, dtype=np.float64) - cy) / (1.5 * hh)
    g = 1 - _smoothstep((s - 0.5) / 0.5)  # flat over the heart, 0 beyond 1.5 half-heights
    return g, D


def enlarge_heart(image: np.ndarray, box: HeartBox, scale: float = 1.25,
                  left_share: float = 2 / 3, masks: np.ndarray | None = None,
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Widen the heart of `image` by `scale` with a smooth, invertible warp.

    Args:
        image: float [H,W] (any range).
        box: heart bounding box (from a mask, the user, or a segmenter).
        scale: wanted heart width ratio.
        left_share: share of the widening on the patient's left border (image right).
        masks: optional [C,H,W] masks warped the same way (nearest neighbour).

    Returns:
        (warped image [H,W] float32, warped masks [C,H,W] uint8 or None). Pixels whose row map
        is the identity (outside the displacement's support) are returned bit-identical.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    h, w = image.shape
    if not (0 <= box.x0 < box.x1 <= w and 0 <= box.y0 < box.y1 <= h):
        raise ValueError(f"heart box {box.x0:g},{box.y0:g},{box.x1:g},{box.y1:g} does not lie "
                         f"inside the {w}x{h} image")
    g, D = row_maps((h, w), box, scale, left_share)
    x = np.arange(w, dtype=np.float64)
    src_x = np.empty((h, w))
    for y in range(h):  # invert x' = x + g D(x) per row (monotonic): source column per output
        src_x[y] = x if g[y] == 0 else np.interp(x, x + g[y] * D, x)
    src_y = np.repeat(np.arange(h, dtype=np.float64)[:, None], w, axis=1)
    moved = np.abs(src_x - x[None, :]) > 1e-9
    out = image.astype(np.float32).copy()
    warped = map_coordinates(image.astype(np.float64), [src_y, src_x], order=3, mode="nearest")
    # cubic interpolation may overshoot: keep the image's own range
    out[moved] = np.clip(warped[moved], image.min(), image.max()).astype(np.float32)
    out_masks = None
    if masks is not None:
        out_masks = np.stack([map_coordinates(m.astype(np.float64), [src_y, src_x], order=0,
                                              mode="nearest") for m in masks]).astype(np.uint8)
    return out, out_masks
