"""User-supplied heart/lung masks through a folder store (mask_* columns of the labels CSV)."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from cxredit.cli import main
from cxredit.data._workers import MASK_LABELS
from cxredit.data.phantom import MASK_NAMES
from cxredit.data.prepare import prepare_store
from cxredit.data.sources import MASK_COLUMNS, index_folder
from cxredit.data.store import ImageStore

R = 32
N_GOOD = 12


def _rect_png(path, hw, rect, value=255):
    """An 8-bit mask of size hw with rect = (y0, y1, x0, x1) (half-open) set to `value`."""
    arr = np.zeros(hw, np.uint8)
    y0, y1, x0, x1 = rect
    arr[y0:y1, x0:x1] = value
    Image.fromarray(arr).save(path)


def _expected(hw, rect):
    """The rectangle after to_square's centre crop and a resize to R, computed by hand."""
    h, w = hw
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    y0, y1, x0, x1 = rect
    centres = (np.arange(R) + 0.5) * s / R  # output pixel centres in crop coordinates
    inside_y = (centres >= y0 - top) & (centres < y1 - top)
    inside_x = (centres >= x0 - left) & (centres < x1 - left)
    return inside_y[:, None] & inside_x[None, :]


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    """raw/ with N_GOOD good images (90x120 and 120x90) + 3 bad rows; masks under raw/masks/."""
    tmp = tmp_path_factory.mktemp("folder_masks")
    root, mdir = tmp / "raw", tmp / "raw" / "masks"
    mdir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, truth = [], {}
    for i in range(N_GOOD + 3):
        hw = (90, 120) if i % 2 == 0 else (120, 90)
        name = f"img{i:02d}"
        Image.fromarray((rng.random(hw) * 255).astype(np.uint8)).save(root / f"{name}.png")
        h, w = hw
        # heart centre-left of the patient (image right), lungs either side; the right lung
        # (image left) starts inside the part to_square crops away on landscape images
        rects = [(h // 3, h - 15 + int(rng.integers(0, 5)), w // 2 - 8, w // 2 + 20),
                 (10 + int(rng.integers(0, 5)), h - 10, 5, w // 2 - 4),
                 (12, h - 12, w // 2 + 4, w - 7 - int(rng.integers(0, 5)))]
        cells = {}
        for col, rect in zip(MASK_COLUMNS, rects):
            f = mdir / f"{name}_{col}.png"
            # different encodings of "nonzero = inside": 255, 1, a 16-bit PNG
            if col == "mask_heart" and i % 3 == 1:
                _rect_png(f, hw, rect, value=1)
            elif col == "mask_left_lung" and i % 3 == 2:
                arr = np.zeros(hw, np.uint16)
                arr[rect[0]:rect[1], rect[2]:rect[3]] = 40000
                Image.fromarray(arr).save(f)
            else:
                _rect_png(f, hw, rect)
            cells[col] = f"raw/masks/{f.name}"  # relative to the CSV's folder
        truth[str(root / f"{name}.png")] = (hw, rects)
        rows.append({"file": f"{name}.png", "Cardiomegaly": i % 2, **cells})
    # the last three rows go bad: wrong size, missing file (absolute path), blank cell
    bad_size, missing, blank = (str(root / f"img{i:02d}.png") for i in range(N_GOOD, N_GOOD + 3))
    _rect_png(mdir / "small.png", (100, 120), (10, 50, 10, 50))
    for k, col, cell in ((0, "mask_heart", "raw/masks/small.png"),
                         (1, "mask_left_lung", str(tmp / "nowhere" / "left.png")),
                         (2, "mask_right_lung", "")):
        (tmp / rows[N_GOOD + k][col]).unlink()  # else indexed as an X-ray without masks
        rows[N_GOOD + k][col] = cell
    for p in (bad_size, missing, blank):
        truth.pop(p)
    pd.DataFrame(rows).to_csv(tmp / "labels.csv", index=False)
    out = tmp / "store"
    rc = main(["prepare", "folder", "--root", str(root), "--labels-csv", str(tmp / "labels.csv"),
               "--out", str(out), "--resolution", str(R), "--no-progress"])
    assert rc == 0
    return {"tmp": tmp, "root": root, "out": out, "truth": truth,
            "bad": {"size": bad_size, "missing": missing, "blank": blank}}


def test_mask_columns_follow_mask_names():
    assert MASK_COLUMNS == MASK_LABELS == tuple(f"mask_{n}" for n in MASK_NAMES)


def test_store_has_masks_where_the_rectangles_land(masked):
    st = ImageStore(masked["out"])
    assert st.info["has_masks"] is True and "masks" in st.info["preprocessing"]
    assert st.masks.shape == (N_GOOD, 3, R, R) and st.masks.dtype == np.uint8
    assert set(np.unique(np.asarray(st.masks))) == {0, 1}
    # mask files under the root are not X-rays
    assert not st.meta["path"].str.contains("/masks/").any()
    assert list(st.meta["path"]) == list(masked["truth"])
    ring = np.ones((3, 3), bool)
    for row, path in enumerate(st.meta["path"]):
        hw, rects = masked["truth"][path]
        for c, rect in enumerate(rects):
            want, got = _expected(hw, rect), np.asarray(st.masks[row, c], bool)
            assert want.any(), "test rectangles must survive the crop"
            # equal up to a 1-px edge
            assert not (ndimage.binary_erosion(want, ring) & ~got).any(), (path, c)
            assert not (got & ~ndimage.binary_dilation(want, ring)).any(), (path, c)
    # the right lung (patient's right) is on the image's left, as in the CSV
    m = np.asarray(st.masks, bool)
    cols = np.arange(R)
    mean_x = [(m[:, c].sum(axis=1) * cols).sum() / m[:, c].sum() for c in range(3)]
    assert mean_x[1] < mean_x[0] < mean_x[2]


def test_bad_masks_are_errors_and_the_job_goes_on(masked):
    err = pd.read_csv(masked["out"] / "errors.csv", keep_default_na=False)
    reasons = dict(zip(err["path"], err["reason"]))
    assert set(reasons) == set(masked["bad"].values())
    assert reasons[masked["bad"]["size"]].startswith(
        "mask_heart: size 120x100 differs from the image's 120x90")
    assert reasons[masked["bad"]["missing"]].startswith("mask_left_lung: file not found")
    assert reasons[masked["bad"]["blank"]] == "mask_right_lung: no mask file given (blank cell)"
    info = json.loads((masked["out"] / "store.json").read_text())
    assert info["counts"]["images"] == N_GOOD and info["counts"]["errors"] == 3


def test_workers_give_the_same_masks(masked, tmp_path):
    df = index_folder(masked["root"], masked["tmp"] / "labels.csv")
    assert len(df) == N_GOOD + 3
    prepare_store(df, tmp_path / "w2", R, workers=2, progress=False)
    a, b = ImageStore(masked["out"]), ImageStore(tmp_path / "w2")
    np.testing.assert_array_equal(np.asarray(a.masks), np.asarray(b.masks))
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))


def test_train_segmenter_on_a_folder_store(masked, tmp_path):
    st = ImageStore(masked["out"])
    batch = min(8, len(st.select(split="train")) or N_GOOD)
    assert main(["train-segmenter", "--data", str(masked["out"]), "--out", str(tmp_path / "seg"),
                 "--kimg", "0.016", "--batch", str(batch), "--no-progress"]) == 0
    assert (tmp_path / "seg" / "stats.jsonl").is_file()
    assert any((tmp_path / "seg" / "checkpoints").iterdir())


def test_mask_columns_come_together(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "a.png")
    pd.DataFrame([{"file": "a.png", "Mask-Heart": "h.png"}]).to_csv(tmp_path / "l.csv",
                                                                   index=False)
    with pytest.raises(ValueError, match="come together"):
        index_folder(root, tmp_path / "l.csv")


def test_folder_without_mask_columns_writes_no_masks(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((30, 40), 50 * i, np.uint8)).save(root / f"x{i}.png")
    pd.DataFrame({"file": [f"x{i}.png" for i in range(3)], "Cardiomegaly": [1, 0, 1]}).to_csv(
        tmp_path / "labels.csv", index=False)
    out = tmp_path / "store"
    assert main(["prepare", "folder", "--root", str(root), "--labels-csv",
                 str(tmp_path / "labels.csv"), "--out", str(out), "--resolution", "16",
                 "--no-progress"]) == 0
    st = ImageStore(out)
    assert st.masks is None and not (out / "masks.npy").exists()
    assert st.info["has_masks"] is False and "masks" not in st.info["preprocessing"]
    assert main(["train-segmenter", "--data", str(out), "--out", str(tmp_path / "seg"),
                 "--no-progress"]) == 2
    assert not (tmp_path / "seg").exists()
