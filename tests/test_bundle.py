"""Weight bundles: export, fp16 storage within tolerance, loading, errors; make-weights."""

import json

import numpy as np
import pytest
import torch

from cxredit.bundle import BundleError, export_bundle, load_bundle, read_manifest
from cxredit.cli import main
from cxredit.latent.invert import invert
from cxredit.runs import Run
from cxredit.train.gan import load_generator


def test_bundle_loads_and_matches_its_sources(tiny_bundle, tmp_path):
    b = load_bundle(tiny_bundle)
    mf = b.manifest
    assert mf["resolution"] == b.resolution == 16 and set(b.directions) == {"pair", "pair16", "lda"}
    src = load_generator(mf["components"]["generator"]["source"])
    z = torch.randn(4, src.z_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (b.G(z, noise_mode="const") - src(z, noise_mode="const")).abs().max()
    # fp16 storage: the output change is bounded by what the manifest recorded at export
    assert mf["components"]["generator"]["dtype"] == "float16"
    assert float(diff) <= 3 * mf["components"]["generator"]["fp16_max_abs_diff"] + 1e-6
    assert all(p.dtype == torch.float32 for p in b.G.parameters())  # loaded back as fp32
    # no training state travels: no D, no optimizer in the generator file
    doc = json.loads((tiny_bundle / "G.json").read_text())
    assert set(doc["state"]) == {"G_config", "G_ema"}
    # the encoder inside the bundle points at the bundle's G, so `invert` works from it
    assert json.loads((tiny_bundle / "E.json").read_text())["state"]["gan"]["path"] == "G"
    r = invert(tiny_bundle / "E", tmp_path / "lat.npz",
               store=mf["components"]["encoder"]["source"].split("/enc/")[0] + "/store",
               progress=False)
    assert r["count"] == 64 and np.isfinite(r["ssim"])
    for name, (v, side) in b.directions.items():
        assert abs(np.linalg.norm(v) - 1) < 1e-5, name
        assert side["generator"]["sha256"] == b.generator_sha256


def test_fp32_export_is_exact_and_partial_loading(tiny_bundle, tmp_path):
    src = read_manifest(tiny_bundle)["components"]
    export_bundle(tmp_path / "b32", src["generator"]["source"], half=False)
    b = load_bundle(tmp_path / "b32")
    assert b.E is None and b.segmenter is None and not b.directions
    ref = load_generator(src["generator"]["source"])
    for (k, p), q in zip(b.G.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), k
    with pytest.raises(BundleError, match="no encoder"):
        load_bundle(tmp_path / "b32", components=("encoder",))


def test_bundle_errors(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match="no bundle.json"):
        load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text(json.dumps({"format": "cxredit.bundle",
                                                      "format_version": 99}))
    with pytest.raises(BundleError, match="version 99"):
        load_bundle(tmp_path)
    src = read_manifest(tiny_bundle)["components"]
    other = tmp_path / "other"
    assert main(["train-gan", "--data", src["encoder"]["source"].split("/enc/")[0] + "/store",
                 "--out", str(other), "--preset", "tiny", "--kimg", "0.008", "--batch", "8",
                 "--set", "resolution=16", "--set", "channel_base=128", "--set", "w_dim=8",
                 "--set", "z_dim=8", "--no-aug", "--no-progress", "--seed", "5"]) == 0
    with pytest.raises(BundleError, match="another generator"):
        export_bundle(tmp_path / "x", other, encoder=src["encoder"]["source"])


def test_make_weights_checks_settings_before_training(tmp_path, capsys):
    base = ["make-weights", "--out", str(tmp_path / "w"), "--work", str(tmp_path / "runs"),
            "--preset", "tiny", "--no-progress"]
    for extra, words in ((["--encoder-set", "lr=0"], "lr must be positive"),
                         (["--encoder-set", "space=w+"], "--encoder-space"),
                         (["--n-train", "0"], "--n-train must be at least 1")):
        assert main([*base, *extra]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was trained or written


def test_make_weights_tiny_recipe_and_cli(tmp_path, capsys):
    args = ["make-weights", "--out", str(tmp_path / "w"), "--work", str(tmp_path / "runs"),
            "--preset", "tiny", "--n-train", "48", "--no-progress"]
    assert main(args) == 0
    b = load_bundle(tmp_path / "w")
    assert b.classifier is not None and b.segmenter is not None and b.E is not None
    assert set(b.directions) == {"pair", "pair16", "lda"}
    rec = b.manifest["recipe"]
    assert rec["preset"] == "tiny" and rec["n_train"] == 48
    secs = b.manifest["seconds"]
    assert set(secs) == {"generator", "encoder", "segmenter", "classifier"}
    assert all(v > 0 for v in secs.values())
    sha = b.generator_sha256
    assert main(args) == 0  # every stage is finished: the same generator is exported again
    again = load_bundle(tmp_path / "w")
    assert again.generator_sha256 == sha
    assert again.manifest["seconds"] == secs  # the stages' training time, not this call's
    # a recipe that differs from what the work folder holds is refused, not mis-recorded
    capsys.readouterr()
    assert main([*args[:8], "96", *args[9:]]) == 2
    assert "made with --n-train 48, not 96" in capsys.readouterr().err
    assert main([*args, "--encoder-space", "w+"]) == 2
    assert "made with --encoder-space 'w', not 'w+'" in capsys.readouterr().err
    # a W+ encoder started from the W one, the other stages reused (linked) from the first work
    (tmp_path / "wp").mkdir()
    for stage in ("train_store", "gan", "segmenter", "classifier"):
        (tmp_path / "wp" / stage).symlink_to(tmp_path / "runs" / stage)
    assert main([*args[:2], str(tmp_path / "bp"), "--work", str(tmp_path / "wp"), *args[5:],
                 "--encoder-space", "w+", "--encoder-init", str(tmp_path / "runs" / "encoder"),
                 "--encoder-set", "real_ssim=4"]) == 0
    bp = load_bundle(tmp_path / "bp")
    assert bp.E.space == "w+" and bp.generator_sha256 == sha
    assert bp.manifest["recipe"]["encoder_space"] == "w+"
    assert bp.manifest["recipe"]["encoder_train"] == {"real_ssim": 4.0}
    assert Run(tmp_path / "wp" / "encoder", resume=True).read_config()["config"]["real_ssim"] == 4
    assert bp.manifest["recipe"]["encoder_init"]["space"] == "w"
    assert bp.directions["pair"][0].shape == (bp.G.num_ws, bp.G.w_dim)
    assert main(["export-bundle", "--out", str(tmp_path / "w2"), "--gan",
                 str(tmp_path / "runs" / "gan"), "--direction", "bad"]) == 2
    assert "NAME=FILE" in capsys.readouterr().err
    assert main([*args, "--encoder-set", "real_sim=4"]) == 2
    assert "unknown config field 'real_sim'" in capsys.readouterr().err


def test_bundle_python_api_reads_encodes_edits_and_measures(tiny_bundle, tmp_path):
    from cxredit.data.io import write_png

    b = load_bundle(tiny_bundle)
    img = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(40, 30)
    write_png(tmp_path / "x.png", img)
    x = b.read(tmp_path / "x.png")
    assert x.shape == (1, 1, 16, 16) and -1 <= float(x.min()) <= float(x.max()) <= 1
    w = b.encode(x)
    assert w.shape == (1, b.G.w_dim)
    np.testing.assert_array_equal(b.edit(w, "pair", 0.0).numpy(), b.synthesize(w).numpy())
    assert not torch.equal(b.edit(w, "pair", 3.0), b.synthesize(w))
    assert b.ctr(b.synthesize(w)).shape == (1,)
    with pytest.raises(BundleError, match="no direction 'x'"):
        b.edit(w, "x", 1.0)
