"""Command-line interface: `cxredit <command> [options]`.

Thin by design: each subcommand parses its options and calls the Python API. User errors
(bad paths, unreadable files, bad queries) end with one line on stderr and exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cxredit import __version__

log = logging.getLogger("cxredit")

# (name, one-line help, add_arguments, run) — filled by the @command registrations below.
_COMMANDS: list[tuple[str, str, Callable, Callable]] = []


def command(name: str, help: str):
    """Register `run(args) -> int` as a subcommand whose options are set by `add(parser)`."""

    def deco(add: Callable[[argparse.ArgumentParser], None]):
        def wrap(run: Callable[[argparse.Namespace], int]):
            _COMMANDS.append((name, help, add, run))
            return run

        return wrap

    return deco


def _add_runtime(p: argparse.ArgumentParser, device: bool = True, progress: bool = True) -> None:
    """Options every long-running command shares: --device and --no-progress."""
    if device:
        p.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")


# --------------------------------------------------------------------------------------- data
def _add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", choices=["chexpert", "mimic", "nih", "folder"],
                   help="dataset layout of --root")
    p.add_argument("--root", required=True,
                   help="dataset folder (CheXpert: the folder holding train.csv, or its parent)")
    p.add_argument("--out", required=True, help="store folder to write (resumable)")
    p.add_argument("--resolution", type=int, default=128, help="output side in pixels")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--limit", type=int, default=None,
                   help="keep only the first N images after filtering")
    p.add_argument("--views", default="PA,AP",
                   help="comma-separated views to keep ('all' keeps every view)")
    p.add_argument("--uncertain", choices=["keep", "zero", "one", "drop"], default="keep",
                   help="what to do with uncertain (-1) labels")
    p.add_argument("--query", default=None,
                   help="keep only rows matching a label query, e.g. \"Cardiomegaly==1\"")
    p.add_argument("--labels-csv", default=None,
                   help="folder source: CSV joined on file name (labels; optional "
                        "mask_heart/mask_right_lung/mask_left_lung mask files)")
    _add_runtime(p, device=False)


@command("prepare", "index a dataset (CheXpert, MIMIC-CXR-JPG, NIH, folder) and write a store")(
    _add_prepare)
def run_prepare(args: argparse.Namespace) -> int:
    from cxredit.data.prepare import prepare_store
    from cxredit.data.sources import apply_uncertain, filter_views, index_source, query

    kw = {"labels_csv": args.labels_csv} if args.source == "folder" and args.labels_csv else {}
    df = index_source(args.source, args.root, **kw)
    n_all = len(df)
    views = None if args.views.strip().lower() == "all" else \
        tuple(v.strip().upper() for v in args.views.split(",") if v.strip())
    if views:
        df = filter_views(df, views)
    df = apply_uncertain(df, args.uncertain)
    if args.query:
        df = query(df, args.query)
    log.info("indexed %d files, %d after filters", n_all, len(df))
    info = {"source": args.source, "root": str(args.root),
            "filters": {"views": list(views) if views else "all", "uncertain": args.uncertain,
                        "query": args.query, "limit": args.limit}}
    res = prepare_store(df.reset_index(drop=True), args.out, args.resolution, args.workers,
                        args.limit, info=info, progress=not args.no_progress)
    print(res.summary())
    return 0


def _add_phantoms(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="store folder to write")
    p.add_argument("--n", type=int, default=5000, help="number of images")
    p.add_argument("--resolution", type=int, default=128, help="output side in pixels")
    p.add_argument("--cardiomegaly-fraction", type=float, default=0.5,
                   help="share of cases with CTR > 0.5")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed; different seeds never share a subject")
    p.add_argument("--device-prob-healthy", type=float, default=0.05,
                   help="pacemaker probability in healthy cases (confounder)")
    p.add_argument("--device-prob-cardio", type=float, default=0.3,
                   help="pacemaker probability in cardiomegaly cases (confounder)")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    _add_runtime(p, device=False)


@command("phantoms", "render built-in phantom chest X-rays (with masks and CTR) into a store")(
    _add_phantoms)
def run_phantoms(args: argparse.Namespace) -> int:
    from cxredit.data.prepare import make_phantom_store

    for name in ("device_prob_healthy", "device_prob_cardio"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1]")
    res = make_phantom_store(args.out, args.n, args.resolution, args.cardiomegaly_fraction,
                             args.seed, args.workers,
                             (args.device_prob_healthy, args.device_prob_cardio),
                             progress=not args.no_progress)
    print(res.summary())
    return 0


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="store folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("info", "show a store's counts, resolution, split sizes and label table")(_add_info)
def run_info(args: argparse.Namespace) -> int:
    from cxredit.data.store import ImageStore

    s = ImageStore(args.store).summary()
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"store       {s['root']}")
    print(f"source      {s['source']}")
    print(f"images      {s['images']} at {s['resolution']}x{s['resolution']}"
          f"{' (+ masks)' if s['has_masks'] else ''}; {s['errors']} unreadable at preparation")
    print("splits      " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()))
    if s.get("views"):
        print("views       " + ", ".join(f"{k or '?'} {v}" for k, v in s["views"].items()))
    if s["labels"]:
        print(f"\n{'observation':<28}{'pos':>8}{'neg':>8}{'unc':>8}{'n/a':>8}")
        for name, c in s["labels"].items():
            print(f"{name:<28}{c['positive']:>8}{c['negative']:>8}{c['uncertain']:>8}"
                  f"{c['missing']:>8}")
    return 0


# ---------------------------------------------------------------------------------------- GAN
def _add_train_gan(p: argparse.ArgumentParser) -> None:
    from cxredit.config import PRESET_NOTES

    p.add_argument("--data", required=True, help="store folder (its 'train' split is used)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--preset", default="paper128", choices=list(PRESET_NOTES),
                   help="; ".join(f"{k}: {v}" for k, v in PRESET_NOTES.items()))
    p.add_argument("--kimg", type=float, help="training length in thousands of real images")
    p.add_argument("--batch", type=int, help="global batch size (split over ranks)")
    p.add_argument("--snap-kimg", type=float, help="checkpoint + sample grid interval (kimg)")
    p.add_argument("--gamma", type=float, help="R1 weight")
    p.add_argument("--aug", choices=["ada", "fixed", "none"], help="augmentation mode")
    p.add_argument("--aug-p", type=float, help="initial (ada) or fixed augmentation probability")
    p.add_argument("--no-aug", action="store_true", help="disable augmentation (= --aug none)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="autocast precision")
    p.add_argument("--seed", type=int, help="seed of every RNG of the run")
    p.add_argument("--keep-checkpoints", type=int, help="newest checkpoints to keep")
    p.add_argument("--keep-every-kimg", type=float,
                   help="also keep checkpoints at multiples of this many kimg, forever")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set channel_base=4096 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly from its newest checkpoint")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D")
    _add_runtime(p)


def gan_config_from_args(args: argparse.Namespace):
    """Preset + dedicated options + --set overrides -> GanConfig."""
    from cxredit.config import parse_overrides, preset

    cfg = preset(args.preset)
    changes = {}
    for name in ("kimg", "batch", "snap_kimg", "gamma", "aug", "aug_p", "precision", "seed",
                 "keep_checkpoints", "keep_every_kimg"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if args.no_aug:
        changes["aug"] = "none"
    if changes.get("aug") == "fixed" and "aug_p" not in changes:
        raise ValueError("--aug fixed needs --aug-p")
    changes.update(parse_overrides(args.set))
    return cfg.replace(**changes)


@command("train-gan", "train a StyleGAN2 generator on a store (resumable, torchrun-aware)")(
    _add_train_gan)
def run_train_gan(args: argparse.Namespace) -> int:
    from cxredit.train.gan import train_gan

    cfg = None if args.resume else gan_config_from_args(args)
    rec = train_gan(args.data, args.out, cfg, resume=args.resume, device=args.device,
                    compile=args.compile, progress=not args.no_progress, kimg=args.kimg)
    if rec:
        print(f"{args.out}: {rec['kimg']} kimg, loss G {rec.get('loss/G', float('nan')):.3f}, "
              f"loss D {rec.get('loss/D', float('nan')):.3f}")
    return 0


def _parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:
            a, b = part.split("-", 1)
            seeds.extend(range(int(a), int(b) + 1))
        elif part:
            seeds.append(int(part))
    if not seeds:
        raise ValueError(f"--seeds: no seeds in {text!r}")
    return seeds


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="GAN run folder or checkpoint")
    p.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-63 or 1,5,9")
    p.add_argument("--trunc", type=float, default=1.0, help="truncation psi (1 = none)")
    p.add_argument("--noise-mode", default="const", choices=["const", "random", "none"],
                   help="per-layer noise")
    p.add_argument("--out", default="generated", help="output folder")
    p.add_argument("--interpolate", type=int, default=0, metavar="STEPS",
                   help="also write a latent walk strip through the seeds with STEPS frames "
                        "between consecutive seeds")
    _add_runtime(p, progress=False)


@command("generate", "sample images from a trained generator (grid, singles, latent walks)")(
    _add_generate)
def run_generate(args: argparse.Namespace) -> int:
    from cxredit.generate import generate

    res = generate(args.ckpt, _parse_seeds(args.seeds), args.out, psi=args.trunc,
                   noise_mode=args.noise_mode, interpolate=args.interpolate, device=args.device)
    print(f"wrote {res['count']} images and {res['grid']}"
          + (f" and {res['walk']}" if res.get("walk") else ""))
    return 0


# ------------------------------------------------------------------------------------ encoder
def _add_train_encoder(p: argparse.ArgumentParser) -> None:
    from cxredit.config import ENCODER_TRAIN_PRESETS

    p.add_argument("--gan", required=True, help="GAN run folder or checkpoint (G_ema is used)")
    p.add_argument("--data", required=True, help="store of real images (its 'train' split)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--preset", default="paper128", choices=list(ENCODER_TRAIN_PRESETS),
                   help="training preset (the encoder's size follows the generator)")
    p.add_argument("--space", choices=["w", "w+"], help="latent space E predicts")
    p.add_argument("--kimg", type=float, help="training length in thousands of images")
    p.add_argument("--batch", type=int, help="images per cycle")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--snap-kimg", type=float, help="checkpoint + reconstruction grid interval")
    p.add_argument("--seed", type=int, help="seed of every RNG of the run")
    p.add_argument("--trunk", choices=["resnet101", "resnet50", "resnet34", "resnet18", "tiny"],
                   help="ResNet trunk of E (default: by resolution; resnet101 at 128 px)")
    p.add_argument("--pretrained", default=None,
                   help="local torchvision ImageNet weights for the trunk (.pth/.safetensors)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any training field, e.g. --set e_content=0.5 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    _add_runtime(p)


@command("train-encoder", "train the CRG encoder E that inverts a frozen generator")(
    _add_train_encoder)
def run_train_encoder(args: argparse.Namespace) -> int:
    from cxredit.config import EncoderTrainConfig, encoder_train_preset, parse_overrides
    from cxredit.train.encoder import train_encoder

    cfg, overrides = None, {}
    if not args.resume:
        cfg = encoder_train_preset(args.preset)
        changes = {k: getattr(args, k) for k in ("space", "kimg", "batch", "lr", "snap_kimg",
                                                  "seed") if getattr(args, k) is not None}
        changes.update(parse_overrides(args.set, EncoderTrainConfig))
        cfg = cfg.replace(**changes)
        if args.trunk:
            overrides["trunk"] = args.trunk
        if args.pretrained:
            overrides["pretrained_path"] = args.pretrained
    rec = train_encoder(args.gan, args.data, args.out, cfg, resume=args.resume,
                        device=args.device, encoder_overrides=overrides,
                        progress=not args.no_progress, kimg=args.kimg)
    if rec:
        print(f"{args.out}: {rec['kimg']} kimg, synthetic SSIM {rec.get('syn/ssim', 0):.3f}, "
              f"real SSIM {rec.get('real/ssim', float('nan')):.3f}")
    return 0


def _add_image_source(p: argparse.ArgumentParser) -> None:
    """--images FILES... | --store STORE [--split] [--query]: what invert/project read."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files (PNG/JPEG/DICOM)")
    src.add_argument("--store", help="store folder")
    p.add_argument("--split", choices=["train", "val", "test"], help="store split")
    p.add_argument("--query", help="store label query, e.g. \"Cardiomegaly==1\"")


def _add_invert(p: argparse.ArgumentParser) -> None:
    _add_image_source(p)
    p.add_argument("--encoder", required=True, help="encoder run folder or checkpoint")
    p.add_argument("--out", required=True, help="latents .npz (a .json sidecar is written)")
    p.add_argument("--gan", help="generator for reconstructions (default: E's own)")
    p.add_argument("--batch", type=int, default=32, help="images per forward pass")
    p.add_argument("--recon-dir", help="also write reconstructions (PNG, marked synthetic)")
    p.add_argument("--no-metrics", action="store_true",
                   help="skip per-image SSIM/PSNR (then no generator is needed)")
    _add_runtime(p)


@command("invert", "encode images into latents with a trained encoder (fast inversion)")(
    _add_invert)
def run_invert(args: argparse.Namespace) -> int:
    from cxredit.latent.invert import invert

    res = invert(args.encoder, args.out, images=args.images, store=args.store, split=args.split,
                 query=args.query, gan=args.gan, batch=args.batch, recon_dir=args.recon_dir,
                 metrics=not args.no_metrics, device=args.device,
                 progress=not args.no_progress)
    print(f"{res['out']}: {res['count']} latents; mean SSIM {res['ssim']:.3f}, "
          f"PSNR {res['psnr']:.2f} dB")
    return 0


# ------------------------------------------------------------------------------------- latent
def _add_enlarge_heart(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="X-ray file (PNG/JPEG/DICOM)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--mask", help="heart mask image (non-zero = heart), same size")
    where.add_argument("--heart-box", help="heart bounding box x0,y0,x1,y1 in pixels")
    p.add_argument("--scale", type=float, default=1.25, help="heart width ratio after/before")
    p.add_argument("--left-share", type=float, default=2 / 3,
                   help="share of the widening on the patient's left (image right) border")
    p.add_argument("--out", required=True, help="output PNG (marked as a synthetic edit)")


@command("enlarge-heart", "make I*: widen the heart of an X-ray with a smooth invertible warp")(
    _add_enlarge_heart)
def run_enlarge_heart(args: argparse.Namespace) -> int:
    from cxredit import __version__
    from cxredit.data.io import read_xray, write_png
    from cxredit.latent.heart_warp import HeartBox, enlarge_heart

    img = read_xray(args.image)
    if args.mask:
        mask = read_xray(args.mask) > 0
        if mask.shape != img.shape:
            raise ValueError(f"{args.mask}: mask is {mask.shape[1]}x{mask.shape[0]}, image is "
                             f"{img.shape[1]}x{img.shape[0]}")
        box = HeartBox.from_mask(mask)
    else:
        box = HeartBox.parse(args.heart_box)
    out, _ = enlarge_heart(img, box, args.scale, args.left_share)
    write_png(args.out, out, provenance={
        "Software": f"cxredit {__version__}", "cxredit:synthetic": "true",
        "cxredit:edit": "heart-warp", "cxredit:source-id": str(args.image),
        "cxredit:scale": f"{args.scale:g}",
        "Description": "SYNTHETIC EDIT made by cxredit (heart enlarged by a warp); not a real "
                       "radiograph, not for diagnosis"})
    print(f"wrote {args.out} (heart width x{args.scale:g})")
    return 0


def _add_edit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gan", required=True, help="GAN run folder or checkpoint")
    p.add_argument("--latents", required=True, help="latents .npz (from invert or project)")
    p.add_argument("--direction", required=True, help="direction .npz")
    p.add_argument("--alphas", default="-2,0,2,4,6", help="comma-separated edit strengths")
    p.add_argument("--layers", default=None, help="restrict to W+ layers, e.g. 0-5 (default all)")
    p.add_argument("--limit", type=int, default=None, help="edit only the first N latents")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dicom", action="store_true", help="also write DICOM (marked DERIVED)")
    _add_runtime(p, progress=False)


@command("edit", "edit latents along a direction (w + alpha*v) and write images + sweep grid")(
    _add_edit)
def run_edit_cmd(args: argparse.Namespace) -> int:
    from cxredit.latent.edit import run_edit

    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"--alphas must be numbers, got {args.alphas!r}") from None
    res = run_edit(args.gan, args.latents, args.direction, alphas, args.out, args.layers,
                   args.limit, args.dicom, args.device)
    print(f"edited {res['count']} images x {len(alphas)} alphas -> {args.out} "
          f"(sweep: {res['sweep']})")
    return 0


def _add_project(p: argparse.ArgumentParser) -> None:
    _add_image_source(p)
    p.add_argument("--gan", required=True, help="GAN run folder or checkpoint")
    p.add_argument("--out", required=True, help="latents .npz (resumable: re-run to continue)")
    p.add_argument("--limit", type=int, help="project only the first N selected images")
    p.add_argument("--space", choices=["w", "w+"], default="w", help="latent space")
    p.add_argument("--init", choices=["mean", "encoder"], default="mean",
                   help="start from the mean w or from the encoder's guess")
    p.add_argument("--encoder", help="encoder run/checkpoint for --init encoder")
    p.add_argument("--steps", type=int, default=500, help="optimisation steps per image")
    p.add_argument("--batch", type=int, default=16, help="images optimised together")
    p.add_argument("--lr", type=float, default=0.1, help="peak Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent noise")
    p.add_argument("--recon-dir", help="also write reconstructions (PNG, marked synthetic)")
    p.add_argument("--lpips-weights", metavar="LIN,VGG16",
                   help="add LPIPS to the loss, from local files: the lpips package's vgg.pth "
                        "and torchvision's VGG-16 ImageNet weights, comma-separated")
    _add_runtime(p)


@command("project", "invert images by optimising w so that G(w) matches them (resumable)")(
    _add_project)
def run_project_cmd(args: argparse.Namespace) -> int:
    from cxredit.latent.project import project

    res = project(args.gan, args.out, images=args.images, store=args.store, split=args.split,
                  query=args.query, limit=args.limit, space=args.space, init=args.init,
                  encoder=args.encoder, steps=args.steps, batch=args.batch, lr=args.lr,
                  seed=args.seed, recon_dir=args.recon_dir, lpips_weights=args.lpips_weights,
                  device=args.device, progress=not args.no_progress)
    print(f"{res['out']}: {res['count']} latents ({res['projected']} projected now"
          f"{', resumed' if res['resumed'] else ''}); mean SSIM {res['ssim']:.3f}, "
          f"PSNR {res['psnr']:.2f} dB")
    return 0


def _add_separability(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latents", required=True, help="latents .npz (ids = store rows or paths)")
    p.add_argument("--meta", required=True, help="store folder or its meta.csv (labels)")
    p.add_argument("--column", default="Cardiomegaly", help="label column of the positives")
    p.add_argument("--positive", default="1", help="value of --column for the positive class")
    p.add_argument("--negative-query", default=None,
                   help="query for the negatives, e.g. \"No Finding==1\" (default: column==0)")
    p.add_argument("--where", default=None, help="extra filter for both classes, e.g. "
                                                 "\"view=='PA'\"")
    p.add_argument("--flatten", choices=["mean", "flatten"], default="mean",
                   help="W+ latents: average the ws or concatenate them")
    p.add_argument("--shrinkage", default="none",
                   help="LDA covariance shrinkage: none (the paper), auto (Ledoit-Wolf) or 0..1")
    p.add_argument("--folds", type=int, default=5, help="folds of the cross-validated numbers")
    p.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    p.add_argument("--out", default=None, help="output folder (json, png, projections.csv)")


def _value(text: str):
    try:
        return float(text)
    except ValueError:
        return text


@command("separability", "LDA class separation of latents (in-sample and cross-validated)")(
    _add_separability)
def run_separability_cmd(args: argparse.Namespace) -> int:
    from cxredit.latent.separability import run_separability

    doc = run_separability(args.latents, args.meta, args.column, _value(args.positive),
                           args.negative_query, args.where, args.flatten, args.shrinkage,
                           args.folds, args.seed, args.out)
    c = doc["counts"]
    print(f"{c}: separation {doc['separation']:.2f} in-sample, {doc['separation_cv']:.2f} "
          f"cross-validated; AUC {doc['auc']:.3f}, balanced accuracy "
          f"{doc['balanced_accuracy']:.3f} (held out)")
    return 0


def _add_direction(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["fit", "compare"], default="fit",
                   help="fit a direction (default) or compare direction files")
    p.add_argument("files", nargs="*", help="compare: direction .npz files")
    p.add_argument("--method", choices=["pair", "lda", "svm", "mean", "conditional"],
                   default="lda", help="how the direction is found")
    p.add_argument("--primary", choices=["lda", "svm", "mean"], default="lda",
                   help="conditional: the primary method whose direction is conditioned")
    p.add_argument("--condition", action="append", default=[],
                   help="meta column to project out (repeatable), e.g. sex, 'Support Devices'")
    p.add_argument("--latents", help="latents .npz with labels in --meta")
    p.add_argument("--meta", help="store folder or meta.csv matching --latents")
    p.add_argument("--pairs", nargs=2, metavar=("LATENTS_I", "LATENTS_ISTAR"),
                   help="pair: latents of I and of I* (matched by id or position)")
    p.add_argument("--image-pairs", nargs="+", metavar="IMAGE",
                   help="pair: images I1 I1* [I2 I2* ...] (I* e.g. from enlarge-heart); their "
                        "latents are made with --latents-from and kept next to --out")
    p.add_argument("--latents-from", choices=["encoder", "project"], default="encoder",
                   help="pair with --image-pairs: encoder inversion or projection")
    p.add_argument("--encoder", help="encoder run (--latents-from encoder, or projection init)")
    p.add_argument("--gan", help="GAN run (--latents-from project)")
    p.add_argument("--steps", type=int, default=500, help="projection steps per image")
    _add_runtime(p, progress=False)
    p.add_argument("--column", default="Cardiomegaly", help="label column of the positives")
    p.add_argument("--positive", default="1", help="value of --column for the positives")
    p.add_argument("--negative-query", default=None, help="query for the negatives")
    p.add_argument("--where", default=None, help="extra filter for both classes")
    p.add_argument("--shrinkage", default="none", help="LDA shrinkage: none, auto or 0..1")
    p.add_argument("--C", type=float, default=1.0, help="SVM regularisation")
    p.add_argument("--out", default="direction.npz", help="direction .npz (+ .json sidecar)")


@command("direction", "find a disease direction (pair, lda, svm, mean, conditional) or compare")(
    _add_direction)
def run_direction_cmd(args: argparse.Namespace) -> int:
    from cxredit.latent.directions import format_compare, make_direction

    if args.action == "compare":
        if len(args.files) < 2:
            raise ValueError("compare needs at least two direction files")
        print(format_compare(args.files))
        return 0
    method = args.primary if args.method == "conditional" else args.method
    if args.method == "conditional" and not args.condition:
        raise ValueError("--method conditional needs at least one --condition COLUMN")
    pairs = args.pairs
    if args.image_pairs:
        from pathlib import Path

        from cxredit.latent.directions import pair_latents_from_images

        if args.method != "pair":
            raise ValueError("--image-pairs goes with --method pair")
        out = Path(args.out)
        pairs = pair_latents_from_images(args.image_pairs, args.latents_from,
                                         out.with_name(out.stem + "_pairs"), args.encoder,
                                         args.gan, args.steps, device=args.device)
    res = make_direction(method, args.latents, args.meta, args.column, _value(args.positive),
                         args.negative_query, args.where, args.condition or None, None,
                         pairs, args.shrinkage, args.C, args.out)
    extra = f", separation {res['separation']:.2f}" if res.get("separation") is not None else ""
    print(f"{res['out']}: {res['method']} direction in {res['space']}{extra}")
    return 0


# --------------------------------------------------------------------------------- evaluation
def _add_train_segmenter(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="store with masks.npy (phantoms, or a folder store with mask columns)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--kimg", type=float, help="training length in thousands of images")
    p.add_argument("--batch", type=int, help="images per step")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--seed", type=int, help="seed of every RNG of the run")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    _add_runtime(p)


@command("train-segmenter", "train the heart + lung segmenter used to measure the CTR")(
    _add_train_segmenter)
def run_train_segmenter(args: argparse.Namespace) -> int:
    from cxredit.train.segmenter import SegmenterTrainConfig, train_segmenter

    cfg = None
    if not args.resume:
        changes = {k: getattr(args, k) for k in ("batch", "lr", "seed")
                   if getattr(args, k) is not None}
        cfg = SegmenterTrainConfig().replace(**changes)
    rec = train_segmenter(args.data, args.out, cfg, resume=args.resume, device=args.device,
                          progress=not args.no_progress, kimg=args.kimg)
    if rec:
        print(f"{args.out}: {rec['kimg']} kimg, loss {rec.get('loss/seg', float('nan')):.4f}")
    return 0


def _add_train_classifier(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="store whose meta.csv has the --label column")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--label", default="Cardiomegaly",
                   help="label column: 1 = positive, 0 = negative, other values are dropped")
    p.add_argument("--negative-query", default=None,
                   help="negatives = rows matching this query instead of label==0, e.g. "
                        "\"`No Finding`==1\"")
    p.add_argument("--arch", choices=["cnn", "resnet18"],
                   help="network: small GroupNorm CNN (default) or ResNet-18 for real data")
    p.add_argument("--kimg", type=float, help="training length in thousands of images")
    p.add_argument("--batch", type=int, help="images per step")
    p.add_argument("--lr", type=float, help="AdamW learning rate")
    p.add_argument("--seed", type=int, help="seed of every RNG of the run")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    _add_runtime(p)


@command("train-classifier", "train the cardiomegaly classifier (edit judge, feature extractor)")(
    _add_train_classifier)
def run_train_classifier(args: argparse.Namespace) -> int:
    from cxredit.train.classifier import ClassifierTrainConfig, train_classifier

    cfg = None
    if not args.resume:
        changes = {k: getattr(args, k) for k in ("batch", "lr", "seed", "arch")
                   if getattr(args, k) is not None}
        cfg = ClassifierTrainConfig(label=args.label, negative_query=args.negative_query,
                                    **changes)
    rec = train_classifier(args.data, args.out, cfg, resume=args.resume, device=args.device,
                           progress=not args.no_progress, kimg=args.kimg)
    if rec:
        nan = float("nan")
        print(f"{args.out}: {rec.get('kimg', 0)} kimg, loss {rec.get('loss/bce', nan):.4f}, "
              f"val AUC {rec.get('eval/auc', nan):.3f}, accuracy {rec.get('eval/acc', nan):.3f}")
    return 0


def _add_ctr(p: argparse.ArgumentParser) -> None:
    _add_image_source(p)
    p.add_argument("--segmenter", required=True, help="segmenter run folder or checkpoint")
    p.add_argument("--out", default=None, help="CSV with id, ctr, mrd, mld, id_width")
    p.add_argument("--overlay-dir", default=None, help="write images with the masks drawn")
    _add_runtime(p, progress=False)


@command("ctr", "measure the cardiothoracic ratio of X-rays with the segmenter")(_add_ctr)
def run_ctr_cmd(args: argparse.Namespace) -> int:
    from cxredit.metrics.ctr import measure_ctr

    rows = measure_ctr(args.segmenter, images=args.images, store=args.store, split=args.split,
                       query=args.query, out=args.out, overlay_dir=args.overlay_dir,
                       device=args.device)
    for r in rows[:20]:
        print(f"{r['id']}\tCTR {r['ctr']:.3f}")
    if len(rows) > 20:
        print(f"... {len(rows)} images" + (f", all in {args.out}" if args.out else ""))
    return 0


def _add_fid(p: argparse.ArgumentParser) -> None:
    p.add_argument("--real", required=True, help="store of real images")
    p.add_argument("--split", choices=["train", "val", "test"], help="split of --real")
    p.add_argument("--limit", type=int, default=None, help="at most N real images")
    fake = p.add_mutually_exclusive_group(required=True)
    fake.add_argument("--gan", help="generator run/checkpoint to sample from")
    fake.add_argument("--folder", help="folder of PNG/JPEG images")
    fake.add_argument("--store-b", help="a second store")
    p.add_argument("--n", type=int, default=5000, help="samples drawn from --gan")
    p.add_argument("--psi", type=float, default=1.0, help="truncation of the --gan samples")
    p.add_argument("--extractor", default="inception",
                   choices=["inception", "encoder", "random", "classifier"],
                   help="feature extractor; numbers are only comparable within one extractor")
    p.add_argument("--inception-weights", help="local torchvision Inception-v3 weights file")
    p.add_argument("--encoder", help="encoder run (extractor 'encoder')")
    p.add_argument("--classifier", help="classifier run (extractor 'classifier')")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size")
    p.add_argument("--out", default=None, help="write the numbers as JSON")
    _add_runtime(p, progress=False)


@command("fid", "FID and KID between real images and a generator, folder or store")(_add_fid)
def run_fid_cmd(args: argparse.Namespace) -> int:
    import torch

    from cxredit.data.store import ImageStore
    from cxredit.metrics.features import get_extractor
    from cxredit.metrics.fid import compare_sets, folder_batches, generator_batches, store_batches

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kw = {"device": dev}
    if args.extractor == "inception":
        kw["weights"] = args.inception_weights
    elif args.extractor == "encoder":
        kw["encoder"] = args.encoder
    elif args.extractor == "classifier":
        kw["classifier"] = args.classifier
    elif args.extractor == "random":
        kw = {}
    ext = get_extractor(args.extractor, **kw)
    real = ImageStore(args.real)
    a = store_batches(real, split=args.split, limit=args.limit)
    if args.gan:
        b = generator_batches(args.gan, args.n, psi=args.psi, device=dev)
    elif args.folder:
        b = folder_batches(args.folder, real.resolution)
    else:
        b = store_batches(args.store_b, limit=args.limit)
    res = compare_sets(a, b, ext, kid_subset_size=args.kid_subset_size)
    print(f"FID {res['fid']:.3f}, KID {res['kid_mean']:.5f} +- {res['kid_std']:.5f} "
          f"({res['extractor']} features, {res['n_a']} vs {res['n_b']} images)")
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps({**res, "real": args.real, "gan": args.gan,
                                              "folder": args.folder}, indent=2))
    return 0


# ------------------------------------------------------------------------------------- report
def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run folder holding metrics.json (from evaluate or demo)")
    p.add_argument("--out", default=None,
                   help="HTML file to write (default: RUN_DIR/report.html)")


@command("report", "write a self-contained HTML report (report.html) of an evaluation run")(
    _add_report)
def run_report_cmd(args: argparse.Namespace) -> int:
    from cxredit.report import write_report

    print(write_report(args.run_dir, args.out))
    return 0


# -------------------------------------------------------------------------------------- serve
def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="weights/demo", help="weights bundle folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (the default keeps the page on this machine)")
    p.add_argument("--port", type=int, default=7860, help="TCP port")
    p.add_argument("--max-upload-mb", type=float, default=20.0,
                   help="largest upload accepted (bigger ones get HTTP 413)")
    p.add_argument("--max-alpha", type=float, default=10.0,
                   help="largest |alpha| of an edit (beyond it HTTP 422)")
    p.add_argument("--max-project-steps", type=int, default=500,
                   help="largest number of projection steps per refine request")
    _add_runtime(p, progress=False)


@command("serve", "serve the interactive editing page (and its JSON API) on this machine")(
    _add_serve)
def run_serve_cmd(args: argparse.Namespace) -> int:
    from cxredit.web import WEB_EXTRA_MISSING, web_available

    if not web_available():
        print(f"cxredit serve: error: {WEB_EXTRA_MISSING}", file=sys.stderr)
        return 2
    from cxredit.web.app import serve

    serve(args.weights, args.host, args.port, args.device, max_upload_mb=args.max_upload_mb,
          max_alpha=args.max_alpha, max_project_steps=args.max_project_steps)
    return 0


# --------------------------------------------------------------------------------------- demo

# ----------------------------------------------------------------------- bundles, evaluation
def _add_export_bundle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--gan", required=True, help="GAN run folder or checkpoint (G_ema is kept)")
    p.add_argument("--encoder", help="encoder run/checkpoint trained against --gan")
    p.add_argument("--segmenter", help="segmenter run/checkpoint")
    p.add_argument("--classifier", help="classifier run/checkpoint")
    p.add_argument("--direction", action="append", default=[], metavar="NAME=FILE",
                   help="direction .npz made with --gan's generator (repeatable)")
    p.add_argument("--fp32", action="store_true", help="keep every tensor in fp32")


@command("export-bundle", "collect trained models and directions into one weights bundle")(
    _add_export_bundle)
def run_export_bundle(args: argparse.Namespace) -> int:
    from cxredit.bundle import export_bundle

    dirs = {}
    for item in args.direction:
        if "=" not in item:
            raise ValueError(f"--direction expects NAME=FILE, got {item!r}")
        name, path = item.split("=", 1)
        dirs[name.strip()] = path
    mf = export_bundle(args.out, args.gan, args.encoder, args.segmenter, args.classifier, dirs,
                       half=not args.fp32)
    doc = json.loads(mf.read_text())
    parts = ", ".join(f"{k} ({v['dtype']})" for k, v in doc["components"].items())
    print(f"{args.out}: {parts}; directions: {', '.join(doc['directions']) or 'none'}; "
          f"{doc['total_bytes'] / 1e6:.1f} MB")
    return 0


def _add_make_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="weights/demo", help="bundle folder to write")
    p.add_argument("--work", default="runs/weights", help="folder of the training runs")
    p.add_argument("--preset", default="demo64", choices=["demo64", "tiny"],
                   help="recipe (and GAN preset)")
    for name in ("gan", "encoder", "segmenter", "classifier"):
        p.add_argument(f"--{name}-kimg", type=float, default=None,
                       help=f"training length of the {name} (kimg; default: the recipe's)")
    p.add_argument("--n-train", type=int, default=None, help="phantoms in the training store")
    _add_runtime(p)


@command("make-weights", "train G, E, segmenter and classifier on phantoms into a bundle")(
    _add_make_weights)
def run_make_weights(args: argparse.Namespace) -> int:
    from cxredit.make_weights import make_weights

    lengths = {k: v for k, v in (("gan_kimg", args.gan_kimg), ("encoder_kimg", args.encoder_kimg),
                                 ("segmenter_kimg", args.segmenter_kimg),
                                 ("classifier_kimg", args.classifier_kimg),
                                 ("n_train", args.n_train)) if v is not None}
    mf = make_weights(args.out, args.work, args.preset, device=args.device,
                      progress=not args.no_progress, **lengths)
    print(f"wrote {mf}")
    return 0


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--weights", help="bundle folder (G, E, segmenter, ... and directions)")
    models.add_argument("--gan", help="GAN run or checkpoint (instead of --weights)")
    p.add_argument("--encoder", help="with --gan: encoder run/checkpoint")
    p.add_argument("--segmenter", help="with --gan: segmenter run/checkpoint (CTR of edits)")
    p.add_argument("--classifier", help="with --gan: classifier run/checkpoint")
    p.add_argument("--direction", default=None,
                   help="direction to edit along: a bundle direction name or a .npz file "
                        "(default: the bundle's 'pair')")
    p.add_argument("--data", required=True, help="store with a Cardiomegaly column")
    p.add_argument("--split", choices=["train", "val", "test"], help="rows of --data to use")
    p.add_argument("--query", help="pandas query on the store's metadata")
    p.add_argument("--limit", type=int, default=None, help="at most N images")
    p.add_argument("--out", required=True,
                   help="folder for metrics.json and figures (or a path ending in .json)")
    p.add_argument("--n-fid", type=int, default=1000, help="images per set for FID/KID (0: skip)")
    p.add_argument("--n-project", type=int, default=32,
                   help="images per class refined by optimisation (0: skip)")
    p.add_argument("--project-steps", type=int, default=100, help="optimisation steps")
    p.add_argument("--n-edit", type=int, default=16, help="healthy images to edit")
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in (0, 1, 2, 3, 4, 5, 6)),
                   help="edit strengths in units of the latents' std along the direction")
    p.add_argument("--report", action="store_true", help="also write report.html")
    _add_runtime(p)


@command("evaluate", "measure generation, reconstruction, separability and edits of a bundle")(
    _add_evaluate)
def run_evaluate(args: argparse.Namespace) -> int:
    from cxredit.bundle import assemble_bundle
    from cxredit.evaluate import evaluate
    from cxredit.latent.directions import load_direction

    try:
        alphas = tuple(float(a) for a in args.alphas.split(",") if a.strip())
    except ValueError:
        raise ValueError(f"--alphas: expected comma-separated numbers, got {args.alphas!r}") \
            from None
    extra, direction = {}, args.direction
    if direction and direction.endswith(".npz"):
        v, info = load_direction(direction)
        direction = Path(direction).stem
        extra[direction] = (v, {**info, "file": args.direction})
    if args.weights:
        extras = [o for o in ("encoder", "segmenter", "classifier") if getattr(args, o)]
        if extras:
            raise ValueError(f"--{extras[0]} goes with --gan; a bundle brings its own models")
        weights = args.weights
    else:
        weights = assemble_bundle(args.gan, args.encoder, args.segmenter, args.classifier,
                                  device=args.device or "cpu")
    out, name = Path(args.out), "metrics.json"
    if out.suffix == ".json":
        out, name = out.parent, out.name
    m = evaluate(out, args.data, weights, args.split, args.query, args.limit, args.n_fid,
                 args.n_project, args.project_steps, args.n_edit, direction, alphas,
                 args.device, progress=not args.no_progress, extra_directions=extra,
                 metrics_name=name)
    for t in m["targets"]:
        val = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        print(f"{'met   ' if t['met'] else 'missed'} {t['name']}: {val} (target {t['target']})")
    for stage, why in m.get("skipped", {}).items():
        print(f"skipped {stage}: {why}")
    if args.report:
        from cxredit.report import write_report

        print(f"report: {write_report(out / name)}")
    print(f"metrics: {out / name}")
    return 0


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (re-runs reuse it)")
    p.add_argument("--weights", default="weights/demo", help="weights bundle folder")
    p.add_argument("--n-healthy", type=int, default=100, help="healthy test phantoms")
    p.add_argument("--n-cardio", type=int, default=250, help="cardiomegaly test phantoms")
    p.add_argument("--n-project", type=int, default=32,
                   help="images per class refined by optimisation")
    p.add_argument("--project-steps", type=int, default=100, help="optimisation steps")
    p.add_argument("--n-edit", type=int, default=16, help="healthy images edited")
    _add_runtime(p)


@command("demo", "run the paper's experiment on built-in phantoms with the shipped weights")(
    _add_demo)
def run_demo_cmd(args: argparse.Namespace) -> int:
    from cxredit.demo import print_summary, run_demo

    m = run_demo(args.out, args.weights, args.n_healthy, args.n_cardio, args.n_project,
                 args.project_steps, args.n_edit, args.device, progress=not args.no_progress)
    print_summary(m, Path(args.out))
    return 0


# ------------------------------------------------------------------------------------- parser
# `cxredit --help` lists the commands in the order of the pipeline (DESIGN.md).
PIPELINE_ORDER = ("prepare", "phantoms", "info", "train-gan", "generate", "train-encoder",
                  "invert", "project", "separability", "enlarge-heart", "direction", "edit",
                  "train-segmenter", "train-classifier", "ctr", "fid", "export-bundle",
                  "make-weights", "evaluate", "report", "serve", "demo")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (one subparser per registered command)."""
    parser = argparse.ArgumentParser(
        prog="cxredit",
        description="Disease-aware editing of chest X-rays with StyleGAN2.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cxredit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    order = {name: i for i, name in enumerate(PIPELINE_ORDER)}
    for name, help_, add, run in sorted(_COMMANDS, key=lambda c: order.get(c[0], len(order))):
        p = sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cxredit` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version or a usage error: report the status, in-process
        return int(e.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        # User errors: one line, no traceback (XrayReadError and StoreError are ValueErrors).
        if args.verbose:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"cxredit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cxredit: interrupted (finished work is kept; re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
