"""Optimisation-based projection (W / W+) on tiny generators, and the resumable `project` API."""

import logging

import numpy as np
import pytest
import torch

import cxredit.latent.project as proj
from cxredit.checkpoint import checkpoint_sha256
from cxredit.config import encoder_train_preset
from cxredit.data.io import read_png_text
from cxredit.data.store import ImageStore
from cxredit.latent.io import load_latents
from cxredit.latent.project import lr_factor, partial_path, project, project_images
from cxredit.models.stylegan2 import Generator
from cxredit.runs import Run, find_checkpoint
from cxredit.train.encoder import EncoderTrainer, load_encoder
from cxredit.train.gan import GanTrainer, load_generator
from test_train_gan import _blob_store, _cfg  # noqa: I001


@pytest.fixture(scope="module")
def G():
    """Untrained 16-px G, rescaled so that its images lie in [-1, 1] and its noise matters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        G = Generator(z_dim=16, w_dim=16, img_resolution=16, channel_base=256, channel_max=32,
                      mapping_layers=2)
    with torch.no_grad():
        for m in G.synthesis.modules():
            if hasattr(m, "noise_strength"):
                m.noise_strength.fill_(0.1)
            if type(m).__name__ == "ToRGBLayer":
                m.weight.mul_(0.15)
    return G.eval().requires_grad_(False)


def _planted(G, n, seed=1):
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        w = G.mapping(z, broadcast=False)
        return w, G.synthesis(w, noise_mode="const")


def test_planted_images_are_valid_targets(G):
    w, x = _planted(G, 4)
    assert x.abs().max() < 1  # in range: clamping does not hide errors
    assert (x[0] - x[1]).abs().mean() > 0.05 and x.std(dim=0).mean() > 0.05  # vary with w


def test_lr_schedule_is_nvlabs():
    assert lr_factor(0.0) == 0.0  # ramp-up from zero: the first step does not move
    assert lr_factor(0.025) == pytest.approx(0.5)
    assert lr_factor(0.5) == pytest.approx(1.0)
    assert lr_factor(0.875) == pytest.approx(0.5)  # half way through the cosine ramp-down
    assert lr_factor(0.999) < 1e-4


@pytest.mark.parametrize("space", ["w", "w+"])
def test_recovers_a_planted_latent(G, space):
    w_star, x = _planted(G, 2)
    r = project_images(G, x, space=space, steps=120, generator=torch.Generator().manual_seed(0))
    shape = [2, G.w_dim] if space == "w" else [2, G.num_ws, G.w_dim]
    assert list(r["w"].shape) == shape and r["images"].shape == x.shape
    assert (r["ssim"] > 0.95).all(), r["ssim"]
    hist = r["loss_history"]
    assert hist.shape == (120,) and hist[-1] < hist[0] / 4
    if space == "w":  # W is low-dimensional enough that the latent itself comes back
        assert (r["mse"] < 1e-4).all(), r["mse"]
        assert (r["w"] - w_star).abs().max() < 0.05
        assert torch.allclose(r["psnr"], 10 * torch.log10(4 / r["mse"]))


def test_result_of_an_image_does_not_depend_on_its_batch(G):
    """[a, b] together == a alone (same seed for a); catches batch-coupled losses or draws."""
    _, x = _planted(G, 2, seed=2)
    kw = dict(space="w+", steps=40, optimize_noise=True)
    both = project_images(G, x, generator=torch.Generator().manual_seed(7), **kw)
    alone = project_images(G, x[:1], generator=torch.Generator().manual_seed(7), **kw)
    torch.testing.assert_close(both["w"][:1], alone["w"], atol=1e-5, rtol=0)
    for m2, m1 in zip(both["noise"], alone["noise"]):
        torch.testing.assert_close(m2[:1], m1, atol=1e-5, rtol=0)
    torch.testing.assert_close(both["ssim"][:1], alone["ssim"], atol=1e-5, rtol=0)
    assert (both["w"][0] - both["w"][1]).abs().max() > 1e-2  # b got its own latent
    # optimised noise maps stay normalised per image and were actually used
    assert all(abs(float(m[1].mean())) < 1e-4 for m in both["noise"])
    assert all(m.shape[:2] == (2, 1) for m in both["noise"])


def test_deterministic_given_seed_and_init_is_the_start(G):
    w_star, x = _planted(G, 2, seed=3)
    a = project_images(G, x, steps=10, generator=torch.Generator().manual_seed(5))
    b = project_images(G, x, steps=10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["w"], b["w"])
    # step 0 has learning rate 0 (ramp-up), so one step returns the start, broadcast for W+
    one = project_images(G, x, space="w+", init=w_star, steps=1)
    assert torch.equal(one["w"], w_star.unsqueeze(1).expand(-1, G.num_ws, -1))


def test_good_init_starts_and_ends_closer(G):
    """An encoder-like init (planted w + small error) beats the mean w."""
    w_star, x = _planted(G, 2, seed=4)
    near = w_star + 0.02 * torch.randn(w_star.shape, generator=torch.Generator().manual_seed(0))
    kw = dict(space="w+", steps=20, generator=torch.Generator().manual_seed(0))
    good = project_images(G, x, init=near, **kw)
    mean = project_images(G, x, init=None, **kw)
    assert good["loss_history"][0] < mean["loss_history"][0] / 2
    assert good["loss_history"][-1] < mean["loss_history"][-1]


def test_project_images_validation(G, caplog, monkeypatch):
    x = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match="16-px generator"):
        project_images(G, torch.zeros(2, 1, 32, 32), steps=1)
    with pytest.raises(ValueError, match="LIN_WEIGHTS,VGG16_WEIGHTS"):
        project_images(G, x, steps=1, lpips_weights="vgg.pth")
    with pytest.raises(ValueError, match="init must be"):
        project_images(G, x, space="w", init=torch.zeros(3, G.num_ws, G.w_dim), steps=1)
    # a W+ start (a W+ encoder's guess) of a W projection starts from its layer mean
    wp = torch.randn(2, G.num_ws, G.w_dim, generator=torch.Generator().manual_seed(1))
    one = project_images(G, x, space="w", init=wp, steps=1)
    torch.testing.assert_close(one["w"], wp.mean(1))
    with pytest.raises(ValueError, match="space"):
        project_images(G, x, space="z", steps=1)
    monkeypatch.setattr(proj, "_lpips_note_logged", False)
    with caplog.at_level(logging.INFO, logger="cxredit.latent.project"):
        project_images(G, x, steps=1)
        project_images(G, x, steps=1)
    assert [r.getMessage() for r in caplog.records].count(
        "no local LPIPS weights; using MSE + SSIM") == 1


# ---------------------------------------------------------------------------- project() API


@pytest.fixture(scope="module")
def gan(tmp_path_factory):
    """(GAN run folder, 16-px store): an untrained tiny GAN checkpoint."""
    root = tmp_path_factory.mktemp("proj")
    store = _blob_store(root / "store", n=16)
    cfg = _cfg()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tr = GanTrainer(cfg, store, Run(root / "gan"), progress=False)
    tr.run.write_config(cfg.to_dict(), kind="gan")
    tr.checkpoint()
    return root / "gan", root / "store"


class _Counting:
    """Wraps project_images: counts images, raises KeyboardInterrupt at call `stop_at`."""

    def __init__(self, stop_at=None):
        self.calls, self.images, self.stop_at = 0, 0, stop_at

    def __call__(self, G, x, **kw):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.images += len(x)
        return project_images(G, x, **kw)


def test_project_writes_latents_and_resumes(gan, tmp_path, monkeypatch):
    run, store = gan
    kw = dict(store=store, limit=5, batch=2, steps=15, progress=False)
    full = project(run, tmp_path / "full.npz", recon_dir=tmp_path / "rec", **kw)
    assert full["count"] == full["projected"] == 5 and full["resumed"] == 0
    w, ids, info, extra = load_latents(tmp_path / "full.npz")
    assert w.shape == (5, 32) and ids == ["0", "1", "2", "3", "4"]
    sha = checkpoint_sha256(find_checkpoint(run))
    assert info["method"] == "project" and info["space"] == "w" and info["init"] == "mean"
    assert info["steps"] == 15 and info["loss"] == "mse+ssim" and info["encoder"] is None
    assert info["generator"]["sha256"] == sha
    assert set(extra) == {"mse", "ssim", "psnr"} and all(len(v) == 5 for v in extra.values())
    assert full["ssim"] == pytest.approx(float(extra["ssim"].mean()))
    assert not partial_path(tmp_path / "full.npz").exists()
    text = read_png_text(tmp_path / "rec" / "row0000003_proj.png")
    assert text["cxredit:synthetic"] == "true" and text["cxredit:generator-sha256"] == sha

    out = tmp_path / "res.npz"
    monkeypatch.setattr(proj, "project_images", _Counting(stop_at=2))
    with pytest.raises(KeyboardInterrupt):
        project(run, out, **kw)
    assert not out.exists() and partial_path(out).exists()
    with pytest.raises(ValueError, match="delete it"):  # a changed setting is refused
        project(run, out, **{**kw, "steps": 16})
    again = _Counting()
    monkeypatch.setattr(proj, "project_images", again)
    res = project(run, out, **kw)
    assert (again.calls, again.images) == (2, 3)  # only the 3 images not done
    assert res["resumed"] == 2 and res["projected"] == 3
    w2, ids2, _, extra2 = load_latents(out)
    assert ids2 == ids
    np.testing.assert_allclose(w2, w, atol=1e-6, rtol=0)
    np.testing.assert_allclose(extra2["mse"], extra["mse"], atol=1e-6, rtol=0)
    assert not partial_path(out).exists()


def test_project_encoder_init_and_w_plus(gan, tmp_path):
    run, store = gan
    G = load_generator(run)
    cfg = encoder_train_preset("tiny").replace(batch=4)
    ck = find_checkpoint(run)
    tr = EncoderTrainer(cfg, G, _blob_store(tmp_path / "s", n=8), Run(tmp_path / "enc"),
                        gan_source={"path": str(ck), "sha256": checkpoint_sha256(ck)},
                        progress=False)
    tr.run.write_config(cfg.to_dict(), kind="encoder")
    tr.checkpoint()
    out = tmp_path / "enc.npz"
    # steps=1 has learning rate 0: the result is the start point, E(x) broadcast to W+
    project(run, out, store=store, limit=3, space="w+", init="encoder", encoder=tmp_path / "enc",
            steps=1, progress=False)
    w, ids, info, _ = load_latents(out)
    E, _ = load_encoder(tmp_path / "enc")
    with torch.no_grad():
        e = E(ImageStore(store).tensor(np.arange(3))).numpy()
    assert w.shape == (3, G.num_ws, 32) and info["space"] == "w+"
    np.testing.assert_allclose(w, np.repeat(e[:, None], G.num_ws, axis=1), atol=1e-6)
    assert info["init"] == "encoder" and len(info["encoder"]["sha256"]) == 64


def test_project_validation(gan, tmp_path):
    run, store = gan
    out = tmp_path / "x.npz"
    _blob_store(tmp_path / "s8", n=4, r=8)
    with pytest.raises(ValueError, match="8 px, the generator makes 16 px"):
        project(run, out, store=tmp_path / "s8", progress=False)
    with pytest.raises(ValueError, match="no images to project"):
        project(run, out, store=store, query="patient_id == 'nobody'", progress=False)
    with pytest.raises(ValueError, match="needs --encoder"):
        project(run, out, store=store, init="encoder", progress=False)
    with pytest.raises(ValueError, match="either --images or --store"):
        project(run, out, progress=False)
    with pytest.raises(ValueError, match="LPIPS"):
        project(run, out, store=store, lpips_weights="w.pth,v.pth", progress=False)
