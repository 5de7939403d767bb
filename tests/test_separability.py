import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxredit.latent.io import save_latents
from cxredit.latent.separability import (
    as_features,
    histogram_figure,
    join_meta,
    parse_shrinkage,
    run_separability,
    separability,
    separation,
)


def _gaussians(dim, n_pos, n_neg, gap, seed=0, shape=None):
    """Isotropic unit-variance latents; positives shifted by `gap` along axis 0."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_pos + n_neg, *(shape or (dim,))))
    y = np.zeros(n_pos + n_neg, bool)
    y[rng.permutation(len(y))[:n_pos]] = True
    w[y, ..., 0] += gap
    return w.astype(np.float32), y


def test_separation_formula():
    pos, neg = np.array([2.0, 4.0]), np.array([0.0, 0.0, 2.0, 2.0])
    assert separation(pos, neg) == pytest.approx(2.0)  # gap 2, stds 1 and 1
    assert separation(neg, pos) == separation(pos, neg)


@pytest.mark.parametrize("dim,n_pos,n_neg,gap,shrinkage", [
    (512, 100, 250, 8.0, "auto"),  # N < D: only a shrunk LDA generalises
    (64, 300, 700, 2.0, None),  # N >> D: the paper's plain LDA
])
def test_planted_gap_is_recovered_held_out(dim, n_pos, n_neg, gap, shrinkage):
    w, y = _gaussians(dim, n_pos, n_neg, gap)
    r = separability(w, y, shrinkage=shrinkage, folds=5, seed=0)
    assert r["separation_cv"] == pytest.approx(gap, rel=0.15)
    assert r["separation"] >= r["separation_cv"]
    assert r["counts"] == {"positive": n_pos, "negative": n_neg}
    assert r["dimension"] == dim and r["settings"]["folds"] == 5
    assert r["auc"] > 0.9 and r["balanced_accuracy"] > 0.8
    assert len(r["separation_per_fold"]) == 5
    assert r["projections"].shape == r["projections_cv"].shape == (n_pos + n_neg,)
    # projections are oriented: positives higher, in-sample and held-out
    for z in (r["projections"], r["projections_cv"]):
        assert z[y].mean() > z[~y].mean()
    assert abs(np.linalg.norm(r["direction"]) - 1) < 1e-9 and abs(r["direction"][0]) > 0.8


def test_large_gap_gives_auc_one():
    w, y = _gaussians(512, 100, 250, 12.0, seed=1)
    r = separability(w, y, shrinkage="auto")
    assert r["auc"] > 0.999 and r["balanced_accuracy"] > 0.99


@pytest.mark.parametrize("shrinkage", [None, "auto"])
def test_noise_is_separated_in_sample_only(shrinkage):
    w, y = _gaussians(512, 100, 250, 0.0, seed=3)
    r = separability(w, y, shrinkage=shrinkage)
    assert r["separation"] > 2.0  # the over-fitted in-sample number
    assert r["separation_cv"] < 0.5  # the honest one
    assert 0.35 < r["auc"] < 0.65
    assert r["rank_deficient"] == (shrinkage is None)


@pytest.mark.parametrize("flatten,dim", [("mean", 16), ("flatten", 64)])
def test_w_plus_flatten_modes(flatten, dim):
    # the same gap in every layer: averaging 4 layers halves the noise std, flattening adds up
    # 4 independent gaps; both give a population separation of 1.5 * 2 = 3.
    w, y = _gaussians(None, 300, 300, 1.5, seed=4, shape=(4, 16))
    r = separability(w, y, flatten=flatten)
    assert r["dimension"] == dim and r["input_shape"] == [4, 16]
    assert r["separation_cv"] == pytest.approx(3.0, rel=0.2)
    assert r["settings"]["flatten"] == flatten


def test_features_and_argument_errors():
    w = np.zeros((5, 3, 4))
    assert as_features(w, "mean").shape == (5, 4) and as_features(w, "flatten").shape == (5, 12)
    assert as_features(np.zeros((5, 4)), "flatten").shape == (5, 4)
    with pytest.raises(ValueError, match="flatten"):
        as_features(w, "max")
    with pytest.raises(ValueError, match="w_dim"):
        as_features(np.zeros((5, 2, 3, 4)))
    w, y = _gaussians(8, 10, 20, 1.0)
    with pytest.raises(ValueError, match="both classes"):
        separability(w, np.zeros(30, bool))
    with pytest.raises(ValueError, match="per class"):
        separability(w[:14], np.arange(14) < 10, folds=5)  # 4 negatives for 5 folds
    with pytest.raises(ValueError, match="shape"):
        separability(w, y[:-1])
    assert parse_shrinkage("auto") == "auto" and parse_shrinkage("0.3") == 0.3
    assert parse_shrinkage("none") is None
    with pytest.raises(ValueError):
        parse_shrinkage(1.5)


def test_histogram_figure(tmp_path):
    w, y = _gaussians(16, 40, 60, 2.0)
    r = separability(w, y)
    png = histogram_figure(r, tmp_path / "fig" / "h.png", "title", ("cardiomegaly", "healthy"))
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 200
    assert not list((tmp_path / "fig").glob("*.tmp*"))


def _fake_store(tmp_path, n=160, gap=3.0, dim=32, num_ws=None):
    """meta.csv (store layout) + latents of a subset of rows, gap planted for Cardiomegaly."""
    rng = np.random.default_rng(7)
    card = rng.choice([1.0, 0.0, np.nan, -1.0], size=n, p=[0.35, 0.45, 0.1, 0.1])
    meta = pd.DataFrame({"index": np.arange(n), "path": [f"/data/img{i}.png" for i in range(n)],
                         "sex": rng.choice(["M", "F"], n), "Cardiomegaly": card,
                         "No Finding": np.where(card == 0, 1.0, np.nan)})
    meta.loc[::9, "No Finding"] = np.nan  # some negatives are not "No Finding"
    store = tmp_path / "store"
    store.mkdir()
    meta.to_csv(store / "meta.csv", index=False)
    rows = np.sort(rng.choice(n, size=n - 20, replace=False))
    w = rng.standard_normal((len(rows), *((num_ws, dim) if num_ws else (dim,))))
    w[card[rows] == 1, ..., 0] += gap
    lat = save_latents(tmp_path / "lat.npz", w, [str(r) for r in rows],
                       {"generator": {"path": "G.json", "sha256": "abc123"}, "method": "test"})
    return store, lat, meta, rows


def test_run_separability_end_to_end(tmp_path):
    store, lat, meta, rows = _fake_store(tmp_path)
    sub = meta.iloc[rows]
    n_pos = int((sub["Cardiomegaly"] == 1).sum())
    n_neg = int((sub["No Finding"] == 1).sum())
    out = tmp_path / "sep"
    doc = run_separability(lat, store / "meta.csv", column="Cardiomegaly", positive=1,
                           negative_query="No Finding==1", out_dir=out, folds=4)
    assert doc["counts"] == {"positive": n_pos, "negative": n_neg}
    on_disk = json.loads((out / "separability.json").read_text())
    for key in ("separation", "separation_cv", "auc", "balanced_accuracy", "counts",
                "dimension", "settings", "inputs", "query", "separation_per_fold", "stats"):
        assert key in on_disk, key
    assert on_disk["inputs"]["generator"]["sha256"] == "abc123"
    assert on_disk["inputs"]["latents"] == str(lat)
    assert on_disk["query"]["negative"] == "No Finding==1"
    assert on_disk["settings"]["folds"] == 4
    assert on_disk["separation_cv"] > 1.5 and on_disk["auc"] > 0.8
    with Image.open(out / "separability.png") as im:
        assert im.format == "PNG"
    proj = pd.read_csv(out / "projections.csv")
    assert len(proj) == n_pos + n_neg and set(proj["positive"]) == {0, 1}
    assert set(proj["id"].astype(str)) <= {str(r) for r in rows}
    # default negatives (column == 0) and a store folder as meta
    doc2 = run_separability(lat, store, out_dir=tmp_path / "sep2")
    assert doc2["counts"]["negative"] == int((sub["Cardiomegaly"] == 0).sum())


def test_run_separability_w_plus(tmp_path):
    store, lat, _, _ = _fake_store(tmp_path, num_ws=3, dim=8)
    doc = run_separability(lat, store, flatten="flatten", out_dir=tmp_path / "o")
    assert doc["dimension"] == 24 and doc["inputs"]["space"] == "w+"


def test_run_separability_errors(tmp_path):
    store, lat, meta, rows = _fake_store(tmp_path)
    with pytest.raises(ValueError, match="no positive"):
        run_separability(lat, store, positive=5, out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="no negative"):
        run_separability(lat, store, negative_query="sex=='X'", out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="no column"):
        run_separability(lat, store, column="Edema", out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="both positive"):
        run_separability(lat, store, negative_query="sex=='M'", out_dir=tmp_path / "o")
    meta.iloc[:100].to_csv(tmp_path / "short.csv", index=False)  # rows >= 100 are missing
    with pytest.raises(ValueError, match="no meta row"):
        run_separability(lat, tmp_path / "short.csv", out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="not found"):
        run_separability(lat, tmp_path / "nowhere", out_dir=tmp_path / "o")


def test_join_meta_by_path_and_by_index(tmp_path, monkeypatch):
    meta = pd.DataFrame({"index": [10, 11, 12], "path": [str(tmp_path / f"{c}.png")
                                                          for c in "abc"], "y": [1, 0, 1]})
    assert join_meta(["12", "10"], meta)["y"].tolist() == [1, 1]
    monkeypatch.chdir(tmp_path)
    got = join_meta(["c.png", str(tmp_path / "b.png")], meta)  # relative paths resolve
    assert got["y"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="no meta row"):
        join_meta(["d.png"], meta)
    with pytest.raises(ValueError, match="duplicate"):
        join_meta(["1"], pd.DataFrame({"index": [1, 1]}))
