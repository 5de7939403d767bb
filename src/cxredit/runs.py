"""Run folders: `runs/<name>/{config.json, stats.jsonl, checkpoints/, samples/}`.

A run folder is the unit of work of every training command. `config.json` holds the fully
resolved configuration (and how the run was started), `stats.jsonl` one JSON line per logged
step, `checkpoints/` the newest few checkpoints (`ckpt-<step>.json/.safetensors`) plus kept
snapshots, `samples/` image grids.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from cxredit import __version__

_CKPT = re.compile(r"^ckpt-(\d+)\.json$")
log = logging.getLogger(__name__)


class RunError(ValueError):
    """A run folder cannot be created or resumed as asked."""


class Run:
    """A run folder.

    Args:
        root: folder of the run.
        resume: continue an existing run (it must hold a config.json); otherwise the folder
            must not already hold a run with a checkpoint (one that stopped before its first
            checkpoint is replaced).
    """

    def __init__(self, root: str | os.PathLike, resume: bool = False) -> None:
        self.root = Path(root)
        self.ckpt_dir = self.root / "checkpoints"
        self.sample_dir = self.root / "samples"
        exists = (self.root / "config.json").exists()
        if resume and not exists:
            raise RunError(f"{self.root}: nothing to resume (no config.json)")
        if not resume and exists:
            if self.checkpoints():
                raise RunError(f"{self.root}: a run already exists here; pass --resume to "
                               "continue it or choose another --out")
            # config.json without a checkpoint: a run that failed or was stopped before its
            # first checkpoint holds nothing to keep; a new start replaces it.
            log.info("%s: replacing a run that stopped before its first checkpoint", self.root)
            self.stats_path.unlink(missing_ok=True)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.sample_dir.mkdir(parents=True, exist_ok=True)

    @property
    def stats_path(self) -> Path:
        return self.root / "stats.jsonl"

    def write_config(self, config: dict, kind: str, extra: dict | None = None) -> None:
        """Write config.json: the resolved config plus provenance (command, versions, date)."""
        import torch

        doc = {"kind": kind, "config": config, "command": sys.argv,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cxredit": __version__,
               "torch": torch.__version__, **(extra or {})}
        tmp = self.root / "config.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, self.root / "config.json")

    def read_config(self) -> dict:
        """The document written by `write_config`."""
        return json.loads((self.root / "config.json").read_text())

    def log(self, record: dict) -> None:
        """Append one JSON line to stats.jsonl (flushed: a crash loses nothing logged)."""
        with open(self.stats_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def truncate_stats(self, step: int) -> None:
        """Drop stats lines logged after `step` (a resumed run re-logs them identically)."""
        if not self.stats_path.exists():
            return
        keep = [ln for ln in self.stats_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        tmp = self.stats_path.with_name("stats.jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.stats_path)

    def read_stats(self) -> list[dict]:
        """All stats records."""
        if not self.stats_path.exists():
            return []
        return [json.loads(ln) for ln in self.stats_path.read_text().splitlines() if ln.strip()]

    def train_seconds(self) -> float:
        """Wall time the run's kept training took, over all its resumes: the sum of each
        logged tick's sec_per_kimg x the kimg it covered. Work lost to a crash and redone after
        a resume is counted once (its lines were dropped by `truncate_stats`)."""
        total, prev = 0.0, 0.0
        for rec in self.read_stats():
            if "sec_per_kimg" in rec and "kimg" in rec:
                total += rec["sec_per_kimg"] * max(rec["kimg"] - prev, 0.0)
                prev = rec["kimg"]
        return total

    def checkpoint_path(self, step: int) -> Path:
        """Path (without suffix) of the checkpoint at `step`."""
        return self.ckpt_dir / f"ckpt-{step:08d}"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (those whose JSON exists), oldest first."""
        out = []
        for p in self.ckpt_dir.glob("ckpt-*.json"):
            m = _CKPT.match(p.name)
            if m and p.with_suffix(".safetensors").exists():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        cks = self.checkpoints()
        return cks[-1][1] if cks else None

    def prune(self, keep: int, keep_steps: set[int] | None = None) -> None:
        """Delete all but the newest `keep` checkpoints (and those at `keep_steps`)."""
        keep_steps = keep_steps or set()
        cks = self.checkpoints()
        for step, js in cks[: max(len(cks) - keep, 0)]:
            if step in keep_steps:
                continue
            js.unlink(missing_ok=True)
            js.with_suffix(".safetensors").unlink(missing_ok=True)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve a run folder or a checkpoint path to a checkpoint JSON path.

    Accepts a run folder (newest checkpoint), a `checkpoints/` folder, or a checkpoint file
    with or without suffix.
    """
    p = Path(path)
    if p.is_dir() and (p / "bundle.json").is_file():
        try:
            comps = json.loads((p / "bundle.json").read_text())["components"]
            files = ", ".join(f"{p / c['file']}.json ({c['kind']})" for c in comps.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            files = f"{p}/G.json, ..."
        raise RunError(f"{p}: is a weights bundle, not a run; pass one of its checkpoints: "
                       f"{files}")
    if p.is_dir():
        ck_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        cks = sorted(ck_dir.glob("*.json"))
        cks = [c for c in cks if c.with_suffix(".safetensors").exists()]
        if not cks:
            raise RunError(f"{p}: no checkpoint found")
        ordered = [c for c in cks if _CKPT.match(c.name)]
        return (ordered or cks)[-1]
    for cand in (p, p.with_name(p.name + ".json"), p.with_suffix(".json")):
        if cand.suffix == ".json" and cand.exists():
            return cand
    raise RunError(f"{p}: checkpoint not found")


def save_image_grid(images, path: str | os.PathLike, nrow: int = 8,
                    provenance: dict[str, str] | None = None) -> Path:
    """Tile images [N,1,R,R] in [-1,1] into one 8-bit grayscale PNG (atomically written).

    Args:
        images: tensor or array [N,1,R,R] (or [N,R,R]) in [-1,1].
        path: output PNG.
        nrow: images per row.
        provenance: PNG text chunks (see `cxredit.data.io.write_png`).
    """
    import numpy as np

    from cxredit.data.io import write_png

    arr = images.detach().float().cpu().numpy() if hasattr(images, "detach") else \
        np.asarray(images, np.float32)
    if arr.ndim == 4:
        arr = arr[:, 0]
    n, h, w = arr.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = np.zeros((rows * h, ncol * w), np.float32)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, np.clip((grid + 1) / 2, 0, 1), provenance=provenance)
    return path
