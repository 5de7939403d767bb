"""Data-layer benchmarks: prepare throughput, store iteration, phantom rendering.

    python benchmarks/bench_data.py [--write]      (--write updates BENCHMARKS.md)

Targets (issue "Foundation"): prepare >= 150 img/s per worker on 320x390 JPEGs to 128 px;
store iteration into batches of 64 at 128 px >= 20,000 img/s; phantom rendering at 128 px
>= 200 img/s on one core.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_mb, write_section  # noqa: E402
from cxredit.data.phantom import render_batch  # noqa: E402
from cxredit.data.prepare import prepare_store  # noqa: E402
from cxredit.data.sources import index_folder  # noqa: E402
from cxredit.data.store import ImageStore, StoreWriter  # noqa: E402


def make_jpegs(folder: Path, n: int) -> None:
    """n phantom radiographs saved as 320x390 (WxH) 8-bit JPEGs, like CheXpert-small."""
    images, _, _ = render_batch(list(range(50)), [i % 2 == 0 for i in range(50)], 256)
    for i in range(n):
        img = Image.fromarray(images[i % 50]).resize((320, 390), Image.Resampling.BILINEAR)
        img.save(folder / f"view{i:05d}_frontal.jpg", quality=90)


def bench_prepare(tmp: Path, n: int, workers: int) -> float:
    """Images per second of `prepare_store`, including worker start-up (spawned processes)."""
    raw = tmp / "raw"
    if not raw.exists():
        raw.mkdir()
        make_jpegs(raw, n)
    df = index_folder(raw)
    n = len(df)
    t0 = time.perf_counter()
    res = prepare_store(df, tmp / f"store_w{workers}", 128, workers=workers, progress=False)
    dt = time.perf_counter() - t0
    assert res.images == n
    return n / dt


def bench_iteration(tmp: Path, n: int, batch: int = 64) -> tuple[float, float]:
    import pandas as pd

    plan = pd.DataFrame({"path": [f"x{i}" for i in range(n)],
                         "patient_id": [f"p{i}" for i in range(n)]})
    w = StoreWriter(tmp / "iter", plan, 128)
    rng = np.random.default_rng(0)
    for s in range(0, n, 1000):
        w.images[s:s + 1000] = rng.integers(0, 256, (min(1000, n - s), 128, 128), np.uint8)
    w.state[:] = 1
    w.finish()
    store = ImageStore(tmp / "iter")
    for _ in store.iter_batches(batch, shuffle=True, generator=np.random.default_rng(0)):
        pass  # warm the page cache, as a training epoch after the first would see it
    t0 = time.perf_counter()
    seen = 0
    for b in store.iter_batches(batch, shuffle=True, generator=np.random.default_rng(1)):
        seen += len(b.images)
    fast = seen / (time.perf_counter() - t0)
    loader = torch.utils.data.DataLoader(store.dataset(label_columns=()), batch_size=batch,
                                         shuffle=True, num_workers=0)
    t0 = time.perf_counter()
    seen = 0
    for b in loader:
        seen += len(b["image"])
    loader_rate = seen / (time.perf_counter() - t0)
    return fast, loader_rate


def bench_phantoms(n: int, resolution: int = 128, repeat: int = 3) -> float:
    """Best of `repeat` runs: this shared VM's speed drifts by +-20% between runs."""
    torch.set_num_threads(1)
    render_batch([0], [False], resolution)  # warm caches (coordinate grids)
    best = 0.0
    for r in range(repeat):
        seeds = list(range(1 + r * n, 1 + (r + 1) * n))
        t0 = time.perf_counter()
        render_batch(seeds, [i % 2 == 0 for i in range(n)], resolution)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    ap.add_argument("--n-jpeg", type=int, default=4000)
    ap.add_argument("--n-store", type=int, default=20000)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        r1 = bench_prepare(tmp, args.n_jpeg, 1)
        rows.append(("prepare, 320x390 JPEG -> 128 px, 1 worker", f"{r1:,.0f} img/s",
                     ">= 150 img/s per worker"))
        r2 = bench_prepare(tmp, args.n_jpeg, 2)
        rows.append(("prepare, same, 2 workers (incl. ~1 s worker start-up)",
                     f"{r2:,.0f} img/s ({r2 / 2:,.0f} per worker)",
                     ">= 150 img/s per worker"))
        fast, loader = bench_iteration(tmp, args.n_store)
        rows.append(("store iteration, batches of 64 at 128 px (`iter_batches`, shuffled)",
                     f"{fast:,.0f} img/s", ">= 20,000 img/s"))
        rows.append(("store iteration, torch DataLoader over `StoreDataset` (batched fetch)",
                     f"{loader:,.0f} img/s", "-"))
    ph = bench_phantoms(300)
    rows.append(("phantom rendering at 128 px, one core (image + 3 masks; best of 3 x 300)",
                 f"{ph:,.0f} img/s",
                 ">= 200 img/s"))
    md = ["## Data layer (`benchmarks/bench_data.py`)\n", f"Machine: {machine()}; "
          f"peak RSS {peak_rss_mb():,.0f} MiB.\n", "| what | measured | target |",
          "|---|---|---|"]
    md += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(md)
    print(text)
    if args.write:
        write_section("data", text)


if __name__ == "__main__":
    main()
