"""CRG encoder training and inversion on a tiny frozen generator (CPU)."""

import json

import numpy as np
import pytest
import torch

from cxredit.checkpoint import checkpoint_sha256, load_checkpoint
from cxredit.cli import main
from cxredit.config import encoder_train_preset, preset
from cxredit.data.io import read_png_text
from cxredit.data.store import ImageStore
from cxredit.latent.io import load_latents
from cxredit.runs import Run
from cxredit.train.encoder import EncoderTrainer, init_encoder_from, load_encoder, train_encoder
from cxredit.train.gan import GanTrainer, load_generator
from test_train_gan import _blob_store  # noqa: I001


@pytest.fixture(scope="module")
def gan_and_store(tmp_path_factory):
    """A tiny 16-px generator checkpoint (briefly trained on blobs) and its store."""
    root = tmp_path_factory.mktemp("enc")
    store = _blob_store(root / "store", n=48)
    cfg = preset("tiny").replace(resolution=16, batch=8, channel_base=256, channel_max=32,
                                 z_dim=8, w_dim=8, kimg=0.08, snap_kimg=1.0, aug="none")
    # w_dim 8: a latent small enough that E can identify it from 16-px images in a few steps
    tr = GanTrainer(cfg, store, Run(root / "gan"), progress=False)
    tr.run.write_config(cfg.to_dict(), kind="gan")
    tr.fit()
    return root / "gan", root / "store"


def _cfg(**kw):
    return encoder_train_preset("tiny").replace(**{"batch": 8, "kimg": 0.16, "snap_kimg": 0.08,
                                                   "lr": 2e-3, **kw})


def _errors(tr, reals):
    """Fixed-sample synthetic latent error and real reconstruction error (E in eval mode)."""
    with torch.no_grad():
        tr.E.eval()
        z = torch.randn(64, tr.G.z_dim, generator=torch.Generator().manual_seed(0))
        w = tr.G.mapping(z, broadcast=False)
        x = tr.G.synthesis(w, noise_mode="const")
        w_err = (tr.E(x) - w).abs().mean().item()
        rec = tr.G.synthesis(tr.E(reals), noise_mode="const")
        r_err = (rec - reals).square().mean().item()
        tr.E.train()
    return w_err, r_err


def test_crg_cycles_reduce_latent_and_reconstruction_error(gan_and_store, tmp_path):
    gan, store_dir = gan_and_store
    store = ImageStore(store_dir)
    G = load_generator(gan)
    tr = EncoderTrainer(_cfg(kimg=0.32), G, store, None, progress=False)
    reals = store.tensor(np.arange(16))
    w0, r0 = _errors(tr, reals)
    # G is frozen: its weights must not move
    before = [p.clone() for p in tr.G.parameters()]
    rec = tr.fit()
    w1, r1 = _errors(tr, reals)
    assert w1 < 0.85 * w0, (w0, w1)
    assert r1 < 0.8 * r0, (r0, r1)
    assert all(torch.equal(a, b) for a, b in zip(before, tr.G.parameters()))
    for k in ("loss/syn", "loss/real", "syn/w_l1", "syn/g_content", "real/e_content"):
        assert np.isfinite(rec[k]) and rec[k] >= 0, k


def test_wplus_space_and_gradients_reach_both_branches(gan_and_store):
    gan, store_dir = gan_and_store
    tr = EncoderTrainer(_cfg(space="w+"), load_generator(gan), ImageStore(store_dir), None,
                        progress=False)
    assert tr.E(torch.zeros(2, 1, 16, 16)).shape == (2, tr.G.num_ws, tr.G.w_dim)
    trunk0 = [p.clone() for p in tr.E.trunk.parameters()]
    detail0 = [p.clone() for p in tr.E.detail.parameters()]
    for _ in range(2):
        tr.train_step()
        tr.step += 1
    assert any(not torch.equal(a, b) for a, b in zip(trunk0, tr.E.trunk.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(detail0, tr.E.detail.parameters()))


def test_encoder_exact_resume(gan_and_store, tmp_path):
    gan, store_dir = gan_and_store
    cfg = _cfg()
    train_encoder(gan, store_dir, tmp_path / "full", cfg, device="cpu", progress=False)
    train_encoder(gan, store_dir, tmp_path / "part", cfg.replace(kimg=0.08), device="cpu",
                  progress=False)
    train_encoder(gan, store_dir, tmp_path / "part", resume=True, device="cpu", progress=False,
                  kimg=0.16)
    a = load_checkpoint(Run(tmp_path / "full", resume=True).latest_checkpoint())
    b = load_checkpoint(Run(tmp_path / "part", resume=True).latest_checkpoint())
    assert a["step"] == b["step"] == 20
    for k in a["E"]:
        assert torch.equal(a["E"][k], b["E"][k]), k
    assert a["gan"]["sha256"] == checkpoint_sha256(Run(gan, resume=True).latest_checkpoint())
    recon = sorted((tmp_path / "full" / "samples").glob("recon-*.png"))
    assert [p.name for p in recon] == ["recon-00000010.png", "recon-00000020.png"]
    assert read_png_text(recon[0])["cxredit:synthetic"] == "true"
    evals = [r for r in Run(tmp_path / "full", resume=True).read_stats() if "eval/ssim_syn" in r]
    assert len(evals) == 2 and all(-1 <= r["eval/ssim_real"] <= 1 for r in evals)


def test_init_from_starts_from_another_encoder(gan_and_store, tmp_path, capsys):
    gan, store_dir = gan_and_store
    store = ImageStore(store_dir)
    reals = store.tensor(np.arange(16))
    train_encoder(gan, store_dir, tmp_path / "src", _cfg(kimg=0.32), device="cpu",
                  progress=False)
    src = load_checkpoint(Run(tmp_path / "src", resume=True).latest_checkpoint())
    # the start: every weight of the source, but this run's own w_avg (its generator's)
    tr = EncoderTrainer(_cfg(), load_generator(gan), store, None, progress=False)
    w_avg = tr.E.w_avg.clone()
    rec = init_encoder_from(tr.E, tmp_path / "src")
    assert rec["sha256"] == checkpoint_sha256(Run(tmp_path / "src", resume=True)
                                              .latest_checkpoint())
    for k, v in tr.E.state_dict().items():
        assert torch.equal(v, w_avg if k == "w_avg" else src["E"][k]), k
    # a short fine-tune from it beats the same length from scratch
    cfg = _cfg(kimg=0.08, seed=3)
    train_encoder(gan, store_dir, tmp_path / "scratch", cfg, device="cpu", progress=False)
    train_encoder(gan, store_dir, tmp_path / "tuned", cfg, device="cpu", progress=False,
                  init_from=tmp_path / "src")
    errs = {}
    for name in ("scratch", "tuned"):
        E, _ = load_encoder(tmp_path / name)
        with torch.no_grad():
            errs[name] = (tr.G.synthesis(E(reals), noise_mode="const") - reals).square().mean()
    assert errs["tuned"] < errs["scratch"], errs
    doc = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert doc["init_from"]["sha256"] == rec["sha256"]
    # an encoder of another shape is refused with the file named, and no run is left behind
    train_encoder(gan, store_dir, tmp_path / "wplus", _cfg(kimg=0.04, space="w+"),
                  device="cpu", progress=False)
    assert main(["train-encoder", "--gan", str(gan), "--data", str(store_dir), "--out",
                 str(tmp_path / "bad"), "--preset", "tiny", "--kimg", "0.04",
                 "--init-from", str(tmp_path / "wplus"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "wplus" in err and "config differs in" in err and "space" in err
    assert not (tmp_path / "bad" / "config.json").exists()
    # ... but a W encoder may start a W+ one: every layer starts at the source's w
    wide = EncoderTrainer(_cfg(space="w+"), load_generator(gan), store, None, progress=False)
    assert init_encoder_from(wide.E, tmp_path / "src")["space"] == "w"
    E_src, _ = load_encoder(tmp_path / "src")
    with torch.no_grad():
        a, b = E_src(reals) - E_src.w_avg, wide.E.eval()(reals) - wide.E.w_avg
    assert b.shape == (16, wide.G.num_ws, a.shape[1]) and a.abs().max() > 0
    torch.testing.assert_close(b, a[:, None].expand_as(b))


def test_invert_cli_roundtrip(gan_and_store, tmp_path, capsys):
    gan, store_dir = gan_and_store
    rc = main(["train-encoder", "--gan", str(gan), "--data", str(store_dir), "--out",
               str(tmp_path / "enc"), "--preset", "tiny", "--kimg", "0.016", "--batch", "8",
               "--no-progress"])
    assert rc == 0
    out = tmp_path / "lat.npz"
    rc = main(["invert", "--encoder", str(tmp_path / "enc"), "--store", str(store_dir),
               "--split", "train", "--out", str(out), "--recon-dir", str(tmp_path / "rec"),
               "--batch", "5", "--no-progress"])
    assert rc == 0
    w, ids, info, extra = load_latents(out)
    store = ImageStore(store_dir)
    rows = store.select(split="train")
    assert ids == [str(r) for r in rows] and w.shape == (len(rows), 8)
    assert info["space"] == "w" and info["method"] == "encoder"
    assert info["generator"]["sha256"] == checkpoint_sha256(
        Run(gan, resume=True).latest_checkpoint())
    assert extra["ssim"].shape == (len(rows),) and np.isfinite(extra["psnr"]).all()
    # the latents are what the encoder computes
    E, _ = load_encoder(tmp_path / "enc")
    with torch.no_grad():
        np.testing.assert_allclose(E(store.tensor(rows[:3])).numpy(), w[:3], atol=1e-5)
    assert len(list((tmp_path / "rec").glob("*_recon.png"))) == len(rows)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["count"] == len(rows)
    assert main(["invert", "--encoder", str(tmp_path / "enc"), "--out", str(out)]) == 2


def _ddp_worker(rank, world, port, gan, store_dir, out_dir):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from cxredit.train import distributed as dist

    dist.setup("cpu")
    tr = EncoderTrainer(_cfg(kimg=0.024), load_generator(gan), ImageStore(store_dir), None,
                        progress=False)
    tr.fit()
    state = torch.cat([t.detach().float().flatten() for t in tr.E.state_dict().values()])
    torch.save({"state": state, "step": tr.step}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.cleanup()


def test_ddp_two_gloo_ranks_hold_the_same_encoder(gan_and_store, tmp_path):
    from test_train_gan import _free_port

    gan, store_dir = gan_and_store
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(gan), str(store_dir),
                                                   str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["step"] == r1["step"] == 3
    assert torch.equal(r0["state"], r1["state"])  # weights and BatchNorm statistics
