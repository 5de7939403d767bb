"""Worker-process entry points of `cxredit.data.prepare`.

Kept in a module that imports neither torch nor pandas: worker processes are spawned, and
each re-imports the module its function lives in, so a light module starts in a fraction of
a second instead of paying for torch in every worker.
"""

from __future__ import annotations


def convert_chunk(rows: list[int], paths: list[str], resolution: int,
                  mask_paths: list[tuple[str, ...]] | None = None) -> list[tuple]:
    """Read + resize a chunk of files (and their masks, when `mask_paths` is given).

    Returns:
        (row, uint8 [R,R] | None, uint8 [3,R,R] | None, error reason) per row; the masks are
        None without `mask_paths`, the image and masks are None when the row failed.
    """
    from cxredit.data.io import XrayReadError, read_xray_resized

    out = []
    for k, (row, path) in enumerate(zip(rows, paths)):
        try:
            img = read_xray_resized(path, resolution)
            masks = None if mask_paths is None else read_masks(path, mask_paths[k], resolution)
            out.append((row, img, masks, ""))
        except (XrayReadError, MaskError) as e:
            out.append((row, None, None, e.reason))
        except Exception as e:  # noqa: BLE001 - one bad file must never stop the job
            out.append((row, None, None, f"{type(e).__name__}: {e}".splitlines()[0]))
    return out


MASK_LABELS = ("mask_heart", "mask_right_lung", "mask_left_lung")  # = sources.MASK_COLUMNS
# Modes whose pixel values are the mask itself; anything else (palette, colour, alpha) goes
# through luminance first, so a palette index or an alpha channel never decides "inside".
_DIRECT_MODES = ("1", "L", "I", "F", "I;16", "I;16L", "I;16B")


class MaskError(ValueError):
    """A mask file is missing, unreadable or does not fit its image (`reason`: one line)."""

    def __init__(self, reason: str) -> None:
        self.reason = " ".join(str(reason).split())
        super().__init__(self.reason)


def read_masks(image_path: str, mask_paths: tuple[str, ...], resolution: int):
    """Read an image's masks and transform them as `cxredit.data.io.to_square` does the image.

    Args:
        image_path: the X-ray; the masks must have its pixel size.
        mask_paths: one file per channel in `MASK_LABELS` order ("" = none given).
        resolution: side R.

    Returns:
        uint8 [3,R,R] of 0/1.

    Raises:
        MaskError: naming the column, e.g. "mask_heart: size 100x120 differs from the
            image's 2048x2048" (sizes are width x height).
    """
    import numpy as np

    h, w = _image_hw(image_path)
    out = np.zeros((len(mask_paths), resolution, resolution), np.uint8)
    for c, (label, path) in enumerate(zip(MASK_LABELS, mask_paths)):
        if not path:
            raise MaskError(f"{label}: no mask file given (blank cell)")
        mask = _load_mask(path, label)
        if mask.shape != (h, w):
            raise MaskError(f"{label}: size {mask.shape[1]}x{mask.shape[0]} differs from the "
                            f"image's {w}x{h} ({path})")
        out[c] = mask_to_square(mask, resolution)
    return out


def mask_to_square(mask, resolution: int):
    """bool [H,W] -> bool [R,R] with the centre crop of `to_square` and area resampling.

    Lanczos (the images' filter) rings at edges; averaging the area of each output pixel
    (bilinear when enlarging) and keeping pixels at least half covered keeps the outline
    within a pixel of where the image's resize puts it, and keeps structures at least half
    a pixel thick.
    """
    import numpy as np
    from PIL import Image

    from cxredit.data.io import _center_square  # the very crop the images get

    crop = np.ascontiguousarray(_center_square(np.asarray(mask, dtype=np.float32)))
    pil = Image.fromarray(crop)  # float32 -> mode "F"
    if pil.size != (resolution, resolution):
        method = Image.Resampling.BOX if crop.shape[0] > resolution else \
            Image.Resampling.BILINEAR
        pil = pil.resize((resolution, resolution), method)
    return np.asarray(pil) >= 0.5


def _load_mask(path: str, label: str):
    import os

    import numpy as np
    from PIL import Image

    if not os.path.isfile(path):
        raise MaskError(f"{label}: file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im if im.mode in _DIRECT_MODES else im.convert("L"))
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise MaskError(f"{label}: cannot decode {path} ({type(err).__name__}: {err})") from err
    if arr.ndim != 2:
        raise MaskError(f"{label}: expected a 2-D mask, got shape {arr.shape} ({path})")
    return arr != 0


def _image_hw(path: str) -> tuple[int, int]:
    """Pixel size (H, W) of an X-ray; from the header when Pillow can read it."""
    from PIL import Image

    from cxredit.data.io import read_xray

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except Exception:  # noqa: BLE001 - DICOM and the like: decode it
        return read_xray(path).shape


def render_chunk(rows: list[int], seeds: list[int], flags: list[bool], resolution: int,
                 device_probs: tuple[float, float]) -> tuple:
    """Render a chunk of phantom cases (see `cxredit.data.phantom.render_batch`)."""
    from cxredit.data.phantom import render_batch

    images, masks, metas = render_batch(seeds, flags, resolution, device_probs=device_probs)
    for m in metas:
        m.setdefault("source", "phantom")
        m.setdefault("study_id", m.get("patient_id", ""))
    return rows, images, masks, metas
