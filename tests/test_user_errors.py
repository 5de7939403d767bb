"""What users get wrong with models, latents, directions and bundles: one-line errors naming
the file and the problem, and no silently wrong output (tiny 16-px bundle, CPU)."""

import json
import shutil

import numpy as np
import pytest
import torch

from cxredit.bundle import BundleError, export_bundle, load_bundle
from cxredit.checkpoint import CheckpointError
from cxredit.cli import main
from cxredit.data.io import output_stems, read_png_text, write_png
from cxredit.latent.directions import load_direction, save_direction
from cxredit.latent.edit import apply_direction, parse_alphas, parse_layers
from cxredit.latent.heart_warp import HeartBox, enlarge_heart
from cxredit.latent.io import load_latents, save_latents
from cxredit.train.gan import load_generator


@pytest.fixture(scope="module")
def work(tiny_bundle, tmp_path_factory):
    """A private copy of the tiny bundle, its GAN run and directions (linked) and 4 latents."""
    root = tmp_path_factory.mktemp("usererr")
    shutil.copytree(tiny_bundle, root / "bundle")
    for name in ("gan", "dirs"):
        (root / name).symlink_to(tiny_bundle.parent / name, target_is_directory=True)
    b = load_bundle(root / "bundle")
    w = np.random.default_rng(0).standard_normal((4, b.G.w_dim)).astype(np.float32)
    save_latents(root / "lat.npz", w, ["0", "1", "2", "3"], {"method": "test"})
    return root


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def _edit(work, *extra):
    return main(["edit", "--gan", str(work / "gan"), "--latents", str(work / "lat.npz"),
                 "--direction", str(work / "bundle" / "directions" / "pair.npz"),
                 "--device", "cpu", *map(str, extra)])


def test_parse_alphas_and_layers():
    assert parse_alphas("-2,0,2,0") == [-2.0, 0.0, 2.0]  # repeats dropped
    for bad in ("nan", "1,inf", "1,,2", "x", "1e400"):
        with pytest.raises(ValueError, match="--alphas"):
            parse_alphas(bad)
    assert parse_layers("0-2,5", 10) == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="reversed"):
        parse_layers("5-0", 10)
    for bad in ("-1", "0-10", "a", "1-"):
        with pytest.raises(ValueError, match="--layers"):
            parse_layers(bad, 10)


def test_apply_direction_checks_shapes_alpha_and_layers():
    w, v = torch.zeros(2, 8), torch.ones(8) / 8**0.5
    assert apply_direction(w, v, 1.0, 6).shape == (2, 8)
    with pytest.raises(ValueError, match=r"\[N, 6, 8\]"):
        apply_direction(torch.zeros(2, 5, 8), v, 1.0, 6)
    with pytest.raises(ValueError, match="w_dim 8 != the latents' w_dim 4"):
        apply_direction(torch.zeros(2, 4), v, 1.0, 6)
    with pytest.raises(ValueError, match="does not fit"):
        apply_direction(w, torch.ones(5, 8), 1.0, 6)
    with pytest.raises(ValueError, match="finite"):
        apply_direction(w, v, float("nan"), 6)
    with pytest.raises(ValueError, match="0..5"):
        apply_direction(w, v, 1.0, 6, layers=[])


def test_output_stems_are_unique():
    assert output_stems(["12", "a/x.png", "b/y.png"]) == ["row0000012", "x", "y"]
    assert output_stems(["d1/a.png", "d2/a.png", "b.png"]) == ["a_0", "a_1", "b"]
    assert output_stems(["3"], rows=False) == ["3"]


def test_heart_box_outside_the_image_is_refused():
    img = np.zeros((64, 64), np.float32)
    for box in ("100,100,200,200", "-50,-50,-10,-10", "0,0,1000,1000"):
        with pytest.raises(ValueError, match="inside the 64x64 image"):
            enlarge_heart(img, HeartBox.parse(box))


def test_edit_cli_user_errors(work, capsys):
    for extra, words in ((["--alphas=nan", "--out", work / "e"], "--alphas"),
                         (["--limit", "0", "--out", work / "e"], "--limit"),
                         (["--limit", "-1", "--out", work / "e"], "--limit"),
                         (["--layers=5-0", "--out", work / "e"], "reversed")):
        assert _edit(work, *extra) == 2
        assert words in _err(capsys)
    (work / "afile").write_text("x")
    assert _edit(work, "--out", work / "afile") == 2
    assert f"{work / 'afile'}: exists and is not a folder" in _err(capsys)
    # latents that do not fit the generator, an empty latents file, a damaged sidecar
    w, ids, _, _ = load_latents(work / "lat.npz")
    save_latents(work / "bad.npz", np.zeros((4, 3, w.shape[1]), np.float32), ids, {})
    save_latents(work / "empty.npz", np.zeros((0, w.shape[1]), np.float32), [], {})
    shutil.copy(work / "lat.npz", work / "side.npz")
    (work / "side.json").write_text('{"format":')
    for lat, words in (("bad.npz", "do not fit the generator"), ("empty.npz", "no latents"),
                       ("side.npz", "side.json: not a valid sidecar JSON")):
        assert main(["edit", "--gan", str(work / "gan"), "--latents", str(work / lat),
                     "--direction", str(work / "bundle" / "directions" / "pair.npz"),
                     "--out", str(work / "e"), "--device", "cpu"]) == 2
        err = _err(capsys)
        assert words in err and lat.split(".")[0] in err


def test_edit_records_layers_and_keeps_duplicate_names_apart(work):
    w, _, _, _ = load_latents(work / "lat.npz")
    save_latents(work / "dup.npz", w[:2], ["d1/a.png", "d2/a.png"], {})
    out = work / "dup_edit"
    assert main(["edit", "--gan", str(work / "gan"), "--latents", str(work / "dup.npz"),
                 "--direction", str(work / "bundle" / "directions" / "pair.npz"),
                 "--alphas", "0,0,2", "--layers", "0-1", "--out", str(out),
                 "--device", "cpu"]) == 0
    names = sorted(p.name for p in out.glob("a_*.png"))
    assert names == ["a_0_a0.png", "a_0_a2.png", "a_1_a0.png", "a_1_a2.png"]
    text = read_png_text(out / "a_1_a2.png")
    assert text["cxredit:layers"] == "0,1" and text["cxredit:source-id"] == "d2/a.png"
    assert read_png_text(out / "sweep.png")["cxredit:alpha"] == "0,2"


def test_bundle_api_checks_latents_and_alpha(work):
    b = load_bundle(work / "bundle")
    w = np.zeros((1, b.G.w_dim), np.float32)
    assert b.edit(w, "pair", 1.0).shape == (1, 1, 16, 16)  # numpy input is fine
    for bad in (np.zeros(b.G.w_dim, np.float32), np.zeros((1, 5, b.G.w_dim), np.float32),
                np.zeros((1, 3), np.float32)):
        with pytest.raises(ValueError, match="do not fit the generator"):
            b.edit(bad, "pair", 1.0)
    with pytest.raises(ValueError, match="finite"):
        b.edit(w, "pair", float("nan"))


def test_bundle_with_a_foreign_direction_fails_at_load(work):
    bad = work / "bad_bundle"
    shutil.copytree(work / "bundle", bad)
    save_direction(bad / "directions" / "pair.npz", np.ones(3), {"method": "x"})
    with pytest.raises(BundleError, match="pair.npz: direction of shape \\[3\\] does not fit"):
        load_bundle(bad)


def test_export_bundle_names_and_stale_files(work, capsys):
    d = work / "dirs" / "pair.npz"  # made with the GAN run's G
    assert main(["export-bundle", "--out", str(work / "exp"), "--gan", str(work / "gan"),
                 "--direction", f"../../escaped={d}"]) == 2
    assert "direction name" in _err(capsys)
    assert not (work / "escaped.npz").exists() and not (work.parent / "escaped.npz").exists()
    # a direction .npz made outside cxredit (no sidecar) is accepted, its method unknown
    v, _ = load_direction(d)
    np.savez(work / "raw.npz", v=v)
    export_bundle(work / "exp", work / "gan", directions={"pair": d, "raw": work / "raw.npz"})
    assert load_bundle(work / "exp").directions["raw"][1]["method"] == "unknown"
    # exporting again without the directions removes their files
    export_bundle(work / "exp", work / "gan")
    assert not list((work / "exp" / "directions").glob("*"))
    assert (work / "exp" / "G.json").exists()


def test_damaged_checkpoints_and_bundle_folders(work, capsys):
    g = work / "bundle" / "G.json"
    doc = json.loads(g.read_text())
    cases = {"nosha": {k: v for k, v in doc.items() if k != "sha256"},
             "nostate": {k: v for k, v in doc.items() if k != "state"}, "list": [1, 2]}
    for name, bad in cases.items():
        d = work / f"ck_{name}"
        d.mkdir()
        shutil.copy(work / "bundle" / "G.safetensors", d / "G.safetensors")
        (d / "G.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=f"{d / 'G.json'}: (damaged|not a cxredit)"):
            load_generator(d / "G.json")
    # a config that does not fit the tensors
    d = work / "ck_cfg"
    d.mkdir()
    shutil.copy(work / "bundle" / "G.safetensors", d / "G.safetensors")
    bad = json.loads(json.dumps(doc))
    bad["state"]["G_config"]["w_dim"] = 2 * doc["state"]["G_config"]["w_dim"]
    (d / "G.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="config and weights do not fit") as info:
        load_generator(d / "G.json")
    assert "\n" not in str(info.value)
    # a bundle folder where a run is expected: the error lists the bundle's checkpoints
    assert main(["edit", "--gan", str(work / "bundle"), "--latents", str(work / "lat.npz"),
                 "--direction", str(work / "bundle" / "directions" / "pair.npz"),
                 "--out", str(work / "e2")]) == 2
    assert f"is a weights bundle, not a run; pass one of its checkpoints: {g} (gan)" in \
        _err(capsys)


def test_ctr_overlay_of_an_edit_stays_marked_synthetic(work, tmp_path):
    b = load_bundle(work / "bundle")
    img = (b.edit(np.zeros((1, b.G.w_dim), np.float32), "pair", 2.0)[0, 0].numpy() + 1) / 2
    write_png(tmp_path / "edit.png", img, provenance={"cxredit:synthetic": "true",
                                                      "cxredit:alpha": "2"})
    write_png(tmp_path / "real.png", img)
    assert main(["ctr", "--images", str(tmp_path / "edit.png"), str(tmp_path / "real.png"),
                 "--segmenter", str(work / "bundle" / "segmenter.json"), "--overlay-dir",
                 str(tmp_path / "ov"), "--device", "cpu"]) == 0
    marked = read_png_text(tmp_path / "ov" / "edit_ctr.png")
    assert marked["cxredit:synthetic"] == "true" and marked["cxredit:alpha"] == "2"
    assert "SYNTHETIC" in marked["Description"]
    assert "cxredit:synthetic" not in read_png_text(tmp_path / "ov" / "real_ctr.png")


def test_latents_from_another_store_warn(work, tiny_bundle, caplog):
    from cxredit.latent.separability import load_joined

    w, ids, _, _ = load_latents(work / "lat.npz")
    store = tiny_bundle.parent / "store"
    save_latents(work / "own.npz", w, ids, {"source": {"store": str(store)}})
    save_latents(work / "other.npz", w, ids, {"source": {"store": str(work / "elsewhere")}})
    load_joined(work / "own.npz", store)
    assert "made from the store" not in caplog.text
    load_joined(work / "other.npz", store)
    assert f"made from the store {work / 'elsewhere'}, not {store}" in caplog.text


def test_direction_compare_and_svm_errors_name_the_problem(work):
    from cxredit.latent.directions import compare, svm_direction

    save_direction(work / "d3.npz", np.ones(3), {"method": "x"})
    pair = work / "bundle" / "directions" / "pair.npz"
    with pytest.raises(ValueError, match=f"{pair} vs {work / 'd3.npz'}: cannot compare"):
        compare([pair, work / "d3.npz"])
    w = np.random.default_rng(0).standard_normal((8, 4))
    with pytest.raises(ValueError, match="--C .* positive"):
        svm_direction(w, np.arange(8) % 2 == 0, C=-1)


def test_fid_refuses_other_resolutions_and_tiny_sets(work, tiny_bundle, tmp_path, capsys):
    store = tiny_bundle.parent / "store"  # 16 px, as the GAN
    assert main(["phantoms", "--out", str(tmp_path / "s32"), "--n", "8", "--resolution", "32",
                 "--no-progress"]) == 0
    capsys.readouterr()
    for extra, words in ((["--real", str(tmp_path / "s32"), "--gan", str(work / "gan")],
                          "is 16 px but --real"),
                         (["--real", str(store), "--store-b", str(tmp_path / "s32")],
                          "is 32 px but --real"),
                         (["--real", str(store), "--gan", str(work / "gan"), "--n", "0"],
                          "--n must be at least 2"),
                         (["--real", str(store), "--store-b", str(store), "--limit", "-10"],
                          "--limit must be at least 2")):
        assert main(["fid", "--extractor", "random", *extra]) == 2
        assert words in _err(capsys)
