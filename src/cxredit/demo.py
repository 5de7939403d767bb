"""`cxredit demo`: the main job on the built-in phantom data.

This version runs the stages that exist today, end to end and for real:
1. renders a phantom test set (100 healthy + 250 cardiomegaly by default, as in the paper's
   separability experiment) into an ordinary store, with masks and CTR;
2. prints the store summary and the CTR distribution of both classes;
3. trains a small StyleGAN2 on a phantom training set for a short time (CPU-sized) and writes
   a sample grid next to a grid of real phantoms.
The encoder, projection, separability, direction and edit commands exist, but a meaningful run
of them needs a well-trained generator; they join the demo with the shipped phantom-trained
weights (a later version). The demo says so at the end.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TEST_SEED = 900  # phantom seed of the demo test set, disjoint from training seeds (0..)
TRAIN_SEED = 1


def run_demo(out: str | Path = "runs/demo", n_healthy: int = 100, n_cardio: int = 250,
             resolution: int = 64, gan_kimg: float = 0.5, n_train: int = 2000,
             device: str | None = None, progress: bool = True) -> dict:
    """Run the demo into `out` (re-running continues finished stages) and return its numbers."""
    from cxredit.config import preset
    from cxredit.data.prepare import make_phantom_store
    from cxredit.data.store import ImageStore
    from cxredit.generate import generate
    from cxredit.runs import save_image_grid
    from cxredit.train.gan import train_gan

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    n = n_healthy + n_cardio
    test_dir = out / "test_store"
    if not (test_dir / "store.json").exists():
        make_phantom_store(test_dir, n, resolution, n_cardio / n, TEST_SEED, progress=progress)
    test = ImageStore(test_dir)
    ctr = test.meta["ctr"].to_numpy(float)
    card = test.meta["Cardiomegaly"].to_numpy(float) == 1
    summary = {
        "test_set": {"healthy": int((~card).sum()), "cardiomegaly": int(card.sum()),
                     "ctr_healthy": [float(ctr[~card].min()), float(ctr[~card].max())],
                     "ctr_cardiomegaly": [float(ctr[card].min()), float(ctr[card].max())]},
    }
    rows = np.concatenate([np.flatnonzero(~card)[:8], np.flatnonzero(card)[:8]])
    save_image_grid(test.tensor(rows), out / "real_phantoms.png", nrow=8)

    train_dir = out / "train_store"
    if not (train_dir / "store.json").exists():
        make_phantom_store(train_dir, n_train, resolution, 0.5, TRAIN_SEED, progress=progress)
    gan_dir = out / "gan"
    cfg = preset("demo64").replace(resolution=resolution, kimg=gan_kimg,
                                   snap_kimg=max(gan_kimg / 2, 0.1))
    resume = (gan_dir / "config.json").exists()
    rec = train_gan(train_dir, gan_dir, None if resume else cfg, resume=resume, device=device,
                    progress=progress, kimg=gan_kimg if resume else None)
    if not rec:  # the run had already finished: report its last logged record
        from cxredit.runs import Run

        rec = next(r for r in reversed(Run(gan_dir, resume=True).read_stats()) if "loss/G" in r)
    gen = generate(gan_dir, list(range(16)), out / "samples", device=device)
    summary["gan"] = {"kimg": rec.get("kimg"), "loss_G": rec.get("loss/G"),
                      "loss_D": rec.get("loss/D"), "samples": str(gen["grid"])}
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_summary(s: dict, out: Path) -> None:
    """Human-readable summary of `run_demo`'s numbers."""
    t = s["test_set"]
    print(f"\ncxredit demo -> {out}")
    print(f"  phantom test set   {t['healthy']} healthy (CTR {t['ctr_healthy'][0]:.2f}-"
          f"{t['ctr_healthy'][1]:.2f}), {t['cardiomegaly']} cardiomegaly "
          f"(CTR {t['ctr_cardiomegaly'][0]:.2f}-{t['ctr_cardiomegaly'][1]:.2f})")
    g = s["gan"]
    print(f"  StyleGAN2 (short)  {g['kimg']} kimg, loss G {g['loss_G']:.3f}, "
          f"loss D {g['loss_D']:.3f}; samples: {g['samples']}")
    print(f"  real phantoms      {out / 'real_phantoms.png'}")
    print(f"  time               {s['seconds']} s")
    print("  not in the demo yet: shipped phantom-trained weights, and with them the encoder, "
          "projection, separability, direction and edit steps (the commands exist: see README)")
