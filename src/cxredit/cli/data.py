"""Commands that make and inspect stores: prepare, phantoms, info."""

from __future__ import annotations

import argparse
import json

from cxredit.cli._common import _add_runtime, command, log


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

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    views = None if args.views.strip().lower() == "all" else \
        tuple(v.strip().upper() for v in args.views.split(",") if v.strip())
    if views == ():
        raise ValueError(f"--views {args.views!r} names no view; give e.g. PA,AP, or 'all' to "
                         "keep every view")
    kw = {"labels_csv": args.labels_csv} if args.source == "folder" and args.labels_csv else {}
    df = index_source(args.source, args.root, **kw)
    n_all = len(df)
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

