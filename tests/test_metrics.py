"""Reconstruction metrics, feature extractors, FID and KID (CPU, small)."""

import math

import numpy as np
import pytest
import torch

from cxredit.metrics.features import available_extractors, get_extractor
from cxredit.metrics.fid import (
    compare_sets,
    fid,
    folder_batches,
    generator_batches,
    kid,
    store_batches,
)
from cxredit.metrics.recon import METRICS, MS_SSIM_WEIGHTS, ms_ssim, ms_ssim_config, recon_metrics


def _images(n=8, r=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, r), torch.linspace(-1, 1, r), indexing="ij")
    blobs = []
    for _ in range(n):
        cx, cy, s = (torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.3])).tolist()
        blobs.append(torch.exp(-((xx - cx + 0.5) ** 2 + (yy - cy + 0.5) ** 2) / (0.05 + s)))
    x = torch.stack(blobs).unsqueeze(1) * 1.6 - 0.8
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# Reconstruction metrics


@pytest.mark.parametrize("r", [16, 32, 64, 128])
def test_recon_identical_and_noisy(r):
    x = _images(3, r)
    m = recon_metrics(x, x.clone())
    assert set(m) == set(METRICS)
    assert all(v.shape == (3,) for v in m.values())
    assert torch.all(m["mse"] == 0)
    assert torch.allclose(m["ssim"], torch.ones(3), atol=1e-5)
    assert torch.allclose(m["ms_ssim"], torch.ones(3), atol=1e-5)
    assert torch.all(m["psnr"] > 100) or torch.all(torch.isinf(m["psnr"]))
    g = torch.Generator().manual_seed(1)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    very = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    n1, n2 = recon_metrics(x, noisy), recon_metrics(x, very)
    for k in ("ssim", "ms_ssim", "psnr"):
        assert torch.all(n1[k] < m[k]) and torch.all(n2[k] < n1[k]), k
    assert torch.all(n2["mse"] > n1["mse"]) and torch.all(n1["mse"] > 0)
    mse = (x - noisy).square().mean(dim=(1, 2, 3))
    assert torch.allclose(n1["psnr"], 10 * torch.log10(4 / mse), rtol=1e-4)


def test_ms_ssim_matches_pytorch_msssim_in_the_standard_setting():
    from pytorch_msssim import ms_ssim as reference

    x = _images(2, 192)
    y = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    ours = ms_ssim(x, y, win_size=11, weights=MS_SSIM_WEIGHTS)
    ref = reference(x, y, data_range=2.0, size_average=False).flatten()
    assert torch.allclose(ours, ref, atol=1e-5)
    cfg = ms_ssim_config(32)
    assert cfg["win_size"] == 7 and len(cfg["weights"]) == 3
    assert math.isclose(sum(cfg["weights"]), 1.0)
    assert len(ms_ssim_config(128)["weights"]) == 4 and len(ms_ssim_config(256)["weights"]) == 5


def test_recon_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        recon_metrics(torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="unknown metric"):
        recon_metrics(torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32), names=("lpips",))
    with pytest.raises(ValueError, match="at least"):
        ms_ssim(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32), win_size=11,
                weights=MS_SSIM_WEIGHTS)


# ---------------------------------------------------------------------------------------------
# FID / KID on Gaussian features


def _gauss(n, d=8, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_fid_zero_on_identical_and_monotonic_in_shift():
    a = _gauss(500)
    assert abs(fid(a, a)) < 1e-6
    assert abs(fid(torch.from_numpy(a), a)) < 1e-6
    shifts = [0.1, 0.3, 1.0, 2.0]
    vals = [fid(a, _gauss(500, shift=s, seed=1)) for s in shifts]
    assert all(v1 < v2 for v1, v2 in zip(vals, vals[1:])), vals
    # a pure mean shift s on every one of d=8 axes adds about d * s^2
    assert vals[-1] == pytest.approx(8 * 4, rel=0.1)
    same = fid(a, _gauss(500, seed=2))
    assert same < 0.2 * vals[2]


def test_fid_singular_covariance_and_bad_shapes():
    a = _gauss(5, d=20)  # fewer samples than dimensions: singular covariances
    v = fid(a, _gauss(5, d=20, seed=1))
    assert math.isfinite(v)
    with pytest.raises(ValueError, match="dimensions differ"):
        fid(_gauss(10, d=4), _gauss(10, d=5))
    with pytest.raises(ValueError, match="N >= 2"):
        fid(_gauss(1), _gauss(10))


def test_kid_unbiased_on_equal_distributions_positive_on_shifted():
    a, b = _gauss(400, seed=0), _gauss(400, seed=1)
    mean, std = kid(a, b, subsets=50, subset_size=100)
    assert std > 0
    assert abs(mean) < 3 * std / math.sqrt(50) + 1e-3
    shifted, _ = kid(a, _gauss(400, shift=0.5, seed=1), subsets=50, subset_size=100)
    assert shifted > 0 and shifted > mean + 5 * std
    # same seed, same subsets
    assert kid(a, b, subsets=5, subset_size=50) == kid(a, b, subsets=5, subset_size=50)


def test_kid_can_be_negative():
    vals = [kid(_gauss(30, seed=s), _gauss(30, seed=s + 100), subsets=1, subset_size=30)[0]
            for s in range(10)]
    assert min(vals) < 0 < max(vals)


# ---------------------------------------------------------------------------------------------
# Extractors


def test_random_extractor_fid_sees_brightness():
    ex = get_extractor("random", seed=3, batch_size=16)
    assert ex.name == "random" and ex.dim == 64
    x = _images(64, 32)
    f = ex(x)
    assert f.shape == (64, 64) and f.dtype == np.float64
    assert np.array_equal(f, get_extractor("random", seed=3)(x))  # fixed weights
    other = _images(64, 32, seed=5)
    brighter = (other + 0.3).clamp(-1, 1)
    batches = [x[:20], x[20:]]
    r_self = compare_sets(batches, x, ex, kid_subsets=10, kid_subset_size=32)
    r_same = compare_sets(x, other, ex, kid_subsets=10, kid_subset_size=32)
    r_bright = compare_sets(x, brighter, ex, kid_subsets=10, kid_subset_size=32)
    assert r_self["extractor"] == "random" and r_self["n_a"] == 64 and r_self["n_b"] == 64
    assert abs(r_self["fid"]) < 1e-6
    assert r_bright["fid"] > 2 * r_same["fid"] > 0
    assert r_bright["kid_mean"] > r_same["kid_mean"]
    assert {"fid", "kid_mean", "kid_std", "extractor", "n_a", "n_b"} <= set(r_bright)


def test_extractor_registry_errors(tmp_path):
    assert {"inception", "encoder", "random", "classifier"} <= set(available_extractors())
    with pytest.raises(ValueError, match="unknown feature extractor"):
        get_extractor("vgg")
    with pytest.raises(ValueError, match="classifier run or checkpoint"):
        get_extractor("classifier")
    with pytest.raises(ValueError, match="--encoder"):
        get_extractor("encoder")
    with pytest.raises(ValueError, match=r"nothing is downloaded.*--inception-weights PATH"):
        get_extractor("inception")
    with pytest.raises(ValueError, match="no such file.*--inception-weights"):
        get_extractor("inception", weights=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="cannot read.*--inception-weights"):
        get_extractor("inception", weights=bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="not a torchvision Inception-v3"):
        get_extractor("inception", weights=wrong)
    with pytest.raises(ValueError, match=r"\[N,1,R,R\]"):
        get_extractor("random")(torch.zeros(2, 3, 32, 32))


def test_inception_extractor_from_local_weights(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)  # test-only: the fake weights need not be reproducible
    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "inception_v3_fake.pth"
    torch.save(net.state_dict(), path)  # includes AuxLogits.*, like torchvision's file
    ex = get_extractor("inception", weights=path, batch_size=2)
    assert ex.name == "inception" and ex.dim == 2048
    x = _images(2, 32)
    f = ex(x)
    assert f.shape == (2, 2048) and np.isfinite(f).all() and f.std() > 0


def test_encoder_extractor_pools_layer4():
    from cxredit.models.encoder import ENCODER_PRESETS, Encoder

    E = Encoder(ENCODER_PRESETS["tiny"])
    ex = get_extractor("encoder", encoder=E, batch_size=4)
    x = _images(6, 32)
    f = ex(x)
    assert f.shape == (6, ex.dim) and ex.dim == 128
    _, feats = E(x, return_features=True)
    assert np.allclose(f, feats[4].mean(dim=(2, 3)).double().numpy(), atol=1e-5)
    assert ex(_images(2, 64)).shape == (2, 128)  # other sizes are resized


def test_generator_and_folder_sources(tmp_path):
    from cxredit.data.io import write_png
    from cxredit.models.stylegan2 import Generator

    G = Generator(z_dim=16, w_dim=16, img_resolution=16, channel_base=256, channel_max=16,
                  mapping_layers=1)
    a = torch.cat(list(generator_batches(G, 5, batch=2, seed=1)))
    b = torch.cat(list(generator_batches(G, 5, batch=3, seed=1)))
    assert a.shape == (5, 1, 16, 16) and a.abs().max() <= 1
    assert not torch.equal(a, torch.cat(list(generator_batches(G, 5, batch=2, seed=2))))
    assert torch.allclose(a[:2], b[:2])  # same seed, same first batch of z

    x = _images(3, 32)
    for i, img in enumerate(x):
        write_png(tmp_path / f"{i}.png", ((img[0] + 1) * 127.5).round().byte().numpy())
    got = torch.cat(list(folder_batches(tmp_path, 32, batch=2)))
    assert got.shape == (3, 1, 32, 32) and (got - x).abs().max() <= 1 / 127.5 + 1e-6
    with pytest.raises(ValueError, match="no PNG"):
        list(folder_batches(tmp_path / "empty", 32))


def test_store_batches(tmp_path):
    from cxredit.cli import main
    from cxredit.data.store import ImageStore

    assert main(["phantoms", "--n", "12", "--resolution", "32", "--no-progress",
                 "--out", str(tmp_path / "s"), "--seed", "1"]) == 0
    st = ImageStore(tmp_path / "s")
    got = list(store_batches(tmp_path / "s", split=None, limit=10, batch=4))
    assert [len(b) for b in got] == [4, 4, 2]
    assert torch.equal(torch.cat(got), st.tensor(np.arange(10)))
    train = torch.cat(list(store_batches(st, split="train", batch=64)))
    assert len(train) == len(st.select("train"))
