"""Measuring and packaging commands: ctr, fid, export-bundle, make-weights, evaluate, report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxredit.cli._common import _add_image_source, _add_runtime, command


# --------------------------------------------------------------------------------- evaluation
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
    p.add_argument("--limit", type=int, default=None,
                   help="at most N images of --real (and of --store-b)")
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

    for opt, v in (("--n", args.n), ("--limit", args.limit)):
        if v is not None and v < 2:
            raise ValueError(f"{opt} must be at least 2 (FID needs two images a set), got {v}")
    real = ImageStore(args.real)
    other = None
    if args.gan:
        from cxredit.checkpoint import read_checkpoint_json
        from cxredit.runs import find_checkpoint

        ck = find_checkpoint(args.gan)
        other = (ck, int(read_checkpoint_json(ck)["state"]["G_config"]["img_resolution"]))
    elif args.store_b:
        other = (args.store_b, ImageStore(args.store_b).resolution)
    if other is not None and other[1] != real.resolution:
        raise ValueError(f"{other[0]} is {other[1]} px but --real {args.real} is "
                         f"{real.resolution} px: compare sets of one resolution")
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


# ------------------------------------------------------------------------ bundles, evaluation
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
    p.add_argument("--encoder-init", metavar="ENCODER", default=None,
                   help="a new encoder run starts from this encoder's weights (fine-tuning "
                        "after the GAN was trained further; a W encoder may start a W+ one)")
    p.add_argument("--encoder-space", choices=("w", "w+"), default=None,
                   help="latent space the encoder predicts (default: the recipe's, w)")
    p.add_argument("--encoder-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a training field of a new encoder run, e.g. "
                        "--encoder-set real_ssim=4 (repeatable; recorded in the recipe)")
    _add_runtime(p)


@command("make-weights", "train G, E, segmenter and classifier on phantoms into a bundle")(
    _add_make_weights)
def run_make_weights(args: argparse.Namespace) -> int:
    from cxredit.config import EncoderTrainConfig, parse_overrides
    from cxredit.make_weights import make_weights

    lengths = {k: v for k, v in (("gan_kimg", args.gan_kimg), ("encoder_kimg", args.encoder_kimg),
                                 ("segmenter_kimg", args.segmenter_kimg),
                                 ("classifier_kimg", args.classifier_kimg),
                                 ("n_train", args.n_train),
                                 ("encoder_space", args.encoder_space)) if v is not None}
    if args.encoder_set:
        lengths["encoder_train"] = parse_overrides(args.encoder_set, EncoderTrainConfig)
    mf = make_weights(args.out, args.work, args.preset, device=args.device,
                      progress=not args.no_progress, encoder_init=args.encoder_init, **lengths)
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
    p.add_argument("--project-space", choices=("w", "w+"), default="w",
                   help="projection latents: w (the paper's) or w+ (one w per layer)")
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
    from cxredit.latent.edit import parse_alphas

    alphas = tuple(parse_alphas(args.alphas))
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
                 metrics_name=name, project_space=args.project_space)
    for t in m["targets"]:
        val = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        status = {True: "met   ", False: "missed", None: "n/a   "}[t["met"]]
        print(f"{status} {t['name']}: {val} (target {t['target']})")
    for stage, why in m.get("skipped", {}).items():
        print(f"skipped {stage}: {why}")
    if args.report:
        from cxredit.report import write_report

        print(f"report: {write_report(out / name)}")
    print(f"metrics: {out / name}")
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

