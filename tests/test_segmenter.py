"""Heart/lung segmenter: shapes, learning phantom masks on the CPU, exact resume."""

import shutil
import time

import numpy as np
import pytest
import torch

from cxredit.data.prepare import make_phantom_store
from cxredit.data.store import ImageStore
from cxredit.metrics.ctr import dice
from cxredit.models.segmenter import Segmenter, SegmenterConfig
from cxredit.train.segmenter import (
    SegmenterTrainConfig,
    SegmenterTrainer,
    load_segmenter,
    predict_masks,
    train_segmenter,
)
from helpers import assert_exact_resume  # noqa: I001


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """300 phantoms at 32 px with masks (train/val/test splits)."""
    root = tmp_path_factory.mktemp("seg") / "store"
    make_phantom_store(root, n=300, resolution=32, cardiomegaly_fraction=0.5, seed=0,
                       progress=False)
    return root


@pytest.mark.parametrize("res,depth,base", [(16, 1, 4), (32, 3, 8), (64, 4, 6)])
def test_shapes_and_config_roundtrip(res, depth, base):
    net = Segmenter(SegmenterConfig(res, base, depth))
    x = torch.rand(3, 1, res, res) * 2 - 1
    y = net(x)
    assert y.shape == (3, 3, res, res)
    net2 = Segmenter.from_config(net.config)
    net2.load_state_dict(net.state_dict())
    torch.testing.assert_close(net2(x), y)
    # GroupNorm: an image's masks do not depend on the rest of the batch
    torch.testing.assert_close(net(x[1:2]), y[1:2], rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise():
    net = Segmenter(resolution=32, base_channels=4)
    for shape in [(2, 1, 16, 16), (2, 3, 32, 32), (1, 32, 32)]:
        with pytest.raises(ValueError, match=r"\[N,1,32,32\]"):
            net(torch.zeros(shape))
    with pytest.raises(ValueError, match="divisible"):
        SegmenterConfig(resolution=48, depth=5)
    with pytest.raises(ValueError, match="unknown"):
        Segmenter.from_config({"resolution": 32, "width": 3})


def test_learns_phantom_masks_above_dice_0_9(phantoms):
    store = ImageStore(phantoms)
    val = store.select(split="val")
    assert len(val) >= 20
    cfg = SegmenterTrainConfig(batch=16, lr=3e-3, kimg=3.6, snap_kimg=100, base_channels=8,
                               depth=3, seed=0)  # 225 steps on the 32-px train split
    tr = SegmenterTrainer(cfg, store, None, progress=False)
    truth = np.asarray(store.masks[val], bool)
    before = dice(predict_masks(tr.net, store.tensor(val)), truth).mean(0)
    t0 = time.time()
    rec = tr.fit()
    elapsed = time.time() - t0
    pred = predict_masks(tr.net, store.tensor(val), batch=7)
    assert pred.dtype == torch.bool and pred.shape == (len(val), 3, 32, 32)
    after = dice(pred, truth).mean(0)  # held-out rows: heart, right lung, left lung
    assert before.max() < 0.9, before
    assert after.min() > 0.9, after
    ev = tr.evaluate()
    assert ev["eval/dice_heart"] == pytest.approx(after[0])
    assert np.isfinite(rec["loss/seg"]) and tr.step == 225
    assert tr.net.training  # predict_masks restored the mode
    print(f"val Dice {after.round(3)} after {tr.step} steps in {elapsed:.1f}s")


def _tiny_cfg(**kw):
    return SegmenterTrainConfig(**{"batch": 8, "lr": 3e-3, "kimg": 0.08, "snap_kimg": 0.04,
                                   "base_channels": 4, "depth": 2, **kw})


def test_exact_resume_snapshots_and_load(phantoms, tmp_path):
    _, _, stats = assert_exact_resume(train_segmenter, phantoms, tmp_path, _tiny_cfg(), "masks",
                                      "eval/dice_heart")
    evals = [r for r in stats if "eval/dice_heart" in r]
    assert all(0 <= r[f"eval/dice_{k}"] <= 1 for r in evals
               for k in ("heart", "right_lung", "left_lung"))
    net = load_segmenter(tmp_path / "full")
    assert not net.training and net.config["resolution"] == 32
    x = ImageStore(phantoms).tensor(np.arange(3))
    assert predict_masks(net, x).shape == (3, 3, 32, 32)


def test_store_without_masks_is_rejected(phantoms, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(phantoms, bare)
    (bare / "masks.npy").unlink()
    with pytest.raises(ValueError, match="bare.*masks"):
        train_segmenter(bare, tmp_path / "run", _tiny_cfg(), device="cpu", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="masks"):
        SegmenterTrainer(_tiny_cfg(), ImageStore(bare), None, progress=False)
