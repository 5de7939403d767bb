import json

import numpy as np
import pandas as pd
import pytest

from cxredit import __version__
from cxredit.latent.directions import (
    compare,
    conditional_direction,
    cosine,
    format_compare,
    lda_direction,
    load_direction,
    make_direction,
    mean_direction,
    pair_direction,
    save_direction,
    svm_direction,
)
from cxredit.latent.io import save_latents

SHAPES = [(32,), (4, 16)]  # W and W+ (num_ws=4, w_dim=16)
FITTERS = {"mean": mean_direction, "lda": lda_direction, "svm": svm_direction}


def _unit(rng, shape):
    v = rng.standard_normal(shape)
    return v / np.linalg.norm(v)


def _labelled(shape, n=1500, n_pos=600, gap=2.0, seed=0):
    """Isotropic noise; positives shifted by gap * v (v a random unit latent)."""
    rng = np.random.default_rng(seed)
    v = _unit(rng, shape)
    w = rng.standard_normal((n, *shape))
    y = np.zeros(n, bool)
    y[rng.permutation(n)[:n_pos]] = True
    w[y] += gap * v
    return w, y, v


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", list(FITTERS))
def test_fitted_directions_recover_the_planted_one(method, shape):
    w, y, v = _labelled(shape)
    d = FITTERS[method](w, y)
    assert d.shape == shape
    assert np.linalg.norm(d) == pytest.approx(1.0)
    assert cosine(d, v) > 0.9
    p = w.reshape(len(w), -1) @ d.ravel()
    assert p[y].mean() > p[~y].mean()  # oriented: positives higher
    assert cosine(FITTERS[method](w, ~y), v) < -0.9  # swapping the classes flips it


def test_lda_shrinkage_and_svm_C():
    w, y, v = _labelled((64,), n=500, n_pos=200, gap=3.0, seed=1)
    assert cosine(lda_direction(w, y, shrinkage="auto"), v) > 0.85
    assert cosine(svm_direction(w, y, C=0.01), v) > 0.85


@pytest.mark.parametrize("shape", SHAPES)
def test_pair_direction(shape):
    rng = np.random.default_rng(2)
    v = _unit(rng, shape)
    w_I = rng.standard_normal((20, *shape))
    scale = rng.uniform(1, 4, size=(20,) + (1,) * len(shape))  # pairs of unequal length
    w_star = w_I + scale * v + 0.3 * rng.standard_normal(w_I.shape)
    d = pair_direction(w_I, w_star)
    assert d.shape == shape and np.linalg.norm(d) == pytest.approx(1.0)
    assert cosine(d, v) > 0.9
    assert cosine(pair_direction(w_star, w_I), v) < -0.9
    one = pair_direction(w_I[:1], w_I[:1] + v)  # the paper: a single pair
    assert cosine(one, v) == pytest.approx(1.0)
    a, b = _unit(rng, shape), _unit(rng, shape)
    two = pair_direction(w_I[:2], w_I[:2] + np.stack([10 * a, b]))  # each pair counts once
    assert cosine(two, a + b) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        pair_direction(w_I, w_star[:5])
    with pytest.raises(ValueError, match="identical"):
        pair_direction(w_I, w_I)


@pytest.mark.parametrize("shape", SHAPES)
def test_conditional_direction_is_orthogonal(shape):
    rng = np.random.default_rng(3)
    c1, c2 = _unit(rng, shape), _unit(rng, shape)
    v = _unit(rng, shape) + 0.5 * c1 - 0.7 * c2  # correlated with both conditions
    c3 = c1 + c2  # linearly dependent conditions are fine
    out = conditional_direction(v, [c1, c2, c3])
    assert out.shape == shape and np.linalg.norm(out) == pytest.approx(1.0)
    for c in (c1, c2, c3):
        assert abs(cosine(out, c)) < 1e-6
    assert cosine(out, v) > 0
    assert cosine(conditional_direction(v, []), v) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="span"):
        conditional_direction(0.3 * c1 - 2 * c2, [c1, c2])
    with pytest.raises(ValueError, match="span"):
        conditional_direction(c1, [c1])
    with pytest.raises(ValueError, match="shape"):
        conditional_direction(v, [np.ones(7)])
    with pytest.raises(ValueError, match="zero"):
        conditional_direction(v, [np.zeros(shape)])


@pytest.mark.parametrize("shape", SHAPES)
def test_save_load_round_trip(tmp_path, shape):
    rng = np.random.default_rng(4)
    raw = 3 * _unit(rng, shape)  # not unit: saved normalised
    info = {"method": "lda", "inputs": {"latents": "x.npz"},
            "generator": {"path": "G.json", "sha256": "f00"}}
    path = save_direction(tmp_path / "d" / "card.npz", raw, info)
    v, side = load_direction(path)
    assert v.shape == shape and v.dtype == np.float32
    assert np.allclose(v, raw / 3, atol=1e-6)
    assert side == json.loads(path.with_suffix(".json").read_text())
    assert side["method"] == "lda" and side["inputs"] == {"latents": "x.npz"}
    assert side["generator"]["sha256"] == "f00" and side["cxredit"] == __version__
    assert side["space"] == ("w" if len(shape) == 1 else "w+") and side["created"]
    assert not list((tmp_path / "d").glob("*.tmp*"))
    with pytest.raises(ValueError, match="method"):
        save_direction(tmp_path / "x.npz", raw, {})
    with pytest.raises(ValueError, match=".npz"):
        save_direction(tmp_path / "x.npy", raw, info)
    with pytest.raises(ValueError, match="zero"):
        save_direction(tmp_path / "x.npz", np.zeros(shape), info)
    np.savez(tmp_path / "bad.npz", v=np.ones(shape))
    with pytest.raises(ValueError, match="unit"):
        load_direction(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="not found"):
        load_direction(tmp_path / "missing.npz")


def test_compare_matrix(tmp_path):
    rng = np.random.default_rng(5)
    vs = [_unit(rng, (16,)) for _ in range(3)]
    paths = [save_direction(tmp_path / f"d{i}.npz", v, {"method": "mean"})
             for i, v in enumerate(vs)]
    m = compare(paths)
    assert m.shape == (3, 3)
    assert np.allclose(m, m.T) and np.allclose(np.diag(m), 1.0)
    assert m[0, 2] == pytest.approx(float(vs[0] @ vs[2]), abs=1e-6)
    table = format_compare(paths, m)
    assert "d0" in table and "d2" in table and len(table.splitlines()) == 4
    # a W direction against a W+ one: the cosine of the displacements they make
    save_direction(tmp_path / "wplus.npz", np.stack([vs[0], vs[1]]), {"method": "mean"})
    mixed = compare([paths[0], tmp_path / "wplus.npz"])
    assert mixed[0, 1] == pytest.approx(float(1 + vs[0] @ vs[1]) / 2, abs=1e-6)
    save_direction(tmp_path / "other.npz", np.ones((2, 12)), {"method": "mean"})
    with pytest.raises(ValueError, match="shapes"):
        compare([paths[0], tmp_path / "other.npz"])


def _confounded_store(tmp_path, shape=(24,), n=2000):
    """Latents with a cardiomegaly, a device and a sex direction. Devices are far more frequent
    with (the rarer) cardiomegaly, so a plain cardiomegaly direction leaks the device direction
    more than the device direction leaks cardiomegaly: conditioning on devices helps."""
    rng = np.random.default_rng(6)
    q, _ = np.linalg.qr(rng.standard_normal((int(np.prod(shape)), 3)))
    v_card, v_dev, v_sex = (q[:, i].reshape(shape) for i in range(3))
    card = rng.random(n) < 0.15
    dev = rng.random(n) < np.where(card, 0.9, 0.25)
    sex = rng.choice(["M", "F"], n)
    planted = 2.0 * np.outer(card, v_card) + 2.0 * np.outer(dev, v_dev) + \
        1.5 * np.outer(sex == "M", v_sex)
    w = rng.standard_normal((n, *shape)) + planted.reshape((n, *shape))
    meta = pd.DataFrame({"index": np.arange(n), "path": [f"/x/{i}.png" for i in range(n)],
                         "sex": sex, "Cardiomegaly": card.astype(float),
                         "Support Devices": dev.astype(float)})
    meta.loc[::10, "Support Devices"] = np.nan  # unlabelled rows are left out of its fit
    meta.to_csv(tmp_path / "meta.csv", index=False)
    lat = save_latents(tmp_path / "lat.npz", w, [str(i) for i in range(n)],
                       {"generator": {"path": "G.json", "sha256": "beef"}, "method": "test"})
    defined = np.ones(n, bool)
    defined[::10] = False
    conds = [(np.ones(n, bool), sex == "M"), (defined, dev)]
    return lat, w, (v_card, v_dev), conds


@pytest.mark.parametrize("method", ["mean", "lda", "svm"])
def test_make_direction_conditional(tmp_path, method):
    lat, w, (v_card, v_dev), conds = _confounded_store(tmp_path)
    plain = make_direction(method, latents=lat, meta=tmp_path / "meta.csv",
                           out=tmp_path / "plain.npz")
    cond = make_direction(method, latents=lat, meta=tmp_path, out=tmp_path / "cond.npz",
                          conditions=["sex", "Support Devices"])
    v_plain, _ = load_direction(plain["out"])
    v_cond, side = load_direction(cond["out"])
    # orthogonal to the condition directions, fitted the same way on their own labels
    for defined, pos in conds:
        c = FITTERS[method](w[defined], pos[defined])
        assert abs(cosine(v_cond, c)) < 1e-6
    assert cosine(v_plain, v_dev) > 0.2  # the confounder leaks into the plain direction
    assert cosine(v_cond, v_card) > cosine(v_plain, v_card) + 0.05
    assert [c["column"] for c in cond["conditions"]] == ["sex", "Support Devices"]
    assert cond["conditions"][1]["positive"] + cond["conditions"][1]["negative"] == 1800
    assert cond["counts"] == plain["counts"] and cond["separation"] > 1.0 and cond["gap"] > 0
    assert side["generator"]["sha256"] == "beef" and side["method"] == method
    assert side["inputs"]["latents"]["path"] == str(lat) and len(side["conditions"]) == 2
    with pytest.raises(ValueError, match="not meta columns"):
        make_direction(method, latents=lat, meta=tmp_path, out=tmp_path / "x.npz",
                       conditions=["Edema"])


def test_make_direction_pair_and_errors(tmp_path):
    rng = np.random.default_rng(8)
    v = _unit(rng, (3, 8))
    w_I = rng.standard_normal((6, 3, 8))
    w_star = w_I + 2 * v + 0.1 * rng.standard_normal(w_I.shape)
    gen = {"generator": {"path": "G.json", "sha256": "cafe"}, "method": "test"}
    ids = [f"/x/{i}.png" for i in range(6)]
    a = save_latents(tmp_path / "I.npz", w_I, ids, gen)
    b = save_latents(tmp_path / "Istar.npz", w_star[::-1], ids[::-1], gen)  # matched by id
    s = make_direction("pair", pairs=(a, b), out=tmp_path / "pair.npz")
    got, side = load_direction(s["out"])
    assert s["space"] == "w+" and cosine(got, v) > 0.95
    assert side["method"] == "pair" and side["generator"]["sha256"] == "cafe"
    assert side["inputs"]["pairs"][1]["path"] == str(b)
    with pytest.raises(ValueError, match="pairs"):
        make_direction("pair", out=tmp_path / "x.npz")
    with pytest.raises(ValueError, match="needs latents"):
        make_direction("lda", out=tmp_path / "x.npz")
    with pytest.raises(ValueError, match="unknown method"):
        make_direction("pca", out=tmp_path / "x.npz")
    save_latents(tmp_path / "J.npz", w_I, ids, {**gen, "generator": {"sha256": "other"}})
    with pytest.raises(ValueError, match="different generators"):
        make_direction("pair", pairs=(a, tmp_path / "J.npz"), out=tmp_path / "x.npz")


def test_sigma_along_w_and_w_plus():
    from cxredit.latent.directions import sigma_along

    rng = np.random.default_rng(0)
    w = rng.normal(size=(200, 8)) * np.array([3.0] + [1.0] * 7)
    v = np.eye(8)[0]
    assert sigma_along(w, v) == pytest.approx(w[:, 0].std())
    assert sigma_along(w, v) > 2.5 and sigma_along(w, np.eye(8)[1]) < 1.2
    wp = w[:, None, :] + rng.normal(size=(200, 4, 8)) * 0.1  # W+: layers around w
    assert sigma_along(wp, v) == pytest.approx(wp.mean(1)[:, 0].std())
    assert sigma_along(wp, np.tile(v, (4, 1)) / 2) == pytest.approx(
        (wp.reshape(200, -1) @ (np.tile(v, (4, 1)) / 2).ravel()).std())


def test_cosine_of_a_w_and_a_w_plus_direction_is_that_of_their_displacements():
    rng = np.random.default_rng(1)
    v = rng.normal(size=8)
    vp = rng.normal(size=(4, 8))
    want = float(np.tile(v, (4, 1)).ravel() @ vp.ravel()
                 / np.linalg.norm(np.tile(v, (4, 1))) / np.linalg.norm(vp))
    assert cosine(v, vp) == pytest.approx(want) and cosine(vp, v) == pytest.approx(want)
    assert cosine(v, np.tile(v, (4, 1))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cannot compare"):
        cosine(v, rng.normal(size=(4, 6)))
