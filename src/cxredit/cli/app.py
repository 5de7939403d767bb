"""Commands that face a person: serve (the editing page) and demo (the paper's experiment)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxredit.cli._common import _add_runtime, command


# -------------------------------------------------------------------------------------- serve
def _add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="weights/demo", help="weights bundle folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (the default keeps the page on this machine)")
    p.add_argument("--port", type=int, default=7860,
                   help="TCP port, 1..65535 (0: a free port, named in the log)")
    p.add_argument("--max-upload-mb", type=float, default=20.0,
                   help="largest upload accepted (bigger ones get HTTP 413)")
    p.add_argument("--max-alpha", type=float, default=None,
                   help="largest |alpha| of an edit, beyond it HTTP 422 (default: the larger "
                        "of 10 and 6 sigma of the widest direction)")
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
    from cxredit.web.app import check_port, serve

    check_port(args.port)  # before the bundle loads (uvicorn would fail later, in a traceback)
    serve(args.weights, args.host, args.port, args.device, max_upload_mb=args.max_upload_mb,
          max_alpha=args.max_alpha, max_project_steps=args.max_project_steps)
    return 0


# --------------------------------------------------------------------------------------- demo
def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (re-runs reuse it)")
    p.add_argument("--weights", default="weights/demo", help="weights bundle folder")
    p.add_argument("--n-healthy", type=int, default=100, help="healthy test phantoms")
    p.add_argument("--n-cardio", type=int, default=250, help="cardiomegaly test phantoms")
    p.add_argument("--n-project", type=int, default=32,
                   help="images per class refined by optimisation")
    p.add_argument("--project-steps", type=int, default=100, help="optimisation steps")
    p.add_argument("--project-space", choices=("w", "w+"), default="w+",
                   help="projection latents: w+ (one w per layer) or w (the paper's)")
    p.add_argument("--n-edit", type=int, default=16, help="healthy images edited")
    _add_runtime(p)


@command("demo", "run the paper's experiment on built-in phantoms with the shipped weights")(
    _add_demo)
def run_demo_cmd(args: argparse.Namespace) -> int:
    from cxredit.demo import print_summary, run_demo

    m = run_demo(args.out, args.weights, args.n_healthy, args.n_cardio, args.n_project,
                 args.project_steps, args.n_edit, args.device, progress=not args.no_progress,
                 project_space=args.project_space)
    print_summary(m, Path(args.out))
    return 0

