"""Parallel, resumable conversion of raw X-ray files into an ImageStore.

Each file is read (`cxredit.data.io`), center-cropped to a square, resized with antialiasing
and stored as uint8. Work is split into chunks handed to worker processes; finished rows are
flushed to disk every few seconds, so a killed run loses at most the chunks in flight and the
next run with the same arguments continues from there. A file that cannot be read is listed in
`errors.csv` with its reason and skipped; it never stops the job.

When the index has the mask columns of a folder labels CSV (`cxredit.data.sources.MASK_COLUMNS`),
each row's three mask files get the image's crop and resize too and go to `masks.npy`; a row
whose masks are blank, missing, unreadable or of another size than its image fails like an
unreadable file.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from cxredit.data._workers import MASK_LABELS, convert_chunk, render_chunk
from cxredit.data.store import StoreWriter

log = logging.getLogger(__name__)

CHUNK = 32
FLUSH_SECONDS = 5.0


@dataclass
class PrepareResult:
    """What `prepare_store` did."""

    out: Path
    images: int  # images in the finished store
    errors: int  # files skipped (listed in errors.csv)
    resumed: bool  # continued an interrupted run
    seconds: float

    def summary(self) -> str:
        """One line for the CLI."""
        rate = self.images / self.seconds if self.seconds > 0 else float("nan")
        masks = " (+ masks)" if (self.out / "masks.npy").exists() else ""
        return (f"{self.out}: {self.images} images{masks}, {self.errors} skipped "
                f"(see errors.csv)"
                f"{', resumed' if self.resumed else ''}; {self.seconds:.1f} s ({rate:.0f} img/s)")


def prepare_store(
    index: pd.DataFrame,
    out: str | os.PathLike,
    resolution: int = 128,
    workers: int = 1,
    limit: int | None = None,
    info: dict | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> PrepareResult:
    """Convert the files of an index DataFrame into a store (resumable).

    Args:
        index: rows from an indexer of `cxredit.data.sources` (needs a `path` column). With
            the columns `mask_heart`, `mask_right_lung` and `mask_left_lung` (mask file paths,
            see `cxredit.data.sources.index_folder`) the store also gets `masks.npy`.
        out: store folder.
        resolution: side R of the square output.
        workers: processes (1 = in this process).
        limit: keep only the first `limit` rows of the index.
        info: extra store.json fields (source, root, filters).
        progress: show a tqdm bar.
        stop_after: testing hook: stop (as if killed) after this many chunks, leaving the run
            unfinished but resumable.

    Returns:
        PrepareResult; `images` is 0 when stopped early.
    """
    if "path" not in index.columns:
        raise ValueError("the index has no 'path' column")
    if resolution < 8 or resolution > 4096:
        raise ValueError(f"resolution must be between 8 and 4096, got {resolution}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    plan = index.head(limit) if limit is not None else index
    if len(plan) == 0:
        raise ValueError("nothing to prepare: the index is empty after filtering")
    present = [c for c in MASK_LABELS if c in plan.columns]
    if present and len(present) < len(MASK_LABELS):
        raise ValueError(f"the index has mask column(s) {present} but lacks "
                         f"{[c for c in MASK_LABELS if c not in present]}")
    with_masks = bool(present)
    t0 = time.time()
    preprocessing = {"crop": "center square (short side)",
                     "resize": "antialiased (Pillow LANCZOS)", "dtype": "uint8",
                     "convention": "MONOCHROME2 (lungs dark)"}
    if with_masks:
        preprocessing["masks"] = ("same crop; area (BOX) resize, bilinear when enlarging; "
                                  "inside where >= 0.5; from the index's mask_* files")
    full_info = {"preprocessing": preprocessing, **(info or {})}
    writer = StoreWriter(out, plan, resolution, info=full_info, with_masks=with_masks)
    todo = writer.todo
    paths = writer.plan["path"].astype(str).to_numpy()
    mask_paths = None
    if with_masks:
        cells = writer.plan[list(MASK_LABELS)].fillna("").astype(str).to_numpy()
        mask_paths = [tuple(str(v).strip() for v in r) for r in cells]

    def job(rows: list[int]) -> tuple:
        """convert_chunk's arguments for `rows` (plain lists: they travel to workers)."""
        return (rows, [paths[r] for r in rows], resolution,
                None if mask_paths is None else [mask_paths[r] for r in rows])
    chunks = [todo[s:s + CHUNK].tolist() for s in range(0, len(todo), CHUNK)]
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), unit="img", disable=not progress,
               desc=f"prepare {Path(out).name}")
    done_chunks = 0
    last_flush = time.time()

    def consume(results: list[tuple]) -> None:
        nonlocal last_flush
        for row, img, masks, reason in results:
            if img is None:
                writer.fail(row, paths[row], reason)
            else:
                writer.put(row, img, masks)
        bar.update(len(results))
        bar.set_postfix(errors=len(writer.errors))
        if time.time() - last_flush > FLUSH_SECONDS:
            writer.flush()
            last_flush = time.time()

    try:
        if workers <= 1:
            for rows in chunks:
                consume(convert_chunk(*job(rows)))
                done_chunks += 1
                if stop_after is not None and done_chunks >= stop_after:
                    writer.flush()
                    return PrepareResult(Path(out), 0, len(writer.errors), writer.resumed,
                                         time.time() - t0)
        else:
            # spawn: workers must not inherit torch's thread pools or open memmaps
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                pending: set[Future] = set()
                it = iter(chunks)
                for rows in it:
                    pending.add(pool.submit(convert_chunk, *job(rows)))
                    if len(pending) >= 4 * workers:
                        break
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        consume(fut.result())
                        nxt = next(it, None)
                        if nxt is not None:
                            pending.add(pool.submit(convert_chunk, *job(nxt)))
    finally:
        writer.flush()
        bar.close()
    writer.finish()
    n_err = len(writer.errors)
    if n_err:
        log.warning("%d file(s) could not be read; see %s", n_err, Path(out) / "errors.csv")
    return PrepareResult(Path(out), int((writer.state == 1).sum()), n_err, writer.resumed,
                         time.time() - t0)


def phantom_plan(n: int, cardiomegaly_fraction: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """The list of phantom cases of a store: subject seeds and cardiomegaly flags.

    Subject seeds are `seed * 1_000_000 + i`, so stores made with different `--seed` values
    never share a subject (the demo's test set uses a seed disjoint from training). Exactly
    round(n * fraction) cases are cardiomegaly, placed by a seeded permutation.
    """
    if n <= 0:
        raise ValueError(f"--n must be positive, got {n}")
    if not 0.0 <= cardiomegaly_fraction <= 1.0:
        raise ValueError(f"--cardiomegaly-fraction must be in [0, 1], got {cardiomegaly_fraction}")
    if n >= 1_000_000:
        raise ValueError("at most 999,999 phantoms per store")
    import numpy as np

    rng = np.random.default_rng(seed)
    flags = np.zeros(n, dtype=bool)
    flags[: int(round(n * cardiomegaly_fraction))] = True
    flags = flags[rng.permutation(n)]
    seeds = seed * 1_000_000 + np.arange(n)
    return pd.DataFrame({"path": [f"phantom:{s}" for s in seeds], "subject_seed": seeds,
                         "cardiomegaly": flags})


def make_phantom_store(
    out: str | os.PathLike,
    n: int = 5000,
    resolution: int = 128,
    cardiomegaly_fraction: float = 0.5,
    seed: int = 0,
    workers: int = 1,
    device_probs: tuple[float, float] = (0.05, 0.3),
    progress: bool = True,
) -> PrepareResult:
    """Render phantoms into an ordinary store (+ masks.npy), resumably.

    Args:
        out: store folder.
        n: number of images.
        resolution: side R.
        cardiomegaly_fraction: share of cases with CTR > 0.5.
        seed: base seed (see `phantom_plan`).
        workers: processes.
        device_probs: pacemaker probability for (healthy, cardiomegaly) cases: the confounder.
        progress: show a tqdm bar.
    """
    t0 = time.time()
    plan = phantom_plan(n, cardiomegaly_fraction, seed)
    info = {"source": "phantom", "phantom": {"n": n, "seed": seed,
                                             "cardiomegaly_fraction": cardiomegaly_fraction,
                                             "device_probs": list(device_probs)}}
    writer = StoreWriter(out, plan[["path"]], resolution, info=info, with_masks=True,
                         settings=info["phantom"])
    todo = writer.todo
    seeds = plan["subject_seed"].tolist()
    flags = plan["cardiomegaly"].tolist()
    chunks = [todo[s:s + CHUNK].tolist() for s in range(0, len(todo), CHUNK)]
    args = [(rows, [seeds[r] for r in rows], [flags[r] for r in rows], resolution,
             tuple(device_probs)) for rows in chunks]
    bar = tqdm(total=n, initial=n - len(todo), unit="img", disable=not progress,
               desc=f"phantoms {Path(out).name}")
    last_flush = time.time()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) \
        if workers > 1 and args else None
    try:
        results = pool.map(render_chunk, *zip(*args)) if pool else \
            (render_chunk(*a) for a in args)
        for rows, images, masks, metas in results:
            for k, row in enumerate(rows):
                writer.put(row, images[k], masks[k], metas[k])
            bar.update(len(rows))
            if time.time() - last_flush > FLUSH_SECONDS:
                writer.flush()
                last_flush = time.time()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        writer.flush()
        bar.close()
    writer.finish()
    return PrepareResult(Path(out), n, 0, writer.resumed, time.time() - t0)
