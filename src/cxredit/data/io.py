"""Read any chest X-ray file as a float image, and write images with provenance.

Every reader returns the same thing: ``float32 [H, W]`` in ``[0, 1]`` with the
MONOCHROME2 convention (higher = brighter = more attenuation: lungs dark, bones
bright). That single convention is what the rest of cxredit assumes.

Supported inputs:

* PNG / JPEG through Pillow: 8-bit (divided by 255), 16-bit (divided by 65535),
  colour or palette images converted to luminance (ITU-R 601 weights, as Pillow's
  ``"L"`` conversion, but in float so nothing is rounded).
* DICOM through pydicom (optional extra ``cxredit[dicom]``), recognised by the
  ``.dcm``/``.dicom`` extension or by the ``DICM`` magic at byte 128. Intensities go
  through the standard chain: modality LUT (Rescale Slope/Intercept) -> VOI LUT
  sequence, else the first Window Center/Width -> ``[0, 1]``; without either the
  min-max of the rescaled data is used. MONOCHROME1 is inverted last.
  Multi-frame files: the first frame is used and a warning is logged.

Every failure is an :class:`XrayReadError` (a ``ValueError``) whose one-line message
starts with the path, so a conversion of 200k files can list its bad files.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DICOM_EXTENSIONS = (".dcm", ".dicom")
SUPPORTED_EXTENSIONS = IMAGE_EXTENSIONS + DICOM_EXTENSIONS
DICOM_INSTALL_HINT = 'pip install "cxredit[dicom]"'

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's "L"
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# pydicom 2 and 3 word "no decoder for this transfer syntax" differently.
_MISSING_HANDLER = re.compile(
    r"missing (required )?dependenc|no pixel data (handlers|decoders)|"
    r"handlers? (are )?available|no available (plugin|handler)",
    re.IGNORECASE,
)


class XrayReadError(ValueError):
    """A file could not be read as an X-ray.

    Attributes:
        path: The offending file.
        reason: Why, in one line.
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the cause said
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Worker processes send these back to the parent: keep both fields.
        return (type(self), (self.path, self.reason))


# ---------------------------------------------------------------------------- reading


def read_xray(path: PathLike) -> np.ndarray:
    """Read a PNG, JPEG or DICOM chest X-ray.

    Args:
        path: The file. DICOM is recognised by extension or by its ``DICM`` magic.

    Returns:
        ``float32 [H, W]`` in ``[0, 1]``, MONOCHROME2 (lungs dark, bones bright).

    Raises:
        XrayReadError: missing file, unsupported type, corrupt or truncated data,
            missing DICOM decoder, non-finite values.
    """
    path = Path(path)
    kind = _file_kind(path)
    img = _read_dicom(path) if kind == "dicom" else _read_pil(path)
    if img.ndim != 2 or img.size == 0:
        raise XrayReadError(path, f"expected a 2-D image, got shape {img.shape}")
    if not np.isfinite(img).all():
        raise XrayReadError(path, "image contains non-finite values (NaN/inf)")
    return img


def _file_kind(path: Path) -> str:
    if not path.exists():
        raise XrayReadError(path, "file not found")
    if not path.is_file():
        raise XrayReadError(path, "not a regular file")
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in DICOM_EXTENSIONS or _has_dicom_magic(path):
        return "dicom"
    raise XrayReadError(
        path,
        f"unsupported file type {suffix or '(no extension)'!r}; expected one of "
        f"{', '.join(SUPPORTED_EXTENSIONS)} or a DICOM file with the DICM preamble",
    )


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _read_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            # load() inside the try: Pillow decodes lazily, and truncated files only
            # fail here (we never enable ImageFile.LOAD_TRUNCATED_IMAGES).
            img.load()
            return _pil_to_float(img, path)
    except XrayReadError:
        raise
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise XrayReadError(path, f"cannot decode image ({type(err).__name__}: {err})") from err


def _pil_to_float(img: Image.Image, path: Path) -> np.ndarray:
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.float32) / np.float32(255)
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.float32) / np.float32(65535)
    if mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode == "I" and arr.min() >= 0 and arr.max() <= 65535:
            return (arr / 65535).astype(np.float32)
        if mode == "F" and arr.min() >= 0 and arr.max() <= 1:
            return arr.astype(np.float32)
        log.warning("%s: %s image values outside the expected range; using min-max", path, mode)
        return _minmax(arr).astype(np.float32)
    if mode == "1":
        return np.asarray(img, dtype=np.float32)
    if mode in ("LA", "La"):
        return np.asarray(img.getchannel(0), dtype=np.float32) / np.float32(255)
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    return (rgb @ _LUMA) / np.float32(255)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float64)
    return (x - lo) / (hi - lo)


# ---------------------------------------------------------------------------- DICOM


def _import_pydicom(path: PathLike | None = None) -> Any:
    try:
        import pydicom
    except ImportError as err:
        reason = f"reading/writing DICOM needs pydicom: {DICOM_INSTALL_HINT}"
        raise XrayReadError(path or "<dicom>", reason) from err
    return pydicom


def _read_dicom(path: Path) -> np.ndarray:
    pydicom = _import_pydicom(path)
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as err:
        raise XrayReadError(path, f"cannot parse DICOM ({type(err).__name__}: {err})") from err
    if "PixelData" not in ds:
        raise XrayReadError(path, "DICOM file has no PixelData (not an image?)")
    _ensure_transfer_syntax(ds)
    tsyntax = ds.file_meta.TransferSyntaxUID
    # pydicom logs every failed decoder plugin with a traceback before raising; the error
    # below says it in one line (and the caller lists the file in errors.csv).
    pd_log = logging.getLogger("pydicom")
    level = pd_log.level
    pd_log.setLevel(logging.CRITICAL)
    try:
        arr = ds.pixel_array
    except Exception as err:
        if _MISSING_HANDLER.search(str(err)):
            raise XrayReadError(
                path,
                f"no decoder available for compressed transfer syntax {tsyntax.name!r}; "
                f"install pylibjpeg and its plugins: {DICOM_INSTALL_HINT}",
            ) from err
        raise XrayReadError(
            path, f"cannot decode pixel data ({type(err).__name__}: {err})"
        ) from err
    finally:
        pd_log.setLevel(level)

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        log.warning("%s: multi-frame DICOM (%d frames); using the first frame", path, frames)
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if arr.ndim == 3 and photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"):
        # pydicom already converted YBR to RGB; modality/VOI LUTs do not apply to colour.
        bits = int(ds.get("BitsStored", 8) or 8)
        return (arr.astype(np.float32) @ _LUMA) / np.float32(2**bits - 1)
    if arr.ndim != 2 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise XrayReadError(
            path, f"unsupported DICOM image: {photometric}, pixel array shape {arr.shape}"
        )
    out = _dicom_gray_to_unit(arr, ds, path)
    if photometric == "MONOCHROME1":
        out = 1.0 - out  # after the VOI step: windows are defined on modality values
    return out.astype(np.float32)


# ViewCodeSequence code meanings (DICOM CID 4010) of the views cxredit tells apart.
VIEW_CODE_MEANINGS = {
    "postero-anterior": "PA", "antero-posterior": "AP", "lateral": "LATERAL",
    "left lateral": "LL", "right lateral": "RL",
}


def dicom_view(path: PathLike) -> str:
    """The view of a DICOM file from its header: ViewPosition (upper case), else the
    ViewCodeSequence meaning (postero-anterior -> PA, ...); "" when neither says, when the
    header cannot be read or when pydicom is not installed (reading the pixels later then
    reports the problem). Reads the header only, not the pixel data."""
    try:
        import pydicom
    except ImportError:
        return ""
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True,
                             specific_tags=["ViewPosition", "ViewCodeSequence"])
        view = str(ds.get("ViewPosition", "") or "").strip().upper()
        if not view and ds.get("ViewCodeSequence"):
            meaning = str(ds.ViewCodeSequence[0].get("CodeMeaning", "")).strip().lower()
            view = VIEW_CODE_MEANINGS.get(meaning, "")
    except Exception:
        return ""
    return view


def _ensure_transfer_syntax(ds: Any) -> None:
    # Files without a meta header (read with force=True) still carry their encoding.
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit in (True, None):
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _apply_modality_lut(arr: np.ndarray, ds: Any) -> np.ndarray:
    try:  # pydicom >= 3
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)


def _dicom_gray_to_unit(arr: np.ndarray, ds: Any, path: Path) -> np.ndarray:
    """Stored values -> modality values -> VOI (LUT or window) -> [0, 1] float64."""
    x = _apply_modality_lut(arr, ds)
    voi_seq = ds.get("VOILUTSequence")
    if voi_seq:
        return _apply_voi_lut_item(x, voi_seq[0], ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if width is not None and center is not None and width > 0:
            return _window(x, center, width, function)
        log.warning("%s: invalid window (center %s, width %s); using min-max", path, center, width)
    return _minmax(x)


def _first(value: Any) -> float | None:
    """First value of a possibly multi-valued DS element (WindowCenter may hold several)."""
    try:
        if hasattr(value, "__getitem__") and not isinstance(value, str | bytes):
            value = value[0]
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI window to [0, 1] (DICOM PS3.3 C.11.2.1.2)."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:  # LINEAR needs width >= 1; width 1 is a threshold
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _apply_voi_lut_item(x: np.ndarray, item: Any, ds: Any) -> np.ndarray:
    """Apply one VOI LUT Sequence item; the LUT's own output range maps to [0, 1].

    The descriptor's bit depth is not trusted for the output range: many CR/DX files
    declare 16 bits but fill 12, which would make the image nearly black.
    """
    descriptor = [int(v) for v in item.LUTDescriptor]
    entries, first_mapped = descriptor[0] or 65536, descriptor[1]
    data = item.LUTData
    if isinstance(data, bytes | bytearray):
        little = getattr(ds.file_meta.TransferSyntaxUID, "is_little_endian", True)
        lut = np.frombuffer(data, dtype="<u2" if little else ">u2").astype(np.float64)
    else:
        lut = np.atleast_1d(np.asarray(data, dtype=np.float64))
    lut = lut[:entries]
    idx = np.clip(np.rint(x) - first_mapped, 0, len(lut) - 1).astype(np.intp)
    lo, hi = float(lut.min()), float(lut.max())
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float64)
    return (lut[idx] - lo) / (hi - lo)


# ---------------------------------------------------------------------------- resizing


def to_square(img: np.ndarray, resolution: int) -> np.ndarray:
    """Centre-crop to a square and resize with an antialiasing Lanczos filter.

    The long side is cropped to the short one (central square of side ``min(H, W)``),
    so anatomy is never squashed.

    Args:
        img: ``float [H, W]`` in ``[0, 1]`` (or ``uint8 [H, W]``).
        resolution: Output side R.

    Returns:
        ``uint8 [R, R]``.
    """
    if img.ndim != 2:
        raise ValueError(f"to_square expects a 2-D image, got shape {img.shape}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    crop = _center_square(img)
    if crop.dtype == np.uint8:
        crop = crop.astype(np.float32) / np.float32(255)
    pil = Image.fromarray(np.ascontiguousarray(crop, dtype=np.float32))
    if pil.size != (resolution, resolution):
        pil = pil.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return _float_to_uint8(np.asarray(pil))


def _center_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return img[top : top + s, left : left + s]


def _float_to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def read_xray_resized(path: PathLike, resolution: int) -> np.ndarray:
    """``to_square(read_xray(path), resolution)``, faster for 8-bit grayscale files.

    8-bit grayscale PNG/JPEG are cropped and resized by Pillow in 8-bit, which
    differs from the float path by at most one grey level (Pillow rounds between its
    horizontal and vertical passes). Large JPEGs are decoded at 1/2, 1/4 or 1/8
    scale in the DCT domain (``Image.draft``) while the decoded image stays at least
    ``_DRAFT_MARGIN`` times the target, and the crop box is mapped to the decoded
    grid with sub-pixel precision. Measured on 2320x2828 JPEGs to 128 px this also
    stays within one grey level of the float path; a margin of 2 did not (up to 7).

    Args:
        path: Any file :func:`read_xray` accepts.
        resolution: Output side R.

    Returns:
        ``uint8 [R, R]``.
    """
    path = Path(path)
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if _file_kind(path) == "image":
        try:
            with Image.open(path) as img:
                if img.mode == "L":
                    return _resize_l(img, resolution)
        except Exception as err:
            raise XrayReadError(
                path, f"cannot decode image ({type(err).__name__}: {err})"
            ) from err
    return to_square(read_xray(path), resolution)


_DRAFT_MARGIN = 4


def _resize_l(img: Image.Image, resolution: int) -> np.ndarray:
    """Centre square of an unloaded 8-bit image -> ``uint8 [R, R]``."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    if img.format == "JPEG" and s >= 2 * _DRAFT_MARGIN * resolution:
        scale = _DRAFT_MARGIN * resolution / s
        img.draft("L", (int(np.ceil(w * scale)), int(np.ceil(h * scale))))
    img.load()  # inside the caller's try: truncated files raise here
    fx, fy = img.width / w, img.height / h
    box = (left * fx, top * fy, (left + s) * fx, (top + s) * fy)
    # Crop first (to whole decoded pixels), like to_square: Lanczos near the border
    # must not see pixels outside the square, or the edges differ from the float path.
    whole = (int(box[0]), int(box[1]), min(img.width, int(np.ceil(box[2]))),
             min(img.height, int(np.ceil(box[3]))))
    img = img.crop(whole)
    if img.size == (resolution, resolution):
        return np.asarray(img, dtype=np.uint8)
    sub = (box[0] - whole[0], box[1] - whole[1], box[2] - whole[0], box[3] - whole[1])
    out = img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=sub)
    return np.asarray(out, dtype=np.uint8)


# ---------------------------------------------------------------------------- writing


def _atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through a temporary file in the target folder, then rename over ``path``.

    A killed process leaves either the old file or the new one, never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with 0o666 honours the umask (tempfile.mkstemp would force 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _to_uint(img: np.ndarray, bits: int) -> np.ndarray:
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {img.shape}")
    if img.dtype == np.uint8:
        return img if bits == 8 else img.astype(np.uint16) * np.uint16(257)
    if img.dtype == np.uint16 and bits == 16:
        return img
    if not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"expected a float image in [0, 1] or uint8, got dtype {img.dtype}")
    if not np.isfinite(img).all():
        raise ValueError("image contains non-finite values")
    lo, hi = float(img.min()), float(img.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"float image must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    top = 2**bits - 1
    return np.clip(np.rint(img.astype(np.float64) * top), 0, top).astype(f"uint{bits}")


def output_stems(ids: list[str], rows: bool | None = None) -> list[str]:
    """File-name stems for the outputs made from inputs `ids`, one each and all different.

    A store row id ("12") becomes "row0000012" and a file path its stem; `rows` says which
    the ids are (None: digits-only ids are rows). Inputs whose stems repeat (the same file
    name in two folders) get "_<position>" appended, so no output overwrites another.
    """
    stems = [f"row{int(i):07d}" if (rows if rows is not None else str(i).isdigit())
             else Path(str(i)).stem for i in ids]
    seen: dict[str, int] = {}
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
    return [s if seen[s] == 1 else f"{s}_{k}" for k, s in enumerate(stems)]


def write_png(
    path: PathLike,
    img: np.ndarray,
    provenance: Mapping[str, str] | None = None,
    bits: int = 8,
) -> Path:
    """Write a grayscale PNG atomically, with provenance as PNG text chunks.

    Args:
        path: Output file (parent folders are created).
        img: ``float [H, W]`` in ``[0, 1]``, or ``uint8 [H, W]`` (``uint16`` for 16 bits).
        provenance: Text chunks, e.g. ``{"Software": "cxredit 0.1.0",
            "cxredit:synthetic": "true", "Description": "..."}``. Keys: 1-79 Latin-1
            characters; values that are not Latin-1 are stored as iTXt.
        bits: 8 or 16.

    Returns:
        The written path.
    """
    arr = _to_uint(img, bits)
    pil = Image.fromarray(arr)  # uint8 -> "L", uint16 -> "I;16"
    info = PngInfo()
    for key, value in (provenance or {}).items():
        key = str(key)
        if not 1 <= len(key) <= 79 or not key.isprintable():
            raise ValueError(f"PNG text key must be 1-79 printable characters: {key!r}")
        info.add_text(key, str(value))
    return _atomic_write(path, lambda f: pil.save(f, format="PNG", pnginfo=info))


def read_png_text(path: PathLike) -> dict[str, str]:
    """Return the tEXt/iTXt/zTXt chunks of a PNG as a dict."""
    try:
        with Image.open(path) as img:
            img.load()  # text chunks after the image data are only seen once loaded
            return {str(k): str(v) for k, v in getattr(img, "text", {}).items()}
    except FileNotFoundError as err:
        raise XrayReadError(path, "file not found") from err
    except Exception as err:
        raise XrayReadError(path, f"cannot read PNG ({type(err).__name__}: {err})") from err


# Copied from a template DICOM: attributes that describe the image but identify nobody...
_LIKE_NON_IDENTIFYING = (
    "PatientSex", "PatientAge", "StudyDescription", "ViewPosition", "BodyPartExamined",
    "PatientOrientation", "Laterality",
)
# ... and, only with keep_identity=True, those that tie the image to a patient and study (the
# edited image then joins the original's study as a new series).
_LIKE_IDENTIFYING = (
    "PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "StudyDate",
    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
)


def write_dicom(
    path: PathLike,
    img: np.ndarray,
    provenance: Mapping[str, str] | None = None,
    like: PathLike | None = None,
    keep_identity: bool = False,
) -> Path:
    """Write a 16-bit MONOCHROME2 Secondary Capture DICOM, atomically.

    The file says loudly that it is derived: ImageType ``DERIVED\\SECONDARY``,
    BurnedInAnnotation ``NO``, and DerivationDescription / ImageComments / Series
    Description naming cxredit and the provenance. A window spanning the full 16-bit
    range is stored, so :func:`read_xray` returns ``img`` (to 16-bit precision).

    Args:
        path: Output file (parent folders are created).
        img: ``float [H, W]`` in ``[0, 1]`` or ``uint8``/``uint16 [H, W]``.
        provenance: Key/value pairs recorded in ImageComments.
        like: Optional source DICOM; its non-identifying descriptive attributes (sex, age,
            view, body part, ...) are copied.
        keep_identity: also copy patient and study identifiers (name, ID, birth date, study
            UID, accession, ...) so the image lands in the source's study as a new series.
            Off by default: a synthetic edit should not carry a real patient's identity.

    Returns:
        The written path.
    """
    pydicom = _import_pydicom(path)
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from cxredit import __version__

    arr = _to_uint(img, 16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)

    if like is not None:
        try:
            src = pydicom.dcmread(like, stop_before_pixels=True, force=True)
        except Exception as err:
            raise XrayReadError(like, f"cannot read template DICOM ({err})") from err
        keywords = _LIKE_NON_IDENTIFYING + (_LIKE_IDENTIFYING if keep_identity else ())
        for keyword in keywords:
            if keyword in src:
                setattr(ds, keyword, src.data_element(keyword).value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                    "ReferringPhysicianName"):
        if keyword not in ds:
            setattr(ds, keyword, "")  # type 2: present, may be empty
    if "StudyInstanceUID" not in ds:
        ds.StudyInstanceUID = generate_uid()

    now = _dicom_now()
    note = f"Synthetic/edited image produced by cxredit {__version__}; not for diagnosis."
    prov = "; ".join(f"{k}={v}" for k, v in (provenance or {}).items())
    ds.SOPClassUID = _SECONDARY_CAPTURE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 999
    ds.InstanceNumber = 1
    ds.SeriesDescription = "cxredit synthetic/edited"
    ds.ContentDate, ds.ContentTime = now
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    ds.DerivationDescription = note[:1024]
    ds.ImageComments = (note + (" Provenance: " + prov if prov else ""))[:10240]
    ds.Manufacturer = "cxredit"
    ds.SoftwareVersions = __version__
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = 32768
    ds.WindowWidth = 65536
    ds.PixelData = np.ascontiguousarray(arr, dtype="<u2").tobytes()
    return _atomic_write(path, lambda f: _dcmwrite(f, ds))


def _dcmwrite(f: IO[bytes], ds: Any) -> None:
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(f, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(f, write_like_original=False)


def _dicom_now() -> tuple[str, str]:
    import datetime as _dt

    now = _dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")
