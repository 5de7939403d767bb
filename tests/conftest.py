"""Shared fixtures: a tiny but complete weights bundle (G, E, segmenter, directions)."""

from pathlib import Path

import pytest


def build_tiny_bundle(root: Path, encoder_space: str = "w") -> Path:
    """Train a 16-px pipeline for a few steps and export it as a bundle (CPU, ~10 s).

    The models are barely trained: good for plumbing (shapes, files, APIs), not for quality.
    With encoder_space "w+", E predicts W+ (started from a W encoder, as the demo's can be).
    """
    from cxredit.bundle import export_bundle
    from cxredit.cli import main
    from cxredit.make_weights import make_directions

    run = lambda *a: main([*map(str, a)])  # noqa: E731
    assert run("phantoms", "--out", root / "store", "--n", "64", "--resolution", "16",
               "--no-progress") == 0
    assert run("train-gan", "--data", root / "store", "--out", root / "gan", "--preset", "tiny",
               "--kimg", "0.016", "--batch", "8", "--set", "resolution=16", "--set",
               "channel_base=128", "--set", "w_dim=8", "--set", "z_dim=8", "--no-aug",
               "--no-progress") == 0
    assert run("train-encoder", "--gan", root / "gan", "--data", root / "store", "--out",
               root / "enc", "--preset", "tiny", "--kimg", "0.016", "--batch", "8",
               "--no-progress") == 0
    enc = root / "enc"
    if encoder_space == "w+":
        enc = root / "enc_wplus"
        assert run("train-encoder", "--gan", root / "gan", "--data", root / "store", "--out",
                   enc, "--preset", "tiny", "--kimg", "0.016", "--batch", "8", "--space", "w+",
                   "--init-from", root / "enc", "--no-progress") == 0
    assert run("train-segmenter", "--data", root / "store", "--out", root / "seg", "--kimg",
               "0.032", "--batch", "8", "--no-progress") == 0
    dirs = make_directions(enc, root / "gan", root / "store", root / "dirs", lda_images=64)
    export_bundle(root / "bundle", root / "gan", enc, root / "seg", None, dirs)
    return root / "bundle"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """Path of a tiny bundle folder (shared by the session; treat it as read-only)."""
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle"))
