"""`cxredit evaluate` from training runs (the --gan form) and with missing components."""

import json

import numpy as np

from cxredit.cli import main
from cxredit.data.prepare import make_phantom_store
from cxredit.data.store import ImageStore
from cxredit.latent.separability import separation


def _test_store(root):
    store = root / "eval_store"
    if not (store / "store.json").exists():
        make_phantom_store(store, 24, 16, 0.5, 901, progress=False)
    return store


def test_evaluate_from_runs_with_a_direction_file(tiny_bundle, tmp_path, capsys):
    runs = tiny_bundle.parent
    out = tmp_path / "ev" / "m.json"
    assert main(["evaluate", "--gan", str(runs / "gan"), "--encoder", str(runs / "enc"),
                 "--segmenter", str(runs / "seg"), "--direction", str(runs / "dirs" / "lda.npz"),
                 "--data", str(_test_store(tmp_path)), "--out", str(out), "--n-project", "6",
                 "--project-steps", "3", "--n-edit", "4", "--alphas", "0,2", "--report",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "report:" in text and "missed" in text  # barely trained models miss every target
    m = json.loads(out.read_text())
    assert m["models"]["generator"]["sha256"] and m["models"]["encoder"]["config"]
    assert m["edit"]["direction"] == "lda" and m["edit"]["alphas"] == [0.0, 2.0]
    assert m["edit"]["latents"] == "projection" and m["edit"]["n"] == 4
    assert m["directions"]["names"] == ["lda"]
    assert np.allclose(m["directions"]["cosine"], [[1.0]], atol=1e-12)
    assert set(m["separability"]) == {"encoder", "projection", "true_ctr"}
    sep = m["separability"]["encoder"]
    assert sep["n_pos"] + sep["n_neg"] == 24 and np.isfinite(sep["separation_cv"])
    # phantoms: the same measure on the ground-truth CTR behind the labels, for reference
    meta = ImageStore(_test_store(tmp_path)).meta
    ctr, y = meta["ctr"].to_numpy(), meta["Cardiomegaly"].to_numpy() == 1
    assert np.isclose(m["separability"]["true_ctr"]["separation"], separation(ctr[y], ctr[~y]))
    assert m["generation"]["extractor"] == "encoder" and m["generation"]["n_real"] == 12
    assert (out.parent / "report.html").exists() and (out.parent / "edit_sweep.png").exists()
    json.loads(out.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_evaluate_with_only_a_generator_skips_what_it_cannot_measure(tiny_bundle, tmp_path,
                                                                     capsys):
    runs = tiny_bundle.parent
    assert main(["evaluate", "--gan", str(runs / "gan"), "--data", str(_test_store(tmp_path)),
                 "--out", str(tmp_path / "g"), "--n-project", "5", "--project-steps", "2",
                 "--no-progress"]) == 0
    m = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert "generation" not in m and "edit" not in m and "encoder" not in m["reconstruction"]
    assert m["reconstruction"]["projection"]["init"] == "mean w"
    assert list(m["separability"]) == ["projection", "true_ctr"]
    assert set(m["skipped"]) == {"generation", "edit"}
    assert "skipped edit" in capsys.readouterr().out


def test_evaluate_user_errors(tiny_bundle, tmp_path, capsys):
    store = _test_store(tmp_path)
    assert main(["evaluate", "--weights", str(tiny_bundle), "--encoder", "x", "--data",
                 str(store), "--out", str(tmp_path / "e")]) == 2
    assert main(["evaluate", "--weights", str(tiny_bundle), "--direction", "nope", "--data",
                 str(store), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "goes with --gan" in err and "no direction 'nope'" in err
    healthy_only = tmp_path / "h"
    make_phantom_store(healthy_only, 4, 16, 0.0, 902, progress=False)
    assert main(["evaluate", "--weights", str(tiny_bundle), "--data", str(healthy_only),
                 "--out", str(tmp_path / "e")]) == 2
    assert "both healthy" in capsys.readouterr().err


def test_evaluate_projection_in_w_plus(tiny_bundle, tmp_path):
    store, out = _test_store(tmp_path), tmp_path / "wp"
    args = ["evaluate", "--weights", str(tiny_bundle), "--data", str(store), "--out", str(out),
            "--n-fid", "0", "--n-project", "6", "--project-steps", "3", "--n-edit", "4",
            "--alphas", "0,2", "--no-progress"]
    assert main(args + ["--project-space", "w+"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    proj = m["reconstruction"]["projection"]
    assert proj["space"] == "w+" and proj["init"] == "encoder" and proj["latent_noise"] == 0.0
    with np.load(out / "projection.partial.npz") as z:
        w = z["w"]
        assert str(z["space"]) == "w+" and w.ndim == 3 and len(w) == 12
        assert not np.allclose(w[:, 0], w[:, -1])  # layers were optimised apart
    assert m["separability"]["projection"]["latent"] == "W+ mean over layers"
    assert m["separability"]["encoder"]["latent"] == "W"
    e = m["edit"]
    assert e["latents"] == "projection" and np.isfinite(e["sigma_v"]) and e["sigma_v"] > 0
    assert np.isfinite(e["lec"]["ssim"])  # LEC re-encodes from the encoder's W latents
    # other settings: the partial W+ projections are not reused for a W run
    assert main(args + ["--project-space", "w"]) == 0
    with np.load(out / "projection.partial.npz") as z:
        assert str(z["space"]) == "w" and z["w"].ndim == 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["reconstruction"]["projection"]["space"] == "w"
    # a finished row is reused only if it started from the same latent with the same G:
    # mark rows 0 and 1 as projected to zeros, row 0 from another start
    part = out / "projection.partial.npz"

    def tamper(**changes):
        with np.load(part) as z:
            d = {k: z[k] for k in z.files}
        d["w"][:2] = 0
        d["init"][0] += 1
        d.update(changes)
        np.savez(part, **d)

    tamper()
    assert main(args + ["--project-space", "w"]) == 0
    with np.load(part) as z:
        assert z["w"][0].any() and not z["w"][1].any()  # row 0 projected again, row 1 reused
    tamper(generator=np.asarray("another"))
    assert main(args + ["--project-space", "w"]) == 0
    with np.load(part) as z:
        assert z["w"][0].any() and z["w"][1].any()  # another G: nothing reused
