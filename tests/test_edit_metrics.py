"""Edit efficacy, identity, true-counterfactual and LEC metrics."""

import numpy as np
import pytest
import torch
from torch import nn

from cxredit.bundle import load_bundle
from cxredit.data.prepare import make_phantom_store
from cxredit.data.store import ImageStore
from cxredit.metrics.edit import (
    dilate,
    edit_sweep,
    latent_editing_consistency,
    region_scores,
    ssim_map,
    summarize_sweep,
    true_counterfactuals,
)
from cxredit.metrics.recon import ssim


@pytest.mark.parametrize("side", [16, 32, 64])
def test_ssim_map_mean_is_pytorch_msssim_ssim(side):
    g = torch.Generator().manual_seed(side)
    x = torch.rand(3, 1, side, side, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 1, side, side, generator=g)).clamp(-1, 1)
    m = ssim_map(x, y)
    np.testing.assert_allclose(m.mean((1, 2, 3)).numpy(), ssim(x, y).numpy(), atol=1e-5)


def test_region_scores_ignore_changes_outside_the_region():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 64, 64, generator=g) * 2 - 1
    y = x.clone()
    y[:, :, 20:30, 20:30] += 0.5  # the "heart" changes
    heart = torch.zeros(2, 64, 64, dtype=torch.bool)
    heart[:, 20:30, 20:30] = True
    out = region_scores(y, x, ~heart)
    np.testing.assert_allclose(out["ssim"], 1.0, atol=1e-6)  # no window straddles the change
    np.testing.assert_allclose(out["mse"], 0.0, atol=1e-12)
    inside = region_scores(y, x, heart)
    assert (inside["mse"] > 0.2).all()
    y[:, :, 50:52, 50:52] -= 0.5  # a change outside the heart is seen
    out2 = region_scores(y, x, ~heart)
    assert (out2["ssim"] < 0.999).all() and (out2["mse"] > 0).all()
    assert np.isnan(region_scores(y, x, torch.zeros_like(heart))["ssim"]).all()


def test_dilate_grows_a_pixel_into_a_square():
    m = torch.zeros(1, 9, 9, dtype=torch.bool)
    m[0, 4, 4] = True
    assert dilate(m, 2).sum() == 25 and dilate(m, 0).sum() == 1


def test_true_counterfactuals_reproduce_the_store_and_grow_the_heart(tmp_path):
    make_phantom_store(tmp_path / "s", 6, 32, 0.5, 11, progress=False)
    st = ImageStore(tmp_path / "s")
    m = st.meta
    args = (m["subject_seed"].to_numpy(), m["Cardiomegaly"].to_numpy() == 1)
    cf = true_counterfactuals(*args, m["ctr"].to_numpy(), 32)
    real = torch.from_numpy(st.images[:].astype(np.float32) / 127.5 - 1)[:, None]
    assert (cf - real).abs().max() < 1.5 / 127.5  # only the store's 8-bit rounding differs
    bigger = true_counterfactuals(*args, m["ctr"].to_numpy() + 0.05, 32)
    changed = (bigger - cf).abs()[:, 0] > 0.02
    heart = torch.from_numpy(st.masks[:, 0] > 0)
    assert changed.any() and not (changed & ~dilate(heart, 4)).any()
    nan = true_counterfactuals(*args, np.full(6, np.nan), 32)
    assert torch.isnan(nan).all()


def test_summarize_sweep_counts_only_pushes_that_keep_identity():
    sweep = {"alphas": np.array([0.0, 1.0, 2.0]),
             # image 0 crosses at alpha 1 with identity; image 1 crosses only with bad identity;
             # image 2 never crosses; image 3 starts above 0.5 (not counted)
             "ctr": np.array([[0.45, 0.45, 0.40, 0.55],
                              [0.52, 0.48, 0.45, 0.58],
                              [0.60, 0.55, 0.48, 0.62]]),
             "ssim_outside_heart": np.array([[1.0, 1.0, 1.0, 1.0],
                                             [0.95, 0.95, 0.95, 0.95],
                                             [0.85, 0.85, 0.85, 0.85]]),
             "mse_outside_heart": np.zeros((3, 4))}
    s = summarize_sweep(sweep)
    assert s["n_below_threshold_at_0"] == 3
    assert s["pushed_past_0_5"] == pytest.approx(1 / 3)
    assert s["frac_past_0_5"] == pytest.approx([0.25, 0.5, 0.75])
    assert summarize_sweep(sweep, identity_ssim=0.8)["pushed_past_0_5"] == pytest.approx(2 / 3)


def test_edit_sweep_on_a_bundle(tiny_bundle):
    b = load_bundle(tiny_bundle)
    w = b.E(torch.rand(5, 1, b.resolution, b.resolution) * 2 - 1)
    v = torch.from_numpy(b.directions["lda"][0])
    out = edit_sweep(b.G, w, v, [2.0, -1.0], b.segmenter, keep_images=2)
    assert out["alphas"].tolist() == [-1.0, 0.0, 2.0]
    assert out["ctr"].shape == out["ssim_outside_heart"].shape == (3, 5)
    i0 = 1  # alpha 0 is the identity reference: perfect scores
    ok = ~np.isnan(out["ssim_outside_heart"][i0])
    np.testing.assert_allclose(out["ssim_outside_heart"][i0][ok], 1.0, atol=1e-6)
    np.testing.assert_allclose(out["mse_outside_heart"][i0], 0.0, atol=1e-12)
    assert out["images"].shape == (2, 3, 1, b.resolution, b.resolution)
    assert not torch.equal(out["images"][:, 0], out["images"][:, 2])
    s = summarize_sweep(out)
    assert len(s["ctr_mean"]) == 3 and s["n"] == 5


class _LinearG(nn.Module):
    """G(w) = reshape(A w): invertible, with its exact inverse as the encoder."""

    img_resolution, num_ws, w_dim = 4, 2, 16

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = nn.Parameter(torch.randn(16, 16, generator=g) * 0.1 + torch.eye(16) * 0.2)

    def synthesis(self, w, noise_mode="const"):
        return (w @ self.A.T).reshape(-1, 1, 4, 4)


def test_lec_is_zero_for_an_exact_inverse_and_grows_with_encoder_error():
    G = _LinearG()
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(1)) * 0.5
    v = torch.zeros(16)
    v[3] = 1.0
    exact = lambda x: x.reshape(-1, 16) @ torch.linalg.inv(G.A).T  # noqa: E731
    r = latent_editing_consistency(G, exact, w, v, 1.5)
    assert r["mse"] < 1e-10 and r["latent_rel"] < 1e-4
    biased = lambda x: exact(x) * 0.9  # noqa: E731
    r2 = latent_editing_consistency(G, biased, w, v, 1.5)
    assert r2["mse"] > 1e-4 and r2["latent_rel"] > 0.05
