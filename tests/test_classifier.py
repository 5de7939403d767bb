"""Cardiomegaly classifier: shapes, learning phantom labels on the CPU, checkpoints, exact
resume, label handling, the CLI command and the "classifier" feature extractor."""

import logging
import shutil
import time

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxredit.checkpoint import load_checkpoint
from cxredit.cli import main
from cxredit.data.prepare import make_phantom_store
from cxredit.data.store import ImageStore
from cxredit.metrics.features import get_extractor
from cxredit.models.classifier import Classifier, ClassifierConfig
from cxredit.runs import Run
from cxredit.train.classifier import (
    ClassifierTrainConfig,
    ClassifierTrainer,
    binary_labels,
    load_classifier,
    predict_proba,
    train_classifier,
)
from helpers import assert_exact_resume  # noqa: I001


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """400 phantoms at 32 px, half with cardiomegaly (train/val/test splits)."""
    root = tmp_path_factory.mktemp("clf") / "store"
    make_phantom_store(root, n=400, resolution=32, cardiomegaly_fraction=0.5, seed=0,
                       progress=False)
    return root


def _tiny_cfg(**kw):
    return ClassifierTrainConfig(**{"batch": 8, "lr": 3e-3, "kimg": 0.08, "snap_kimg": 0.04,
                                    "base_channels": 4, "depth": 2, **kw})


def _edited_store(src, dst, column, fn):
    """Copy of store `src` whose meta column is rewritten by `fn(meta) -> values`."""
    shutil.copytree(src, dst)
    meta = pd.read_csv(dst / "meta.csv", low_memory=False)
    meta[column] = fn(meta)
    meta.to_csv(dst / "meta.csv", index=False)
    return dst


@pytest.mark.parametrize("arch,res,base,depth", [("cnn", 32, 8, 3), ("cnn", 64, 4, 4),
                                                 ("cnn", 128, 4, 5), ("resnet18", 32, 16, 4)])
def test_shapes_and_config_roundtrip(arch, res, base, depth):
    clf = Classifier(ClassifierConfig(arch, res, base, depth))
    x = torch.rand(3, 1, res, res) * 2 - 1
    clf.eval()
    logits, f = clf(x), clf.features(x)
    assert logits.shape == (3,) and f.shape == (3, clf.dim)
    assert clf.dim == (512 if arch == "resnet18" else min(base * 2**depth, 256))
    clf2 = Classifier.from_config(clf.config).eval()
    clf2.load_state_dict(clf.state_dict())
    torch.testing.assert_close(clf2(x), logits)
    # any other side is resized to the classifier's resolution
    big = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    assert clf(big).shape == (3,) and clf.features(x[:, :, ::2, ::2]).shape == (3, clf.dim)
    if arch == "cnn":  # GroupNorm: an image's logit does not depend on the rest of the batch
        torch.testing.assert_close(clf.train()(x[1:2]), clf(x)[1:2], rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise():
    clf = Classifier(resolution=32, base_channels=4, depth=2)
    for shape in [(2, 3, 32, 32), (1, 32, 32)]:
        with pytest.raises(ValueError, match=r"\[N,1,R,R\]"):
            clf(torch.zeros(shape))
    with pytest.raises(ValueError, match="resolution"):
        ClassifierConfig(resolution=16)
    with pytest.raises(ValueError, match="depth"):
        ClassifierConfig(resolution=32, depth=6)
    with pytest.raises(ValueError, match="arch"):
        ClassifierConfig(arch="vit")
    with pytest.raises(ValueError, match="unknown"):
        Classifier.from_config({"resolution": 32, "width": 3})
    with pytest.raises(ValueError, match="aug_p"):
        ClassifierTrainConfig(aug_p=2)


def test_learns_phantom_cardiomegaly_above_auc_0_9(phantoms):
    store = ImageStore(phantoms)
    cfg = ClassifierTrainConfig(batch=16, lr=3e-3, kimg=2.4, snap_kimg=100, base_channels=8,
                                depth=3, seed=0)  # 150 steps on the 32-px train split
    tr = ClassifierTrainer(cfg, store, None, progress=False)
    val, test = tr.val_rows, store.select(split="test")
    assert len(val) >= 30 and 0 < tr.y[val].sum() < len(val)
    before = roc_auc_score(tr.y[val], predict_proba(tr.net, store.tensor(val)))
    t0 = time.time()
    rec = tr.fit()
    elapsed = time.time() - t0
    ev = tr.evaluate()
    p_test = predict_proba(tr.net, store.tensor(test), batch=7)
    assert p_test.shape == (len(test),) and p_test.dtype == np.float32
    assert ((p_test >= 0) & (p_test <= 1)).all()
    auc_test = roc_auc_score(store.labels(["Cardiomegaly"], test)[:, 0], p_test)
    assert abs(before - 0.5) < 0.3, before
    assert ev["eval/auc"] > 0.9 and auc_test > 0.9, (ev, auc_test)
    assert ev["eval/acc"] > 0.75 and ev["eval/n"] == len(val)
    assert np.isfinite(rec["loss/bce"]) and tr.step == 150
    assert tr.net.training  # predict_proba restored the mode
    print(f"val AUC {ev['eval/auc']:.3f} (acc {ev['eval/acc']:.3f}, n={len(val)}), test AUC "
          f"{auc_test:.3f} (n={len(test)}) after {tr.step} steps in {elapsed:.1f}s")


def test_exact_resume_snapshots_and_load(phantoms, tmp_path):
    full, a, stats = assert_exact_resume(train_classifier, phantoms, tmp_path, _tiny_cfg(),
                                         "val", "eval/auc")
    evals = [r for r in stats if "eval/auc" in r]

    def _no_timing(recs):
        return [{k: v for k, v in r.items() if k != "sec_per_kimg"} for r in recs]

    assert _no_timing(stats) == _no_timing(Run(tmp_path / "part", resume=True).read_stats())
    assert full["eval/auc"] == evals[-1]["eval/auc"] and 0 <= full["eval/acc"] <= 1
    # checkpoint round trip: the loaded classifier gives the trained weights' outputs
    clf = load_classifier(tmp_path / "full")
    assert not clf.training and clf.config["resolution"] == 32
    assert clf.config["label"] == "Cardiomegaly"
    assert not any(p.requires_grad for p in clf.parameters())
    ref = Classifier.from_config(a["net_config"]).eval()
    ref.load_state_dict(a["net"])
    x = ImageStore(phantoms).tensor(np.arange(5))
    torch.testing.assert_close(clf(x), ref(x), rtol=0, atol=0)
    np.testing.assert_array_equal(predict_proba(clf, x), torch.sigmoid(ref(x)).detach().numpy())


def test_labels_uncertain_dropped_and_missing_class(phantoms, tmp_path, caplog):
    # every third row uncertain (-1) or not mentioned (NaN): dropped, with a logged count
    unc = _edited_store(phantoms, tmp_path / "unc", "Cardiomegaly",
                        lambda m: m["Cardiomegaly"].where(m.index % 3 != 0, -1.0)
                        .where(m.index % 5 != 1, np.nan))
    store = ImageStore(unc)
    with caplog.at_level(logging.INFO, logger="cxredit.train.classifier"):
        tr = ClassifierTrainer(_tiny_cfg(), store, None, progress=False)
    assert np.isfinite(tr.y[tr.rows]).all() and set(np.unique(tr.y[tr.rows])) == {0.0, 1.0}
    train = store.select(split="train")
    assert len(tr.rows) == int(np.isin(store.labels(["Cardiomegaly"], train)[:, 0], [0, 1]).sum())
    assert f"dropped {len(train) - len(tr.rows)} of {len(train)}" in caplog.text
    # negatives from a query (cardiomegaly vs. no finding)
    y = binary_labels(ImageStore(phantoms), negative_query="`No Finding`==1")
    meta = ImageStore(phantoms).meta
    assert (y == 0).sum() == (meta["No Finding"] == 1).sum()
    assert (y == 1).sum() == (meta["Cardiomegaly"] == 1).sum() and np.isnan(y).any()
    # a missing class: one-line error naming the store, no run folder
    nopos = _edited_store(phantoms, tmp_path / "nopos", "Cardiomegaly",
                          lambda m: m["Cardiomegaly"].where(m["Cardiomegaly"] != 1, -1.0))
    with pytest.raises(ValueError, match=r"nopos: no positive \(Cardiomegaly==1\)") as e:
        train_classifier(nopos, tmp_path / "run", _tiny_cfg(), device="cpu", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="no negative"):
        ClassifierTrainer(_tiny_cfg(negative_query="`No Finding`==7"), ImageStore(phantoms),
                          None, progress=False)
    with pytest.raises(ValueError, match="store.*Pneumonia"):
        train_classifier(phantoms, tmp_path / "run", _tiny_cfg(label="Pneumonia"),
                         device="cpu", progress=False)


def test_cli_train_classifier_and_resume(phantoms, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train-classifier", "--data", str(phantoms), "--out", str(out), "--device", "cpu",
            "--no-progress"]
    assert main(base + ["--kimg", "0.04", "--batch", "8", "--lr", "0.003", "--seed", "3",
                        "--arch", "cnn", "--label", "Cardiomegaly"]) == 0
    said = capsys.readouterr().out
    assert "val AUC" in said and "0.04 kimg" in said
    assert main(base + ["--resume", "--kimg", "0.08", "--lr", "0.1"]) == 2  # not ignored
    assert "--lr cannot change a resumed run" in capsys.readouterr().err
    assert main(base + ["--resume", "--kim", "0.08", "--bat=4"]) == 2  # abbreviations too
    assert "--batch cannot change a resumed run" in capsys.readouterr().err
    assert main(base + ["--resume", "--kimg", "0.08"]) == 0
    assert "0.08 kimg" in capsys.readouterr().out
    doc = Run(out, resume=True).read_config()
    assert doc["kind"] == "classifier" and doc["config"]["seed"] == 3
    assert doc["config"]["batch"] == 8 and doc["config"]["kimg"] == 0.04
    assert load_checkpoint(Run(out, resume=True).latest_checkpoint())["step"] == 10
    assert main(base[:4] + [str(tmp_path / "r2"), "--label", "Nope", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Nope" in err and "Traceback" not in err
    assert main(["train-classifier", "--help"]) == 0
    assert "--negative-query" in capsys.readouterr().out


def test_classifier_feature_extractor(phantoms, tmp_path):
    train_classifier(phantoms, tmp_path / "run", _tiny_cfg(kimg=0.04), device="cpu",
                     progress=False)
    ex = get_extractor("classifier", classifier=tmp_path / "run", device="cpu", batch_size=3)
    x = ImageStore(phantoms).tensor(np.arange(7))
    f = ex(x)
    assert ex.name == "classifier" and f.shape == (7, ex.dim) and f.dtype == np.float64
    clf = load_classifier(tmp_path / "run")
    np.testing.assert_allclose(f, clf.features(x).double().numpy(), rtol=1e-5, atol=1e-6)
    # a module works too, and images of another side are resized to the classifier's
    ex2 = get_extractor("classifier", classifier=clf)
    up = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear")
    assert ex2(up).shape == (7, ex.dim)
    assert np.isfinite(ex2(up)).all()
