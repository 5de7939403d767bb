"""CTR and Dice from masks: exact geometry on rectangles, agreement with the phantom's CTR."""

import numpy as np
import pytest
import torch

from cxredit.data.phantom import ctr_from_masks, render, sample_case
from cxredit.metrics.ctr import ctr, dice


def _rect_masks(R: int = 20) -> np.ndarray:
    """Lungs at cols 2..7 / 12..17 (rows 5..14), one wider row 10 (right lung from col 1);
    heart at cols 6..13 (rows 8..15, overlapping the lungs' inner parts)."""
    m = np.zeros((3, R, R), bool)
    m[1, 5:15, 2:8] = True
    m[1, 10, 1] = True
    m[2, 5:15, 12:18] = True
    m[0, 8:16, 6:14] = True
    return m


def test_rectangles_exact_geometry_default_midline():
    r = ctr(_rect_masks())
    # ID on row 10: left lung's outer edge 18 (one past col 17) - right lung's edge 1
    assert r["id"] == 17
    assert r["midline"] == 9.5
    assert r["mrd"] == 9.5 - 6 and r["mld"] == 14 - 9.5
    assert r["ctr"] == pytest.approx(8 / 17)


def test_given_midline_and_heart_on_one_side():
    m = _rect_masks()
    r = ctr(m, midline=10.0)
    assert (r["mrd"], r["mld"], r["midline"]) == (4.0, 4.0, 10.0)
    r = ctr(m, midline=5.0)  # heart wholly to the patient's left of the midline
    assert r["mrd"] == 0.0 and r["mld"] == 9.0 and r["ctr"] == pytest.approx(9 / 17)


def test_batched_numpy_and_torch_with_per_image_midlines():
    m = _rect_masks()
    m2 = m.copy()
    m2[0, 8:16, 4:6] = True  # heart now also covers cols 4..5
    batch = np.stack([m, m2])
    r = ctr(torch.from_numpy(batch), midline=np.array([10.0, 10.0]))
    np.testing.assert_allclose(r["mrd"], [4.0, 6.0])
    np.testing.assert_allclose(r["ctr"], [8 / 17, 10 / 17])
    assert r["ctr"].shape == (2,)
    with pytest.raises(ValueError, match="masks must be"):
        ctr(np.zeros((2, 2, 8, 8), bool))


def test_nan_when_heart_or_lungs_missing():
    m = _rect_masks()
    m[0] = False
    r = ctr(m)
    assert np.isnan(r["ctr"]) and np.isnan(r["mrd"]) and r["id"] == 17
    m = _rect_masks()
    m[2] = False  # no row with both lungs
    r = ctr(m)
    assert np.isnan(r["ctr"]) and np.isnan(r["id"]) and np.isnan(r["midline"])
    assert np.isnan(ctr(np.zeros((3, 16, 16), bool), midline=8.0)["ctr"])


def test_agrees_with_phantom_ctr_from_masks():
    imgs = [render(*sample_case(seed, cardiomegaly=seed % 2 == 1), resolution=64)
            for seed in range(6)]
    masks = np.stack([p.masks for p in imgs])
    mids = np.array([p.midline_x for p in imgs])
    r = ctr(masks, midline=mids)
    ref = np.array([ctr_from_masks(p.masks, p.midline_x) for p in imgs])
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(r["ctr"], ref, rtol=0, atol=1e-12)
    assert ctr(imgs[0].masks, imgs[0].midline_x)["ctr"] == pytest.approx(ref[0], abs=1e-12)
    # the default midline (thoracic centre) lands close to the spine on phantoms
    d = ctr(masks)
    assert np.all(np.abs(d["midline"] - mids) < 0.1 * d["id"])
    assert np.all(np.abs(d["ctr"] - ref) < 0.05)


def test_dice_known_overlaps():
    p = np.zeros((2, 3, 4, 4), bool)
    t = np.zeros((2, 3, 4, 4), bool)
    p[0, 0, 0, :] = True  # 4 px
    t[0, 0, 0, 2:] = True  # 2 px, both inside p: 2*2/(4+2)
    t[0, 0, 1, 0:2] = True  # + 2 px outside: 2*2/(4+4)
    p[0, 1] = t[0, 1] = True  # identical
    t[0, 2, 0, 0] = True  # missed entirely
    # image 1: all empty -> 1 by convention
    d = dice(p, torch.from_numpy(t))
    np.testing.assert_allclose(d, [[0.5, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert dice(p[0], t[0]).shape == (3,)
    assert np.isnan(dice(p[1], t[1], empty=np.nan)).all()
    with pytest.raises(ValueError):
        dice(p, t[0])
