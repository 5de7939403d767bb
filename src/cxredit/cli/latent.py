"""Latent-space commands: invert, project, separability, enlarge-heart, direction, edit."""

from __future__ import annotations

import argparse
import math

from cxredit.cli._common import _add_image_source, _add_runtime, command


# ---------------------------------------------------------------------------------- inversion
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
    quality = "" if not math.isfinite(res["ssim"]) else \
        f"; mean SSIM {res['ssim']:.3f}, PSNR {res['psnr']:.2f} dB"
    print(f"{res['out']}: {res['count']} latents{quality}")
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
    from cxredit.latent.edit import parse_alphas, run_edit

    alphas = parse_alphas(args.alphas)
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
    c, sel = doc["counts"], doc["query"]
    print(f"{sel['positive']} ({c['positive']}) vs {sel['negative']} ({c['negative']}): "
          f"separation {doc['separation']:.2f} in-sample, {doc['separation_cv']:.2f} "
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

