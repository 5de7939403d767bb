import numpy as np
import pytest

from cxredit.data.phantom import ctr_from_masks, render, sample_case
from cxredit.latent.heart_warp import RHO, HeartBox, enlarge_heart, row_maps


def test_warp_raises_ctr_and_leaves_far_pixels_unchanged():
    subject, heart = sample_case(11, cardiomegaly=False)
    p = render(subject, heart, 128)
    box = HeartBox.from_mask(p.masks[0])
    img, masks = enlarge_heart(p.image, box, 1.25, masks=p.masks.astype(np.uint8))
    before = ctr_from_masks(p.masks.astype(bool), p.midline_x)
    after = ctr_from_masks(masks.astype(bool), p.midline_x)
    assert after > before + 0.05, (before, after)
    # wider by about the asked factor
    w0 = np.ptp(np.nonzero(p.masks[0].any(0))[0]) + 1
    w1 = np.ptp(np.nonzero(masks[0].any(0))[0]) + 1
    assert 1.15 < w1 / w0 < 1.35
    # the patient's left border (image right) moves about twice as far as the right border
    cols0, cols1 = np.nonzero(p.masks[0].any(0))[0], np.nonzero(masks[0].any(0))[0]
    right_move, left_move = cols1.max() - cols0.max(), cols0.min() - cols1.min()
    assert right_move > left_move >= 0
    # compact support: columns beyond RHO half-widths and rows far from the heart are untouched
    hw = (box.x1 - box.x0) / 2
    c = (box.x0 + box.x1 - 1) / 2
    far_cols = np.abs(np.arange(128) - c) > RHO * hw + 1
    assert np.array_equal(img[:, far_cols], p.image[:, far_cols])
    far_rows = np.abs(np.arange(128) - (box.y0 + box.y1) / 2) > 1.5 * (box.y1 - box.y0) / 2 + 1
    assert np.array_equal(img[far_rows], p.image[far_rows])
    assert img.min() >= p.image.min() and img.max() <= p.image.max()


def test_row_maps_are_monotonic_hence_invertible():
    box = HeartBox(40, 50, 80, 100)
    for scale in (1.1, 1.3, 1.5):
        g, D = row_maps((128, 128), box, scale)
        x = np.arange(128)
        for gy in (0.0, 0.5, 1.0):
            assert np.all(np.diff(x + gy * D) > 0)
    with pytest.raises(ValueError, match="too large"):
        row_maps((128, 128), box, 1.95)
    with pytest.raises(ValueError, match="between 1 and 2"):
        row_maps((128, 128), box, 0.8)


def test_box_parsing_and_empty_mask():
    assert HeartBox.parse("1,2,30,40") == HeartBox(1, 2, 30, 40)
    with pytest.raises(ValueError, match="x0,y0,x1,y1"):
        HeartBox.parse("1,2,3")
    with pytest.raises(ValueError, match="x1 > x0"):
        HeartBox.parse("5,5,1,9")
    with pytest.raises(ValueError, match="empty"):
        HeartBox.from_mask(np.zeros((8, 8), bool))
