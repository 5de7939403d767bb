"""Tests of the procedural chest X-ray phantoms (cxredit.data.phantom).

They check the promises other modules rely on: determinism, the counterfactual guarantee
(a heart-size change touches only the heart region), masks consistent with the parameters
(CTR), labels and confounder rates, and the radiographic orientation.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from cxredit.data import phantom as P

CTR_SUBJECTS = range(100, 120)  # 20 subjects
CTR_SCALES = (0.8, 1.1, 1.45)


@pytest.fixture(scope="module")
def subject() -> P.Subject:
    return P.sample_subject(7, device=True, sex="F")  # every optional structure on


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_render_shapes_dtypes_ranges(subject, resolution):
    p = P.render(subject, 1.2, resolution)
    assert p.image.shape == (resolution, resolution) and p.image.dtype == np.float32
    assert p.masks.shape == (3, resolution, resolution) and p.masks.dtype == bool
    assert 0.0 <= p.image.min() and p.image.max() <= 1.0
    assert np.isfinite(p.image).all()
    assert all(m.any() for m in p.masks), "heart and both lungs must be visible"
    assert not (p.masks[0] & (p.masks[1] | p.masks[2])).any(), "lungs exclude the heart"
    assert 0 < p.midline_x < resolution
    assert len(P.MASK_NAMES) == 3 and P.MASK_NAMES[0] == "heart"


def test_same_seed_same_image_different_seed_differs():
    a = P.render(P.sample_subject(3), 1.1)
    b = P.render(P.sample_subject(3), 1.1)
    c = P.render(P.sample_subject(4), 1.1)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert np.abs(a.image - c.image).mean() > 0.01
    assert (a.masks != c.masks).any()


def test_noise_is_seeded_and_optional(subject):
    clean, noisy = P.render(subject, noise=False), P.render(subject, noise=True)
    np.testing.assert_array_equal(clean.masks, noisy.masks)
    assert 0.002 < np.abs(clean.image - noisy.image).mean() < 0.1
    np.testing.assert_array_equal(noisy.image, P.render(subject, noise=True).image)


@pytest.mark.parametrize("seed,scales", [(7, (1.0, 1.4)), (21, (0.8, 1.6)), (33, (1.2, 1.25))])
def test_counterfactual_changes_only_the_heart(seed, scales):
    s = P.sample_subject(seed, device=seed == 7)
    a, b = (P.render(s, h) for h in scales)
    # Blur spreads a change by at most 3 px (kernel cut at 3 sigma, sigma <= 0.9 px), in a
    # square neighbourhood because the blur is separable.
    region = binary_dilation(a.masks[0] | b.masks[0], np.ones((3, 3), bool), iterations=4)
    diff = np.abs(a.image.astype(np.float64) - b.image)
    assert diff[~region].max() < 1e-6
    assert diff[region].mean() > 0.005, "the heart region must change"
    assert b.masks[0].sum() > a.masks[0].sum()
    # lungs only lose what the bigger heart covers
    assert not (b.masks[1:] & ~a.masks[1:]).any()
    assert a.midline_x == b.midline_x


def test_mask_ctr_matches_parameters():
    """Masks measure the parameter-derived CTR up to pixel quantisation.

    Each of the four extreme columns is quantised by up to half a pixel, so at 128 px
    (thoracic width ~90-110 px) single cases can differ by ~(1 + CTR) / ID ~ 0.015; the
    bulk must be within 0.01, and all within 0.01 at 256 px.
    """
    errs = []
    for seed in CTR_SUBJECTS:
        s = P.sample_subject(seed)
        for h in CTR_SCALES:
            p = P.render(s, h, 128, noise=False)
            errs.append(p.mask_ctr - P.subject_ctr(s, h))
    errs = np.abs(errs)
    assert errs.max() < 0.016
    assert np.mean(errs < 0.01) >= 0.9
    assert errs.mean() < 0.005
    for seed in list(CTR_SUBJECTS)[:6]:
        s = P.sample_subject(seed)
        for h in (0.8, 1.45):
            p = P.render(s, h, 256, noise=False)
            assert abs(p.mask_ctr - p.ctr) < 0.01


def test_ctr_counts_only_the_heart_above_the_diaphragm():
    """A heart sunk into the abdomen is measured (and masked) only where it is visible."""
    s = P.sample_subject(3)
    cx, cy, a, b, t = s.lv
    low = dataclasses.replace(s, lv=(cx, cy + 0.25, a, b, t))  # LV's widest point hidden
    p = P.render(low, 1.2, 256, noise=False)
    assert abs(p.mask_ctr - p.ctr) < 0.005  # the unclipped outline would be 0.015 wider


def test_ctr_is_monotonic_in_heart_scale():
    for seed in range(5):
        s = P.sample_subject(seed)
        ctrs = [P.subject_ctr(s, h) for h in np.linspace(0.6, 1.9, 27)]
        assert np.all(np.diff(ctrs) > 0)
        masks = [P.render(s, h, 64, noise=False).mask_ctr for h in (0.7, 1.2, 1.7)]
        assert masks[0] < masks[1] < masks[2]


@pytest.mark.parametrize("target", [0.38, 0.45, 0.5, 0.58, 0.65])
def test_heart_scale_for_ctr_inverts(target):
    for seed in range(4):
        s = P.sample_subject(seed)
        assert P.subject_ctr(s, P.heart_scale_for_ctr(s, target)) == pytest.approx(target,
                                                                                  abs=1e-5)


def test_heart_scale_for_ctr_rejects_unreachable():
    for target in (0.1, 0.95):
        with pytest.raises(ValueError, match="outside"):
            P.heart_scale_for_ctr(P.sample_subject(0), target)


def test_sample_case_ctr_ranges_and_labels():
    for seed in range(40):
        for cardio in (False, True):
            s, h = P.sample_case(seed, cardio)
            ctr = P.subject_ctr(s, h)
            lo, hi = P.CARDIOMEGALY_CTR_RANGE if cardio else P.HEALTHY_CTR_RANGE
            assert lo - 1e-6 <= ctr <= hi + 1e-6
            assert (ctr > P.CARDIOMEGALY_CTR) == cardio
    # the same seed is the same patient whatever the label: only the heart differs
    (a, _), (b, _) = P.sample_case(5, False, 0.0, 0.0), P.sample_case(5, True, 0.0, 0.0)
    assert repr(a) == repr(b)  # (the repr covers every parameter)
    np.testing.assert_array_equal(a.vessels, b.vessels)


def test_orientation_heart_left_of_patient_right_dome_higher():
    for seed in range(10):
        s, h = P.sample_case(seed, seed % 2 == 1)
        p = P.render(s, h, 128, noise=False)
        heart, right, left = p.masks
        cols = np.flatnonzero(heart.any(0))
        # heart mass on the image right of the spine; ~1/3 of its width to the image left
        assert np.argwhere(heart)[:, 1].mean() + 0.5 > p.midline_x + 3
        share = (p.midline_x - cols[0]) / (cols[-1] + 1 - cols[0])
        assert 0.2 < share < 0.45
        # right lung (image left) on the left; its dome higher (smaller row) than the left
        # one, compared where the heart does not hide the dome. Without the pose rotation:
        # a 2.5 degree tilt moves the two costophrenic angles by about the dome difference.
        assert np.argwhere(right)[:, 1].max() < p.midline_x < np.argwhere(left)[:, 1].min()
        heart, right, left = P.render(dataclasses.replace(s, rotation=0.0), h, 128).masks
        free = ~heart.any(0)
        dome_r = min(np.flatnonzero(c).max() for c in right.T[free] if c.any())
        dome_l = min(np.flatnonzero(c).max() for c in left.T[free] if c.any())
        assert dome_r + 3 < dome_l
        assert 0.075 <= s.dome_drop <= 0.125  # 1.5-2.5 cm at ~20 cm per unit


def test_radiographic_contrast():
    """Lungs dark but not black, heart and abdomen bright, air outside the body darkest."""
    for seed in range(6):
        s = dataclasses.replace(P.sample_subject(seed), collimation=(0.0, 0.0, 0.0, 0.0))
        p = P.render(s, 1.0, 128, noise=False)
        heart, lungs = p.masks[0], p.masks[1] | p.masks[2]
        lung, hrt = p.image[lungs].mean(), p.image[heart].mean()
        abdomen = p.image[-8:, 48:80].mean()
        air = min(p.image[:3, :3].mean(), p.image[:3, -3:].mean())  # above the shoulders
        assert air < lung < hrt and lung < abdomen
        assert 0.08 < lung < 0.6 and hrt > lung + 0.25


def test_device_confounder_frequencies():
    n = 300
    healthy = [P.sample_case(s, False, 0.05, 0.3)[0].device for s in range(n)]
    cardio = [P.sample_case(s, True, 0.05, 0.3)[0].device for s in range(n)]
    assert 0.01 < np.mean(healthy) < 0.10  # 0.05 +- 4 sd
    assert 0.2 < np.mean(cardio) < 0.4  # 0.30 +- 4 sd
    assert all(c for h, c in zip(healthy, cardio) if h), "a device never disappears"
    assert not any(P.sample_subject(s, device_prob=0.0).device for s in range(50))


def test_render_batch_matches_render_and_meta():
    seeds, flags = [3, 4, 5, 6], [False, True, False, True]
    images, masks, meta = P.render_batch(seeds, flags, 64, device_probs=(0.0, 1.0))
    assert images.shape == (4, 64, 64) and images.dtype == np.uint8
    assert masks.shape == (4, 3, 64, 64) and masks.dtype == np.uint8
    json.dumps(meta)  # stores write it as JSON
    for i, (seed, flag, m) in enumerate(zip(seeds, flags, meta)):
        s, h = P.sample_case(seed, flag, 0.0, 1.0)
        p = P.render(s, h, 64)
        np.testing.assert_array_equal(images[i], np.round(np.clip(p.image, 0, 1) * 255))
        np.testing.assert_array_equal(masks[i], p.masks)
        assert m["patient_id"] == f"phantom{seed:07d}" and m["view"] == "PA"
        assert m["subject_seed"] == seed and m["sex"] in ("M", "F")
        assert m["heart_scale"] == pytest.approx(h) and m["ctr"] == pytest.approx(p.ctr)
        assert m["Cardiomegaly"] == float(flag) == float(m["ctr"] > 0.5)
        assert m["device"] == int(flag) and m["Support Devices"] == float(flag)
        assert m["No Finding"] == float(not flag)
    with pytest.raises(ValueError):
        P.render_batch([1, 2], [True], 32)


def test_ctr_from_masks_on_hand_made_masks():
    m = np.zeros((3, 20, 20), np.uint8)
    m[0, 8:12, 6:12] = 1  # heart: columns 6..11 -> edges at 6 and 12
    m[1, 4:15, 2:8] = 1  # right lung (image left): outer edge at 2
    m[2, 4:16, 11:18] = 1  # left lung: outer edge at 18 (one past column 17)
    m[1, 3, 1] = 1  # wider rows with one lung only: rows without both lungs do not count
    m[2, 15, 19] = 1
    assert P.ctr_from_masks(m, 8.0) == pytest.approx((2 + 4) / 16)
    assert P.ctr_from_masks(m.astype(bool), 8.0) == pytest.approx(6 / 16)
    assert np.isnan(P.ctr_from_masks(np.zeros((3, 8, 8), bool), 4.0))
    with pytest.raises(ValueError):
        P.ctr_from_masks(m[:2], 8.0)


def test_replaced_subject_gets_a_fresh_ctr(subject):
    wider = dataclasses.replace(subject, thorax_hw=subject.thorax_hw * 1.1)
    assert P.subject_ctr(wider) < P.subject_ctr(subject)


def test_invalid_arguments(subject):
    with pytest.raises(ValueError):
        P.render(subject, 1.0, 8)
    with pytest.raises(ValueError):
        P.render(subject, 0.0)
    with pytest.raises(ValueError):
        P.sample_subject(-1)
    with pytest.raises(ValueError):
        P.sample_subject(1, sex="X")
