"""The latent toolkit wired through the CLI on a tiny phantom pipeline (CPU, seconds)."""

import json

import numpy as np
import pytest
import torch

from cxredit.cli import main
from cxredit.data.io import read_png_text, read_xray
from cxredit.data.store import ImageStore
from cxredit.latent.directions import load_direction
from cxredit.latent.io import load_latents
from cxredit.train.gan import load_generator


@pytest.fixture(scope="module")
def pipeline(tiny_bundle, tmp_path_factory):
    """The tiny bundle's 16-px store, G and E (linked, read-only) and E's latents of the store."""
    root = tmp_path_factory.mktemp("lat")
    for name in ("store", "gan", "enc"):
        (root / name).symlink_to(tiny_bundle.parent / name, target_is_directory=True)
    assert main(["invert", "--encoder", str(root / "enc"), "--store", str(root / "store"),
                 "--out", str(root / "lat.npz"), "--no-progress"]) == 0
    return root


def test_project_cli_from_encoder_init(pipeline):
    out = pipeline / "proj.npz"
    assert main(["project", "--gan", str(pipeline / "gan"), "--store", str(pipeline / "store"),
                 "--limit", "3", "--init", "encoder", "--encoder", str(pipeline / "enc"),
                 "--steps", "20", "--batch", "2", "--out", str(out), "--no-progress"]) == 0
    w, ids, info, extra = load_latents(out)
    enc, _, _, enc_extra = load_latents(pipeline / "lat.npz")
    assert w.shape == (3, 8) and ids == ["0", "1", "2"] and info["method"] == "project"
    # optimisation from the encoder's guess improves on the encoder's reconstruction
    assert extra["ssim"].mean() >= enc_extra["ssim"][:3].mean() - 1e-6


def test_separability_cli_writes_numbers_and_figure(pipeline, capsys):
    out = pipeline / "sep"
    assert main(["separability", "--latents", str(pipeline / "lat.npz"), "--meta",
                 str(pipeline / "store"), "--shrinkage", "auto", "--folds", "3", "--out",
                 str(out)]) == 0
    doc = json.loads((out / "separability.json").read_text())
    store = ImageStore(pipeline / "store")
    n_pos = int((store.meta["Cardiomegaly"] == 1).sum())
    assert doc["counts"]["positive"] == n_pos and doc["counts"]["negative"] == 64 - n_pos
    for k in ("separation", "separation_cv", "auc", "balanced_accuracy"):
        assert np.isfinite(doc[k]), k
    assert (out / "separability.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "cross-validated" in printed and f"({n_pos}) vs " in printed
    assert f"({64 - n_pos}): separation" in printed and "{" not in printed


def test_directions_and_edits_cli(pipeline, capsys):
    lda = pipeline / "lda.npz"
    assert main(["direction", "--method", "lda", "--latents", str(pipeline / "lat.npz"),
                 "--meta", str(pipeline / "store"), "--shrinkage", "auto", "--out",
                 str(lda)]) == 0
    cond = pipeline / "cond.npz"
    assert main(["direction", "--method", "conditional", "--condition", "sex", "--latents",
                 str(pipeline / "lat.npz"), "--meta", str(pipeline / "store"), "--out",
                 str(cond)]) == 0
    v, info = load_direction(lda)
    assert v.shape == (8,) and abs(np.linalg.norm(v) - 1) < 1e-5 and info["method"] == "lda"
    # paper's pair direction: I from the store, I* by the heart warp, both inverted by E
    store = ImageStore(pipeline / "store")
    row = int(store.select(query="Cardiomegaly==0")[0])
    from cxredit.data.io import write_png

    write_png(pipeline / "I.png", store.images[row])
    write_png(pipeline / "heart.png", store.masks[row, 0] * 255)
    assert main(["enlarge-heart", "--image", str(pipeline / "I.png"), "--mask",
                 str(pipeline / "heart.png"), "--scale", "1.3", "--out",
                 str(pipeline / "I_star.png")]) == 0
    assert read_png_text(pipeline / "I_star.png")["cxredit:synthetic"] == "true"
    for name in ("I", "I_star"):
        assert main(["invert", "--encoder", str(pipeline / "enc"), "--images",
                     str(pipeline / f"{name}.png"), "--out", str(pipeline / f"{name}.npz"),
                     "--no-progress"]) == 0
    pair = pipeline / "pair.npz"
    assert main(["direction", "--method", "pair", "--pairs", str(pipeline / "I.npz"),
                 str(pipeline / "I_star.npz"), "--out", str(pair)]) == 0
    # the same in one command, from the images, by encoder and by projection
    for how, extra in (("encoder", []), ("project", ["--gan", str(pipeline / "gan"),
                                                     "--steps", "5"])):
        out = pipeline / f"pair_{how}.npz"
        assert main(["direction", "--method", "pair", "--image-pairs", str(pipeline / "I.png"),
                     str(pipeline / "I_star.png"), "--latents-from", how, "--encoder",
                     str(pipeline / "enc"), *extra, "--out", str(out)]) == 0
        v_how, _ = load_direction(out)
        assert v_how.shape == (8,)
        if how == "encoder":
            np.testing.assert_allclose(v_how, load_direction(pair)[0], atol=1e-6)
        assert (pipeline / f"pair_{how}_pairs" / "pairs_Istar.npz").exists()
    assert main(["direction", "--method", "pair", "--image-pairs", str(pipeline / "I.png"),
                 "--out", str(pipeline / "x.npz")]) == 2
    capsys.readouterr()
    assert main(["direction", "compare", str(lda), str(pair), str(cond)]) == 0
    assert "1.000" in capsys.readouterr().out
    # edits: alpha 0 reproduces G(w) exactly; every file carries provenance
    out = pipeline / "edits"
    assert main(["edit", "--gan", str(pipeline / "gan"), "--latents", str(pipeline / "lat.npz"),
                 "--direction", str(lda), "--alphas", "0,3", "--limit", "4", "--out",
                 str(out), "--dicom"]) == 0
    w, ids, _, _ = load_latents(pipeline / "lat.npz")
    G = load_generator(pipeline / "gan")
    with torch.no_grad():
        ref = G.synthesis(torch.from_numpy(w[:1]), noise_mode="const").clamp(-1, 1)
    ref8 = np.round((ref[0, 0].numpy() + 1) / 2 * 255) / 255
    got = read_xray(out / f"row{ids[0].zfill(7)}_a0.png")
    assert np.abs(got - ref8).max() < 1e-6
    moved = read_xray(out / f"row{ids[0].zfill(7)}_a3.png")
    assert np.abs(moved - got).max() > 0
    text = read_png_text(out / f"row{ids[0].zfill(7)}_a3.png")
    assert text["cxredit:synthetic"] == "true" and text["cxredit:alpha"] == "3"
    assert len(list(out.glob("*.dcm"))) == 8 and (out / "sweep.png").exists()
    assert main(["edit", "--gan", str(pipeline / "gan"), "--latents", str(pipeline / "lat.npz"),
                 "--direction", str(lda), "--alphas", "x", "--out", str(out)]) == 2


def test_segmenter_ctr_and_fid_cli(pipeline, capsys):
    import pandas as pd

    seg = pipeline / "seg"
    assert main(["train-segmenter", "--data", str(pipeline / "store"), "--out", str(seg),
                 "--kimg", "0.032", "--batch", "8", "--no-progress"]) == 0
    csv = pipeline / "ctr.csv"
    assert main(["ctr", "--store", str(pipeline / "store"), "--segmenter", str(seg), "--out",
                 str(csv), "--overlay-dir", str(pipeline / "ov")]) == 0
    df = pd.read_csv(csv)
    assert len(df) == 64 and set(df.columns) >= {"id", "ctr", "mrd", "mld", "id_width"}
    assert len(list((pipeline / "ov").glob("*_ctr.png"))) == 64
    out = pipeline / "fid.json"
    assert main(["fid", "--real", str(pipeline / "store"), "--gan", str(pipeline / "gan"),
                 "--n", "32", "--extractor", "random", "--kid-subset-size", "16", "--out",
                 str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["extractor"] == "random" and doc["fid"] > 0 and doc["n_b"] == 32
    capsys.readouterr()
    assert main(["fid", "--real", str(pipeline / "store"), "--store-b", str(pipeline / "store"),
                 "--extractor", "inception"]) == 2
    assert "--inception-weights" in capsys.readouterr().err
