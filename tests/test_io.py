"""Tests for cxredit.data.io: reading PNG/JPEG/DICOM, resizing, writing with provenance."""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxredit.data.io import (
    XrayReadError,
    _atomic_write,
    read_png_text,
    read_xray,
    read_xray_resized,
    to_square,
    write_dicom,
    write_png,
)

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid  # noqa: E402

DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    bits_stored: int = 16,
    bits_allocated: int = 16,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    pixel_data: bytes | None = None,
    **elements: object,
) -> Path:
    """Write a real DICOM file (DX image) with the given stored pixel values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DX_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "P001"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    dtype = "<u2" if bits_allocated == 16 else "u1"
    ds.PixelData = pixel_data if pixel_data is not None else pixels.astype(dtype).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------ DICOM intensities

RAMP12 = np.array([[0, 1000, 2000, 4000]])


@pytest.mark.parametrize(
    ("photometric", "expected"),
    [("MONOCHROME2", [0.0, 0.25, 0.5, 1.0]), ("MONOCHROME1", [1.0, 0.75, 0.5, 0.0])],
)
def test_dicom_12bit_minmax_and_inversion(tmp_path, photometric, expected):
    # No window: min-max of the actual data (0..4000), not of the 12-bit range (0..4095).
    path = make_dicom(tmp_path / "a.dcm", RAMP12, bits_stored=12, photometric=photometric)
    img = read_xray(path)
    assert img.dtype == np.float32 and img.shape == (1, 4)
    np.testing.assert_allclose(img[0], expected, atol=1e-6)


def test_dicom_12bit_ignores_unused_high_bits(tmp_path):
    stored = RAMP12 | 0x1000  # garbage in bit 12, outside BitsStored=12
    path = make_dicom(tmp_path / "a.dcm", stored, bits_stored=12)
    np.testing.assert_allclose(read_xray(path)[0], [0.0, 0.25, 0.5, 1.0], atol=1e-6)


# Stored v -> modality x = 2 v - 1000 -> LINEAR window c=1000.5, w=2001:
# y = (x - (c - 0.5)) / (w - 1) + 0.5 = (x - 1000) / 2000 + 0.5, clipped to [0, 1].
#   v:    0      500   750    1000   1500   2000
#   x: -1000      0    500    1000   2000   3000
#   y:    0       0    0.25   0.5    1      1
WINDOW_STORED = np.array([[0, 500, 750, 1000, 1500, 2000]])
WINDOW_EXPECTED = np.array([0.0, 0.0, 0.25, 0.5, 1.0, 1.0])


@pytest.mark.parametrize("bits_stored", [12, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_rescale_then_window(tmp_path, bits_stored, photometric):
    path = make_dicom(
        tmp_path / "w.dcm", WINDOW_STORED, bits_stored=bits_stored, photometric=photometric,
        RescaleSlope="2", RescaleIntercept="-1000", WindowCenter="1000.5", WindowWidth="2001",
    )
    expected = WINDOW_EXPECTED if photometric == "MONOCHROME2" else 1.0 - WINDOW_EXPECTED
    np.testing.assert_allclose(read_xray(path)[0], expected, atol=1e-6)


def test_dicom_multivalued_window_uses_first(tmp_path):
    path = make_dicom(
        tmp_path / "w.dcm", WINDOW_STORED, RescaleSlope="2", RescaleIntercept="-1000",
        WindowCenter=["1000.5", "40"], WindowWidth=["2001", "10"],
    )
    np.testing.assert_allclose(read_xray(path)[0], WINDOW_EXPECTED, atol=1e-6)


def test_dicom_linear_exact_window(tmp_path):
    # y = (x - c) / w + 0.5 with c=1000, w=2000 on x = stored values (no rescale).
    path = make_dicom(
        tmp_path / "w.dcm", np.array([[0, 500, 1000, 1500, 2000, 3000]]),
        WindowCenter="1000", WindowWidth="2000", VOILUTFunction="LINEAR_EXACT",
    )
    np.testing.assert_allclose(read_xray(path)[0], [0, 0.25, 0.5, 0.75, 1.0, 1.0], atol=1e-6)


def test_dicom_rescale_without_window_is_minmax_of_data(tmp_path):
    # 16-bit, slope 0.5 intercept 10: x = [60, 110, 160] -> min-max [0, 0.5, 1].
    path = make_dicom(tmp_path / "r.dcm", np.array([[100, 200, 300]]),
                      RescaleSlope="0.5", RescaleIntercept="10")
    np.testing.assert_allclose(read_xray(path)[0], [0.0, 0.5, 1.0], atol=1e-6)


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_dicom_voi_lut_sequence(tmp_path, vr):
    # LUT: 3 entries starting at stored value 10 -> [0, 2000, 4000]; output range -> [0, 1].
    item = Dataset()
    item.LUTDescriptor = [3, 10, 16]
    lut = [0, 2000, 4000]
    item.add_new("LUTData", vr, lut if vr == "US" else np.array(lut, "<u2").tobytes())
    path = make_dicom(tmp_path / "l.dcm", np.array([[5, 10, 11, 12, 20]]),
                      VOILUTSequence=Sequence([item]), WindowCenter="0", WindowWidth="2")
    np.testing.assert_allclose(read_xray(path)[0], [0, 0, 0.5, 1, 1], atol=1e-6)


def test_dicom_constant_image_is_zeros(tmp_path):
    path = make_dicom(tmp_path / "c.dcm", np.full((3, 4), 777))
    img = read_xray(path)
    assert img.shape == (3, 4) and not img.any()


def test_dicom_without_extension_found_by_magic(tmp_path):
    path = make_dicom(tmp_path / "IM000001", RAMP12, bits_stored=12)
    np.testing.assert_allclose(read_xray(path)[0], [0.0, 0.25, 0.5, 1.0], atol=1e-6)


def test_dicom_multiframe_uses_first_frame(tmp_path, caplog):
    frames = np.stack([RAMP12, RAMP12[:, ::-1]])
    path = make_dicom(tmp_path / "m.dcm", frames, bits_stored=12, NumberOfFrames=2)
    with caplog.at_level(logging.WARNING, logger="cxredit.data.io"):
        img = read_xray(path)
    np.testing.assert_allclose(img[0], [0.0, 0.25, 0.5, 1.0], atol=1e-6)
    assert "first frame" in caplog.text


def test_dicom_rgb_to_luminance(tmp_path):
    rgb = np.zeros((1, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (255, 255, 255)
    path = make_dicom(tmp_path / "rgb.dcm", rgb[..., 0], bits_stored=8, bits_allocated=8,
                      photometric="RGB", pixel_data=rgb.tobytes(),
                      SamplesPerPixel=3, PlanarConfiguration=0)
    np.testing.assert_allclose(read_xray(path)[0], [0.299, 1.0], atol=1e-5)


def test_dicom_without_pixel_data(tmp_path):
    path = make_dicom(tmp_path / "n.dcm", RAMP12)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(XrayReadError, match="no PixelData"):
        read_xray(path)


def _jpeg_dicom(tmp_path: Path) -> tuple[Path, np.ndarray]:
    gray = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="JPEG", quality=95)
    path = make_dicom(
        tmp_path / "jpeg.dcm", gray, bits_stored=8, bits_allocated=8,
        transfer_syntax=JPEGBaseline8Bit,
        pixel_data=pydicom.encaps.encapsulate([buf.getvalue()]),
    )
    return path, gray


def test_dicom_jpeg_baseline_reads(tmp_path):
    path, gray = _jpeg_dicom(tmp_path)
    img = read_xray(path)
    assert img.shape == gray.shape
    # No window: min-max of decoded data; the ramp spans 0..255 so that is ~ gray / 255.
    assert np.abs(img * 255 - gray).max() <= 3


def test_corrupt_compressed_dicom_is_one_line_without_library_tracebacks(tmp_path, caplog):
    path, gray = _jpeg_dicom(tmp_path)
    ds = pydicom.dcmread(path)
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = pydicom.encaps.encapsulate([frame[: len(frame) // 3]])
    ds.save_as(path)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(XrayReadError, match="cannot decode pixel data") as info:
            read_xray(path)
    assert "\n" not in str(info.value)
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    assert logging.getLogger("pydicom").level != logging.CRITICAL  # restored


def test_folder_takes_the_view_from_dicom_headers(tmp_path):
    from cxredit.data.sources import filter_views, index_folder

    px = np.zeros((8, 8), np.uint16)
    make_dicom(tmp_path / "a_pa.dcm", px, ViewPosition="PA")
    make_dicom(tmp_path / "b_ll.dcm", px, ViewPosition="ll")
    code = Dataset()
    code.CodeMeaning = "left lateral"
    make_dicom(tmp_path / "c_coded.dcm", px, ViewPosition="", ViewCodeSequence=Sequence([code]))
    make_dicom(tmp_path / "d_none.dcm", px)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "e.png")
    df = index_folder(tmp_path)
    assert df["view"].tolist() == ["PA", "LL", "LL", "", ""]
    assert filter_views(df)["patient_id"].tolist() == ["a_pa", "d_none", "e"]
    # a view from the labels CSV wins over the header
    (tmp_path / "l.csv").write_text("file,view\nb_ll.dcm,AP\n")
    assert index_folder(tmp_path, tmp_path / "l.csv")["view"].tolist()[:2] == ["PA", "AP"]


def test_dicom_missing_decoder_message(tmp_path, monkeypatch):
    from pydicom.pixels.decoders.base import get_decoder

    path, _ = _jpeg_dicom(tmp_path)
    decoder = get_decoder(JPEGBaseline8Bit)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0",)})
    with pytest.raises(XrayReadError) as info:
        read_xray(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert 'pip install "cxredit[dicom]"' in message and "JPEG Baseline" in message
    assert "\n" not in message


def test_missing_pydicom_message(tmp_path, monkeypatch):
    import sys

    path = make_dicom(tmp_path / "a.dcm", RAMP12)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` fail
    with pytest.raises(XrayReadError, match=r'cxredit\[dicom\]'):
        read_xray(path)


# ------------------------------------------------------------------------ PNG / JPEG


def test_png_8bit_round_trip(tmp_path):
    img = np.tile(np.arange(256, dtype=np.float32) / 255, (3, 1))
    path = write_png(tmp_path / "a.png", img)
    out = read_xray(path)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, img)


def test_png_16bit_round_trip(tmp_path):
    values = np.array([[0, 1, 257, 32768, 65535]], dtype=np.uint16)
    path = write_png(tmp_path / "a.png", values, bits=16)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    np.testing.assert_allclose(read_xray(path), values / 65535.0, rtol=0, atol=1e-7)


def test_png_16bit_from_float(tmp_path):
    img = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    out = read_xray(write_png(tmp_path / "a.png", img, bits=16))
    np.testing.assert_allclose(out, img, atol=1 / 65535)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_color_and_palette_to_luminance(tmp_path, mode):
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8)
    im = Image.fromarray(rgb)
    if mode == "LA":
        im = Image.fromarray(np.array([[0, 51, 255, 255]], np.uint8)).convert("LA")
        expected = [0.0, 0.2, 1.0, 1.0]
    else:
        im = im.convert(mode)
        expected = [0.299, 0.587, 0.114, 1.0]
    im.save(tmp_path / "c.png")
    np.testing.assert_allclose(read_xray(tmp_path / "c.png")[0], expected, atol=1e-5)


def test_mode_i_out_of_range_uses_minmax(tmp_path, caplog):
    path = tmp_path / "i.png"
    Image.fromarray(np.array([[-5, 0, 5]], np.int32)).save(tmp_path / "i.tif")
    with Image.open(tmp_path / "i.tif") as im:
        assert im.mode == "I"
        from cxredit.data.io import _pil_to_float

        with caplog.at_level(logging.WARNING, logger="cxredit.data.io"):
            out = _pil_to_float(im, path)
    np.testing.assert_allclose(out[0], [0, 0.5, 1])
    assert "min-max" in caplog.text


def _write_jpeg(path: Path, shape: tuple[int, int] = (390, 320), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = 0.5 + 0.3 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + 0.05 * rng.standard_normal(shape)
    Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8)).save(path, quality=92)
    return path


def test_truncated_jpeg_raises_with_path(tmp_path):
    good = _write_jpeg(tmp_path / "good.jpg").read_bytes()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(XrayReadError) as info:
        read_xray(bad)
    assert str(info.value).startswith(f"{bad}: ") and "truncated" in str(info.value)
    assert info.value.path == str(bad)
    with pytest.raises(XrayReadError, match="truncated"):
        read_xray_resized(bad, 64)


def test_not_an_image(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a PNG")
    with pytest.raises(XrayReadError, match="cannot decode"):
        read_xray(fake)
    other = tmp_path / "x.txt"
    other.write_text("x" * 200)
    with pytest.raises(XrayReadError, match="unsupported file type '.txt'"):
        read_xray(other)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(XrayReadError, match="file not found"):
        read_xray(tmp_path / "nope.png")
    with pytest.raises(XrayReadError, match="not a regular file"):
        read_xray(tmp_path)


def test_error_is_valueerror_one_line_and_picklable():
    err = XrayReadError("/data/x.dcm", "bad\nthing")
    assert isinstance(err, ValueError)
    assert str(err) == "/data/x.dcm: bad thing"
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, str(back)) == (err.path, err.reason, str(err))


# ------------------------------------------------------------------------ resizing


def test_to_square_crops_long_side_not_squash():
    wide = np.zeros((100, 300), np.float32)
    wide[:, :100] = 1.0  # left third: cropped away
    wide[:, 100:200] = 0.4
    out = to_square(wide, 50)
    assert out.shape == (50, 50) and out.dtype == np.uint8
    assert (out == 102).all()
    tall = np.full((301, 100), 0.4, np.float32)
    tall[:100] = 0.0
    tall[201:] = 1.0
    assert (to_square(tall, 32) == 102).all()


def test_to_square_antialiases_and_accepts_uint8():
    checker = (np.indices((256, 256)).sum(0) % 2).astype(np.float32)  # 1-px checkerboard
    out = to_square(checker, 64)
    assert np.abs(out.astype(int) - 128).max() <= 2  # averaged to grey, no aliasing
    ramp8 = np.tile(np.arange(200, dtype=np.uint8), (200, 1))
    np.testing.assert_array_equal(to_square(ramp8, 50), to_square(ramp8 / 255.0, 50))
    with pytest.raises(ValueError):
        to_square(np.zeros((2, 2, 3)), 8)


def test_to_square_same_size_is_exact():
    img = np.random.default_rng(1).integers(0, 256, (40, 40)).astype(np.float32) / 255
    np.testing.assert_array_equal(to_square(img, 40), np.rint(img * 255).astype(np.uint8))


@pytest.mark.parametrize(
    ("name", "shape", "resolution"),
    [("small.jpg", (390, 320), 128), ("large.jpg", (1300, 1100), 64), ("a.png", (90, 70), 32)],
)
def test_read_xray_resized_matches_float_path(tmp_path, name, shape, resolution):
    # large.jpg takes the DCT-draft path (1100 >= 8 * 64); all agree to one grey level.
    path = _write_jpeg(tmp_path / name, shape)
    fast = read_xray_resized(path, resolution)
    ref = to_square(read_xray(path), resolution)
    assert fast.shape == (resolution, resolution) and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - ref).max() <= 1


def test_read_xray_resized_dicom_and_16bit(tmp_path):
    img = np.linspace(0, 1, 48 * 40, dtype=np.float32).reshape(48, 40)
    png16 = write_png(tmp_path / "a.png", img, bits=16)
    np.testing.assert_array_equal(read_xray_resized(png16, 20), to_square(read_xray(png16), 20))
    dcm = make_dicom(tmp_path / "a.dcm", np.rint(img * 4000), bits_stored=12)
    np.testing.assert_array_equal(read_xray_resized(dcm, 20), to_square(read_xray(dcm), 20))


# ------------------------------------------------------------------------ writing


def test_png_provenance_round_trip(tmp_path):
    prov = {"Software": "cxredit 0.1.0", "cxredit:synthetic": "true",
            "Description": "edited: Cardiomegaly +2.0 (Schrödinger)"}
    path = write_png(tmp_path / "sub" / "e.png", np.zeros((4, 4), np.float32), prov)
    assert read_png_text(path) == prov
    assert [p.name for p in path.parent.iterdir()] == ["e.png"]  # no temp files left


def test_write_png_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_png(tmp_path / "a.png", np.full((2, 2), 2.0))
    with pytest.raises(ValueError, match="bits"):
        write_png(tmp_path / "a.png", np.zeros((2, 2)), bits=12)
    assert not list(tmp_path.iterdir())


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        _atomic_write(target, boom)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_write_dicom_round_trip_and_attributes(tmp_path):
    img = np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 6)
    src = make_dicom(tmp_path / "orig.dcm", RAMP12, bits_stored=12, PatientName="Doe^J")
    anon = pydicom.dcmread(write_dicom(tmp_path / "anon.dcm", img, like=src))
    assert str(anon.PatientName) == "" and anon.PatientID == ""  # identity not copied by default
    assert anon.StudyInstanceUID != "1.2.3.4"
    out = write_dicom(tmp_path / "edited.dcm", img, {"direction": "cardiomegaly", "alpha": "2"},
                      like=src, keep_identity=True)
    np.testing.assert_allclose(read_xray(out), img, atol=1 / 65535 + 1e-7)
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.BurnedInAnnotation == "NO"
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 16
    assert "cxredit" in ds.DerivationDescription and "ynthetic" in ds.DerivationDescription
    assert "direction=cardiomegaly" in ds.ImageComments
    assert ds.PatientID == "P001" and str(ds.PatientName) == "Doe^J"
    assert ds.StudyInstanceUID == "1.2.3.4"
    assert ds.SeriesInstanceUID != pydicom.dcmread(src).get("SeriesInstanceUID")
