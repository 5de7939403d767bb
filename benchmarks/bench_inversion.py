"""Encoder inversion vs optimisation-based projection: speed per preset (and quality).

    python benchmarks/bench_inversion.py [--write] [--presets tiny,demo64] [--steps 500]

The encoder exists to be far faster than projection: the target is >= 100x faster than
500-step optimisation. Networks are untrained here (speed does not depend on the weights);
reconstruction quality at equal speed is measured on trained weights by the demo.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section  # noqa: E402
from cxredit.config import preset  # noqa: E402
from cxredit.latent.project import project_images  # noqa: E402
from cxredit.models.encoder import Encoder, encoder_config_for  # noqa: E402
from cxredit.train.gan import build_networks  # noqa: E402


def bench(name: str, steps: int, batch: int, device: torch.device,
          timed_steps: int | None = None) -> dict:
    """Encoder img/s and projection img/s. With `timed_steps`, projection runs that many steps
    and its time is scaled to `steps` (a step costs the same throughout: one G forward and
    backward), which keeps the 128-px CPU measurement affordable."""
    cfg = preset(name)
    G = build_networks(cfg)[0].to(device).eval().requires_grad_(False)
    E = Encoder(encoder_config_for(name), w_avg=G.mapping.w_avg).to(device).eval()
    x = torch.rand(batch, 1, cfg.resolution, cfg.resolution, device=device) * 2 - 1
    with torch.no_grad():
        E(x)
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            E(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        enc = reps * batch / (time.perf_counter() - t0)
    project_images(G, x, steps=2)  # warm-up
    run_steps = timed_steps or steps
    t0 = time.perf_counter()
    project_images(G, x, steps=run_steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    proj = batch / ((time.perf_counter() - t0) * steps / run_steps)
    return {"preset": name, "encoder": enc, "project": proj, "ratio": enc / proj,
            "timed_steps": run_steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,demo64")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timed-steps", type=int, default=None,
                    help="time only this many projection steps and scale to --steps")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    dev = torch.device(args.device)
    rows = [bench(p, args.steps, args.batch, dev, args.timed_steps)
            for p in args.presets.split(",")]
    md = [f"## Inversion speed (`benchmarks/bench_inversion.py`, {args.device})\n",
          f"Machine: {machine()}. Batch {args.batch}, projection {args.steps} steps (W space),"
          " untrained networks (speed only).\n",
          "| preset | encoder img/s | projection img/s | encoder / projection |",
          "|---|---|---|---|"]
    for r in rows:
        note = "" if r["timed_steps"] == args.steps else f" (timed {r['timed_steps']} steps)"
        md.append(f"| {r['preset']} | {r['encoder']:,.1f} | {r['project']:.4f}{note} "
                  f"| {r['ratio']:,.0f}x |")
    text = "\n".join(md)
    print(text)
    if args.write:
        write_section(f"inversion-{args.device}", text)


if __name__ == "__main__":
    main()
