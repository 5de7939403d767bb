"""`cxredit make-weights`: train every model of a bundle on phantoms with cxredit's own steps.

This is the recipe behind the shipped `weights/demo/` (see its MODEL_CARD.md), written as one
resumable function so that the weights can be re-made, and checked, by anyone:

1. a phantom training store (`cxredit phantoms`);
2. StyleGAN2 (`cxredit train-gan`), then the CRG encoder against its G_ema
   (`cxredit train-encoder`), the heart/lung segmenter (`cxredit train-segmenter`) and the
   cardiomegaly classifier (`cxredit train-classifier`);
3. directions: the paper's pair direction v = normalize(E(I*) - E(I)) from one healthy phantom
   I and I* = `enlarge-heart`(I) ("pair"), the same averaged over 16 pairs ("pair16"), and the
   LDA direction of encoded training images ("lda");
4. `export_bundle` into the output folder.

Each stage is skipped when its run already reached its length and resumed exactly when it was
interrupted, so re-running the same command continues where it stopped. Phantom seeds never
overlap with the demo's test set (`cxredit.demo.TEST_SEED`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

TRAIN_SEED = 1  # phantom seed of the training store
DIRECTION_SEED = 700  # phantom seed of the images I behind the pair directions

RECIPES = {
    # 64 px CPU recipe of the shipped weights. The encoder uses the width-32 "tiny" ResNet-10
    # trunk instead of the demo64 preset's ResNet-18: on 2 CPU cores it trains ~3x faster
    # (110 vs 312 s/kimg on one core) and its fp16 weights take ~3 MB instead of ~24 MB.
    "demo64": dict(n_train=10000, gan_kimg=200.0, encoder_kimg=60.0, segmenter_kimg=20.0,
                   classifier_kimg=20.0, lda_images=2000, encoder_space="w",
                   encoder_train={}, encoder_overrides={"trunk": "tiny", "tiny_width": 32}),
    # Seconds on CPU: for tests and smoke runs (weights only good for plumbing checks).
    "tiny": dict(n_train=128, gan_kimg=0.032, encoder_kimg=0.032, segmenter_kimg=0.064,
                 classifier_kimg=0.064, lda_images=128, encoder_space="w",
                 encoder_train={}, encoder_overrides={}),
}


def _resumable(run_dir: Path) -> bool:
    return (run_dir / "config.json").exists()


def _check_work_matches(work: Path, r: dict, gan_overrides: dict) -> None:
    """Refuse a recipe that differs from what `work` already holds: finished stages are
    reused as they are, so the bundle's recorded recipe would not be what was trained."""
    import json

    def differ(what: str, have, want, option: str) -> None:
        if have != want:
            raise ValueError(f"{work / what} was made with {option} {have!r}, not {want!r}: "
                             "use the same settings to continue it, or another --work")

    store = work / "train_store" / "store.json"
    if store.exists():
        n = json.loads(store.read_text()).get("phantom", {}).get("n")
        differ("train_store", n, int(r["n_train"]), "--n-train")
    for stage, want in (("gan", gan_overrides),
                        ("encoder", {"space": r["encoder_space"], **r["encoder_train"]})):
        cfg_path = work / stage / "config.json"
        if cfg_path.exists() and want:
            have = json.loads(cfg_path.read_text())["config"]
            for k, v in want.items():
                old = tuple(have[k]) if isinstance(have.get(k), list) else have.get(k)
                differ(stage, old, v, "--encoder-space" if k == "space" else
                       f"{'--set' if stage == 'gan' else '--encoder-set'} {k}=")


@torch.no_grad()
def encode(E, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    """E's latents of images [N,1,R,R] in [-1,1] (batched) -> float32 numpy."""
    dev = next(E.parameters()).device
    return torch.cat([E(images[s:s + batch].to(dev)).cpu()
                      for s in range(0, len(images), batch)]).numpy()


def pair_images(n: int, resolution: int, seed: int = DIRECTION_SEED, scale: float = 1.3
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """n healthy phantoms I and their heart-enlarged copies I* (the paper's warp).

    Returns:
        (I, I*) as [n,1,R,R] in [-1,1].
    """
    from cxredit.data.phantom import render, sample_case
    from cxredit.latent.heart_warp import HeartBox, enlarge_heart

    I, Istar = [], []
    for i in range(n):  # subject seeds as in `phantom_plan`: disjoint from other stores' seeds
        subject, heart_scale = sample_case(seed * 1_000_000 + i, cardiomegaly=False)
        ph = render(subject, heart_scale, resolution)
        warped, _ = enlarge_heart(ph.image, HeartBox.from_mask(ph.masks[0]), scale=scale)
        I.append(ph.image)
        Istar.append(warped)
    to_t = lambda a: torch.from_numpy(np.stack(a)[:, None].astype(np.float32) * 2 - 1)  # noqa: E731
    return to_t(I), to_t(Istar)


def make_directions(encoder: str | Path, gan: str | Path, store: str | Path, out: Path,
                    lda_images: int = 2000, device: str | torch.device = "cpu") -> dict:
    """Fit "pair" (one pair, as in the paper), "pair16" and "lda" directions into `out`.

    With a W+ encoder the pair directions are W+ ([num_ws, w_dim]) and "lda" is a W direction
    fitted to the layer means.
    """
    from cxredit.checkpoint import checkpoint_sha256
    from cxredit.data.store import ImageStore
    from cxredit.latent.directions import lda_direction, pair_direction, save_direction, sigma_along
    from cxredit.latent.separability import as_features
    from cxredit.runs import find_checkpoint
    from cxredit.train.encoder import load_encoder

    E, _ = load_encoder(encoder, device)
    gan_ck = find_checkpoint(gan)
    gen = {"path": str(gan_ck), "sha256": checkpoint_sha256(gan_ck)}
    st = ImageStore(store)
    lab = st.meta["Cardiomegaly"].to_numpy(float)
    rows = np.flatnonzero(np.isin(lab, (0, 1)))[:lda_images]
    w = encode(E, st.tensor(rows))
    I, Istar = pair_images(16, E.resolution)
    wI, wS = encode(E, I), encode(E, Istar)
    vs = {"pair": (pair_direction(wI[:1], wS[:1]),
                   {"method": "pair", "inputs": {"phantom_seed": DIRECTION_SEED, "pairs": 1,
                                                 "warp_scale": 1.3}}),
          "pair16": (pair_direction(wI, wS),
                     {"method": "pair", "inputs": {"phantom_seed": DIRECTION_SEED, "pairs": 16,
                                                   "warp_scale": 1.3}}),
          # W+ latents: LDA of each image's mean over layers (as `separability` measures
          # them), a W direction applied to every layer; LDA of the flattened 10x larger W+
          # is dominated by noise directions at 2,000 images
          "lda": (lda_direction(as_features(w, "mean"), lab[rows].astype(int),
                                shrinkage="auto"),
                  {"method": "lda", "inputs": {"store": str(store), "images": int(len(rows)),
                                               "latent": "W+ mean over layers" if w.ndim == 3
                                               else "W"}})}
    paths = {}
    for name, (v, info) in vs.items():
        # sigma: std of the training latents along v, a natural unit for edit strengths
        sigma = sigma_along(w, v)
        paths[name] = save_direction(out / f"{name}.npz", v,
                                     {**info, "generator": gen, "latents_from": "encoder",
                                      "sigma": sigma})
    return {k: str(v) for k, v in paths.items()}


def make_weights(out: str | Path, work: str | Path, preset: str = "demo64",
                 gan_overrides: dict | None = None, device: str | None = None,
                 progress: bool = True, encoder_init: str | Path | None = None,
                 **lengths) -> Path:
    """Train (or continue) every stage of a phantom bundle and export it; see module doc.

    Args:
        out: bundle folder to write.
        work: folder for the training runs (store, gan, encoder, segmenter, classifier).
        preset: recipe and GAN preset ("demo64" or "tiny").
        gan_overrides: extra `GanConfig` fields for a new GAN run.
        device: torch device (None: cuda when available).
        progress: tqdm bars.
        encoder_init: a new encoder run starts from this encoder's weights (e.g. the one
            trained against an earlier checkpoint of the same GAN run, moved out of `work`).
        **lengths: override recipe entries (n_train, gan_kimg, encoder_kimg, segmenter_kimg,
            classifier_kimg, lda_images, encoder_space, encoder_overrides; encoder_train:
            `EncoderTrainConfig` fields of a new encoder run, e.g. {"real_ssim": 4.0}).

    Returns:
        Path of the bundle's `bundle.json`.
    """
    from cxredit.bundle import export_bundle
    from cxredit.config import encoder_train_preset
    from cxredit.config import preset as gan_preset
    from cxredit.data.prepare import make_phantom_store
    from cxredit.runs import Run
    from cxredit.train.classifier import ClassifierTrainConfig, train_classifier
    from cxredit.train.encoder import train_encoder
    from cxredit.train.gan import train_gan
    from cxredit.train.segmenter import SegmenterTrainConfig, train_segmenter

    if preset not in RECIPES:
        raise ValueError(f"unknown recipe {preset!r}; choose from {', '.join(RECIPES)}")
    unknown = set(lengths) - set(RECIPES[preset])
    if unknown:
        raise ValueError(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
    r = {**RECIPES[preset], **lengths}
    work, t0 = Path(work), time.time()
    if int(r["n_train"]) < 1:
        raise ValueError(f"--n-train must be at least 1, got {r['n_train']}")
    if "space" in r["encoder_train"]:
        raise ValueError("choose the encoder's space with --encoder-space, not --encoder-set")
    gcfg = gan_preset(preset).replace(**(gan_overrides or {}))
    ecfg = encoder_train_preset(preset).replace(space=r["encoder_space"], **r["encoder_train"])
    _check_work_matches(work, r, gan_overrides or {})  # before hours of training, not after
    store = work / "train_store"
    if not (store / "store.json").exists():
        make_phantom_store(store, r["n_train"], gcfg.resolution, 0.5, TRAIN_SEED,
                           progress=progress)
    timings = {}  # training wall time of each stage over all calls (from its stats.jsonl)

    def stage(name: str, fn, run: Path, cfg, kimg: float) -> None:
        resume = _resumable(run)
        log.info("make-weights: %s (%s kimg)%s", name, kimg, " - continuing" if resume else "")
        fn(run, None if resume else cfg.replace(kimg=kimg), resume, kimg if resume else None)
        timings[name] = round(Run(run, resume=True).train_seconds(), 1)

    gan = work / "gan"
    stage("generator", lambda run, cfg, res, k: train_gan(
        store, run, cfg, resume=res, device=device, progress=progress, kimg=k),
        gan, gcfg.replace(snap_kimg=min(gcfg.snap_kimg, r["gan_kimg"])), r["gan_kimg"])
    stage("encoder", lambda run, cfg, res, k: train_encoder(
        gan, store, run, cfg, resume=res, device=device, progress=progress, kimg=k,
        encoder_overrides=r["encoder_overrides"], init_from=encoder_init),
        work / "encoder", ecfg.replace(snap_kimg=min(ecfg.snap_kimg, r["encoder_kimg"])),
        r["encoder_kimg"])
    scfg = SegmenterTrainConfig()
    stage("segmenter", lambda run, cfg, res, k: train_segmenter(
        store, run, cfg, resume=res, device=device, progress=progress, kimg=k),
        work / "segmenter", scfg.replace(snap_kimg=min(scfg.snap_kimg, r["segmenter_kimg"])),
        r["segmenter_kimg"])
    ccfg = ClassifierTrainConfig()
    stage("classifier", lambda run, cfg, res, k: train_classifier(
        store, run, cfg, resume=res, device=device, progress=progress, kimg=k),
        work / "classifier", ccfg.replace(snap_kimg=min(ccfg.snap_kimg, r["classifier_kimg"])),
        r["classifier_kimg"])
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dirs = make_directions(work / "encoder", gan, store, work / "directions", r["lda_images"],
                           dev)
    recipe = {"preset": preset, "work": str(work), "gan_overrides": gan_overrides or {},
              "phantom_train_seed": TRAIN_SEED, "direction_seed": DIRECTION_SEED,
              "encoder_init": Run(work / "encoder", resume=True).read_config().get("init_from"),
              **r}
    manifest = export_bundle(out, gan, work / "encoder", work / "segmenter", work / "classifier",
                             dirs, info={"recipe": recipe, "seconds": timings})
    log.info("make-weights: %s in %.0f s (training, all calls: %s)", out, time.time() - t0,
             json.dumps(timings))
    return manifest
