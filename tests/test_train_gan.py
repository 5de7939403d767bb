"""Tiny CPU runs of the real StyleGAN2 training entry points."""

import json
import os
import socket

import numpy as np
import pandas as pd
import pytest
import torch

from cxredit.checkpoint import checkpoint_sha256, load_checkpoint
from cxredit.cli import main
from cxredit.config import preset
from cxredit.data.io import read_png_text
from cxredit.data.store import ImageStore, StoreWriter
from cxredit.runs import Run
from cxredit.train.gan import GanTrainer, NonFiniteLossError, load_generator, train_gan


def _blob_store(root, n=64, r=16, seed=0):
    """A simple store: a bright disc on a dark background with a vertical intensity ramp."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:r, 0:r] / (r - 1)
    plan = pd.DataFrame({"path": [f"b{i}" for i in range(n)],
                         "patient_id": [f"p{i}" for i in range(n)]})
    w = StoreWriter(root, plan, r)
    for i in range(n):
        cx, cy = 0.5 + 0.1 * rng.standard_normal(2)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < 0.06).astype(float)
        img = np.clip(0.15 + 0.3 * yy + 0.5 * disc, 0, 1)
        w.put(i, (img * 255).astype(np.uint8))
    w.finish()
    return ImageStore(root)


def _cfg(**kw):
    base = dict(resolution=16, batch=8, kimg=0.064, snap_kimg=0.032, channel_base=256,
                channel_max=32, z_dim=32, w_dim=32, mapping_layers=2, r1_interval=4,
                pl_interval=2, ada_interval=1, ada_kimg=1.0, seed=3)
    base.update(kw)
    return preset("tiny").replace(**base)


def test_short_run_losses_finite_and_D_separates(tmp_path):
    store = _blob_store(tmp_path / "s")
    cfg = _cfg(kimg=0.32, aug="none", snap_kimg=1.0)
    tr = GanTrainer(cfg, store, Run(tmp_path / "run"), progress=False)
    tr.run.write_config(cfg.to_dict(), kind="gan")
    rec = tr.fit()
    for k in ("loss/G", "loss/D", "loss/r1", "loss/pl"):
        assert np.isfinite(rec[k]), k
    assert rec["D/real"] > rec["D/fake"]  # D tells reals from fakes
    stats = Run(tmp_path / "run", resume=True).read_stats()
    assert stats[-1]["step"] == tr.total_steps == 40
    ck = Run(tmp_path / "run", resume=True).latest_checkpoint()
    assert ck is not None and (tmp_path / "run" / "samples" / "samples-00000040.png").exists()
    text = read_png_text(tmp_path / "run" / "samples" / "samples-00000040.png")
    assert text["cxredit:synthetic"] == "true"
    assert text["cxredit:generator-sha256"] == checkpoint_sha256(ck)


@pytest.mark.slow
def test_generator_learns_the_data_mean_profile(tmp_path):
    store = _blob_store(tmp_path / "s", n=128)
    data_mean = store.tensor(np.arange(len(store))).mean(0)[0]
    cfg = _cfg(kimg=1.2, aug="none", snap_kimg=10.0, pl_weight=0.0, g_lr=0.004, d_lr=0.004,
               style_mixing=0.0)
    tr = GanTrainer(cfg, store, None, progress=False)

    def sample_err():
        with torch.no_grad():
            z = torch.randn(64, cfg.z_dim, generator=torch.Generator().manual_seed(0))
            m = tr.G_ema(z, noise_mode="const").clamp(-1, 1).mean(0)[0]
        return (m - data_mean).abs().mean().item()

    before = sample_err()
    tr.fit()
    after = sample_err()
    assert after < 0.5 * before, (before, after)
    # the samples' vertical profile follows the data's ramp (dark top, brighter bottom)
    with torch.no_grad():
        z = torch.randn(64, cfg.z_dim, generator=torch.Generator().manual_seed(1))
        prof = tr.G_ema(z, noise_mode="const").mean(dim=(0, 1, 3))
    assert prof[-3:].mean() > prof[:3].mean()


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    store_dir = tmp_path / "s"
    _blob_store(store_dir, n=32)
    cfg = _cfg(kimg=0.128, snap_kimg=0.064, aug="ada", aug_p=0.2)
    full = train_gan(store_dir, tmp_path / "full", cfg, device="cpu", progress=False)
    # "killed" after the first snapshot: same config but half the length, then resumed
    train_gan(store_dir, tmp_path / "part", cfg.replace(kimg=0.064), device="cpu",
              progress=False)
    doc = json.loads((tmp_path / "part" / "config.json").read_text())
    doc["config"]["kimg"] = 0.128  # the run was meant to be this long
    (tmp_path / "part" / "config.json").write_text(json.dumps(doc))
    resumed = train_gan(store_dir, tmp_path / "part", resume=True, device="cpu", progress=False)
    a = load_checkpoint(Run(tmp_path / "full", resume=True).latest_checkpoint())
    b = load_checkpoint(Run(tmp_path / "part", resume=True).latest_checkpoint())
    assert a["step"] == b["step"] == 16
    for net in ("G", "D", "G_ema"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs after resume"
    assert a["augment"]["state"]["p"] == b["augment"]["state"]["p"]
    assert {k: v for k, v in full.items() if k != "sec_per_kimg"} == \
        {k: v for k, v in resumed.items() if k != "sec_per_kimg"}
    sa = Run(tmp_path / "full", resume=True).read_stats()
    sb = Run(tmp_path / "part", resume=True).read_stats()
    drop = ("sec_per_kimg",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in sa] == \
        [{k: v for k, v in r.items() if k not in drop} for r in sb]


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    store = _blob_store(tmp_path / "s", n=32)
    cfg = _cfg(kimg=0.128, snap_kimg=0.032, aug="none")
    run = Run(tmp_path / "run")
    tr = GanTrainer(cfg, store, run, progress=False)
    orig = tr.g_step

    def poisoned():
        orig()
        if tr.step >= 5:
            tr.accumulate("loss/G", torch.tensor(float("nan")))

    monkeypatch.setattr(tr, "g_step", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"NaN/Inf .* \(ckpt-00000004.json\) is kept"):
        tr.fit()
    ck = run.latest_checkpoint()
    assert ck is not None and load_checkpoint(ck)["step"] == 4
    G = load_generator(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in G.parameters())


def test_cli_failed_start_nan_and_resume_before_first_checkpoint(tmp_path, capsys,
                                                                   monkeypatch):
    from cxredit.train.loop import Trainer

    _blob_store(tmp_path / "s", n=16)
    _blob_store(tmp_path / "s32", n=16, r=32)
    args = ["train-gan", "--out", str(tmp_path / "run"), "--preset", "tiny", "--kimg", "0.016",
            "--snap-kimg", "0.016", "--batch", "8", "--set", "resolution=16", "--set",
            "channel_base=128", "--set", "w_dim=16", "--set", "z_dim=16", "--no-progress"]
    # a start that fails (store of another size) leaves no checkpoint: the folder is reusable
    assert main([*args, "--data", str(tmp_path / "s32")]) == 2
    assert "--set resolution=" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.json").exists()

    def nan(self):
        raise NonFiniteLossError("a loss became NaN/Inf\nsecond line")

    monkeypatch.setattr(Trainer, "check_finite", nan)
    assert main([*args, "--data", str(tmp_path / "s")]) == 2  # one line, no traceback
    err = capsys.readouterr().err.strip()
    assert err == "cxredit train-gan: error: a loss became NaN/Inf"
    monkeypatch.undo()
    # --resume with no checkpoint yet starts from step 0 with the run's config
    assert main(["train-gan", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "run"),
                 "--resume", "--no-progress"]) == 0
    assert Run(tmp_path / "run", resume=True).latest_checkpoint() is not None
    # now it holds a checkpoint: a new start there is refused
    assert main([*args, "--data", str(tmp_path / "s")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_train_and_generate(tmp_path, capsys):
    _blob_store(tmp_path / "s", n=16)
    rc = main(["train-gan", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "run"),
               "--preset", "tiny", "--kimg", "0.016", "--snap-kimg", "0.016", "--batch", "8",
               "--set", "resolution=16", "--set", "channel_base=128", "--set", "w_dim=16",
               "--set", "z_dim=16", "--no-progress"])
    assert rc == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert cfg["resolution"] == 16 and cfg["w_dim"] == 16 and cfg["gamma"] == pytest.approx(
        preset("tiny").gamma)
    assert main(["train-gan", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "run"),
                 "--preset", "tiny"]) == 2
    assert "already exists" in capsys.readouterr().err
    rc = main(["generate", "--ckpt", str(tmp_path / "run"), "--seeds", "0-3",
               "--out", str(tmp_path / "gen"), "--interpolate", "2", "--trunc", "0.7"])
    assert rc == 0
    from cxredit.data.io import read_png_text, read_xray

    singles = sorted((tmp_path / "gen").glob("seed*.png"))
    assert len(singles) == 4 and read_xray(singles[0]).shape == (16, 16)
    assert read_png_text(singles[0])["cxredit:synthetic"] == "true"
    # 3 steps between 4 seeds with 2 in-between frames: 3*3 + 1 = 10 frames, rows of 3
    walk = read_xray(tmp_path / "gen" / "walk.png")
    assert walk.shape == (16 * 4, 16 * 3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, store_dir, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from cxredit.train import distributed as dist

    dist.setup("cpu")
    cfg = _cfg(kimg=0.048, aug="ada", snap_kimg=1.0)
    tr = GanTrainer(cfg, ImageStore(store_dir), None, progress=False)
    tr.fit()
    flat = torch.cat([p.detach().flatten() for p in
                      list(tr.G.parameters()) + list(tr.D.parameters())
                      + list(tr.G_ema.parameters())])
    torch.save({"flat": flat, "p": float(tr.augment.p), "step": tr.step},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.cleanup()


def test_ddp_two_gloo_ranks_stay_identical(tmp_path):
    _blob_store(tmp_path / "s", n=32)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "s"),
                                                   str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["step"] == r1["step"] == 6
    assert torch.equal(r0["flat"], r1["flat"])
    assert r0["p"] == r1["p"]


def test_bf16_precision_trains_with_finite_losses(tmp_path):
    store = _blob_store(tmp_path / "s", n=16)
    tr = GanTrainer(_cfg(kimg=0.024, precision="bf16", aug="ada"), store, None, progress=False)
    rec = tr.fit()
    assert tr.step == 3 and np.isfinite(rec["loss/G"]) and np.isfinite(rec["loss/D"])
    assert all(p.dtype == torch.float32 for p in tr.G.parameters())  # master weights stay fp32
