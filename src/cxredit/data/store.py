"""ImageStore: the prepared dataset every training and analysis step reads.

A store is a folder::

    images.npy   uint8 [N, R, R]       opened as a read-only memmap (no copy in RAM)
    masks.npy    uint8 [N, 3, R, R]    optional, 0/1 heart, right lung, left lung (phantoms, or a
                                       folder source whose labels CSV names mask files)
    meta.csv     one row per image: the dataset schema of `cxredit.data.sources` + `index`, `split`
    store.json   format version, resolution, counts, preprocessing, source, creation time
    errors.csv   files that could not be read during preparation (path, reason)

Stores are written through `StoreWriter`, which preallocates the arrays in a `.partial/`
sub-folder and records which rows are finished, so a killed preparation resumes where it
stopped and a finished store is only ever published complete (one rename per file).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

STORE_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


class StoreError(ValueError):
    """A store folder is missing, incomplete or inconsistent (message names the folder)."""


def assign_splits(
    patient_ids: Sequence[str],
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    salt: str = "cxredit",
) -> np.ndarray:
    """Deterministic patient-level train/val/test split.

    Each patient id is hashed (sha1 with a salt) to a number in [0, 1); the fractions cut that
    interval. The assignment of a patient therefore never depends on which other patients are in
    the dataset, its order, or `--limit`: all images of a patient land in the same split, and
    adding data never moves a test patient into training.

    Args:
        patient_ids: one id per image.
        fractions: (train, val, test) fractions summing to 1.
        salt: changes the partition while keeping it deterministic.

    Returns:
        object array of split names, one per image.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, "
                         f"got {tuple(fractions)}")
    cut1, cut2 = fractions[0], fractions[0] + fractions[1]
    cache: dict[str, str] = {}
    out = np.empty(len(patient_ids), dtype=object)
    for i, pid in enumerate(patient_ids):
        pid = str(pid)
        split = cache.get(pid)
        if split is None:
            h = hashlib.sha1(f"{salt}:{pid}".encode()).digest()
            u = int.from_bytes(h[:8], "big") / 2.0**64
            split = "train" if u < cut1 else ("val" if u < cut2 else "test")
            cache[pid] = split
        out[i] = split
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_write_csv(path: Path, df: pd.DataFrame) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


class StoreWriter:
    """Preallocated, resumable writer of a store.

    Rows are planned up front (`plan` holds one metadata row per image to produce). Finished rows
    are flagged in `.partial/done.npy`; `flush()` makes them durable. When every row is done or
    failed, `finish()` compacts the successful rows into the final `images.npy` (order kept),
    writes `meta.csv` and `store.json`, and removes `.partial/`.

    Args:
        out: store folder.
        plan: DataFrame with one row per image to produce (any columns; `path` recommended).
        resolution: side length R.
        info: extra fields for store.json (source, preprocessing, ...).
        with_masks: also allocate masks.npy [N,3,R,R].
        settings: JSON-able options that shape the images but are not in `plan` (e.g. the
            phantom generator's); resuming with other settings is refused, like another plan.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        plan: pd.DataFrame,
        resolution: int,
        info: dict | None = None,
        with_masks: bool = False,
        settings: dict | None = None,
    ) -> None:
        self.out = Path(out)
        self.partial = self.out / ".partial"
        self.resolution = int(resolution)
        self.info = dict(info or {})
        self.with_masks = with_masks
        n = len(plan)
        if (self.out / "store.json").exists() and not self.partial.exists():
            raise StoreError(f"{self.out}: a finished store already exists here; "
                             "choose another --out or delete it")
        self.partial.mkdir(parents=True, exist_ok=True)
        plan = plan.reset_index(drop=True)
        plan_path = self.partial / "plan.csv"
        fingerprint = {"n": n, "resolution": self.resolution, "with_masks": with_masks,
                       "plan_sha1": _frame_sha1(plan),
                       "settings": json.loads(json.dumps(settings or {}))}
        fp_path = self.partial / "fingerprint.json"
        if fp_path.exists():
            old = json.loads(fp_path.read_text())
            old.setdefault("settings", {})
            if old != fingerprint:
                what = [k for k in ("n", "resolution", "with_masks")
                        if old.get(k) != fingerprint[k]]
                what += ["the list of images"] * (old.get("plan_sha1") != fingerprint["plan_sha1"])
                what += [f"{k} (was {old['settings'].get(k)})" for k in sorted(
                    set(old["settings"]) | set(fingerprint["settings"]))
                    if old["settings"].get(k) != fingerprint["settings"].get(k)]
                raise StoreError(
                    f"{self.out}: an unfinished preparation with different inputs is here "
                    f"(was {old['n']} images at {old['resolution']} px; differs in "
                    f"{', '.join(what)}); re-run it with the same options, or delete "
                    f"{self.partial} to start over")
            self.resumed = True
        else:
            _atomic_write_csv(plan_path, plan)
            _atomic_write_text(fp_path, json.dumps(fingerprint))
            self.resumed = False
        self.plan = plan
        mode = "r+" if self.resumed else "w+"
        self.images = np.lib.format.open_memmap(
            self.partial / "images.npy", mode=mode, dtype=np.uint8,
            shape=None if self.resumed else (n, self.resolution, self.resolution))
        self.masks = None
        if with_masks:
            self.masks = np.lib.format.open_memmap(
                self.partial / "masks.npy", mode=mode, dtype=np.uint8,
                shape=None if self.resumed else (n, 3, self.resolution, self.resolution))
        # state: 0 = todo, 1 = done, 2 = failed
        state_path = self.partial / "state.npy"
        self.state = np.load(state_path) if state_path.exists() else np.zeros(n, np.uint8)
        self.errors: list[dict] = []
        err_path = self.partial / "errors.csv"
        if err_path.exists() and err_path.stat().st_size > 0:
            self.errors = pd.read_csv(err_path, keep_default_na=False).to_dict("records")
        self.extra_meta: dict[int, dict] = {}
        extra_path = self.partial / "extra_meta.jsonl"
        if extra_path.exists():
            for line in extra_path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.extra_meta[int(rec.pop("_row"))] = rec
        self._pending_extra: list[dict] = []

    @property
    def todo(self) -> np.ndarray:
        """Row numbers not yet done or failed."""
        return np.flatnonzero(self.state == 0)

    def put(self, row: int, image: np.ndarray, mask: np.ndarray | None = None,
            meta: dict | None = None) -> None:
        """Store one finished image (uint8 [R,R]) and optional mask/extra metadata."""
        self.images[row] = image
        if self.masks is not None:
            if mask is None:
                raise ValueError("this store has masks: put() needs a mask")
            self.masks[row] = mask
        if meta:
            self.extra_meta[row] = dict(meta)
            self._pending_extra.append({"_row": int(row), **meta})
        self.state[row] = 1

    def fail(self, row: int, path: str, reason: str) -> None:
        """Record a row that could not be produced; it is skipped in the final store."""
        self.state[row] = 2
        self.errors.append({"path": str(path), "reason": str(reason)})

    def flush(self) -> None:
        """Make everything put so far durable (arrays first, then the done flags)."""
        self.images.flush()
        if self.masks is not None:
            self.masks.flush()
        if self._pending_extra:
            with open(self.partial / "extra_meta.jsonl", "a") as f:
                for rec in self._pending_extra:
                    f.write(json.dumps(rec) + "\n")
            self._pending_extra = []
        pd.DataFrame(self.errors, columns=["path", "reason"]).to_csv(
            self.partial / "errors.csv.tmp", index=False)
        os.replace(self.partial / "errors.csv.tmp", self.partial / "errors.csv")
        np.save(self.partial / "state.tmp.npy", self.state)
        os.replace(self.partial / "state.tmp.npy", self.partial / "state.npy")

    def finish(self, split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS) -> Path:
        """Compact successful rows into the final store and publish it."""
        self.flush()
        if (self.state == 0).any():
            raise StoreError(f"{self.out}: {int((self.state == 0).sum())} rows are not done")
        ok = np.flatnonzero(self.state == 1)
        meta = self.plan.iloc[ok].reset_index(drop=True).copy()
        if self.extra_meta:
            extra = pd.DataFrame([self.extra_meta.get(int(r), {}) for r in ok])
            for col in extra.columns:
                meta[col] = extra[col].values
        meta.insert(0, "index", np.arange(len(meta)))
        pid = meta["patient_id"] if "patient_id" in meta else meta["index"].astype(str)
        meta["split"] = assign_splits(list(pid.astype(str)), split_fractions)

        def compact(name: str, arr: np.memmap) -> None:
            tmp = self.out / f"{name}.tmp.npy"
            dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                            shape=(len(ok),) + arr.shape[1:])
            for s in range(0, len(ok), 4096):  # chunked: bounded memory for big stores
                dst[s:s + 4096] = arr[ok[s:s + 4096]]
            dst.flush()
            del dst
            os.replace(tmp, self.out / f"{name}.npy")

        compact("images", self.images)
        if self.masks is not None:
            compact("masks", self.masks)
        _atomic_write_csv(self.out / "meta.csv", meta)
        _atomic_write_csv(self.out / "errors.csv",
                          pd.DataFrame(self.errors, columns=["path", "reason"]))
        counts = {"images": int(len(ok)), "errors": int(len(self.errors))}
        counts.update({s: int((meta["split"] == s).sum()) for s in SPLITS})
        info = {
            "format": "cxredit.store",
            "format_version": STORE_FORMAT_VERSION,
            "resolution": self.resolution,
            "counts": counts,
            "has_masks": self.masks is not None,
            "split_fractions": list(split_fractions),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **self.info,
        }
        _atomic_write_text(self.out / "store.json", json.dumps(info, indent=2))
        del self.images, self.masks
        shutil.rmtree(self.partial)
        return self.out


def _frame_sha1(df: pd.DataFrame) -> str:
    return hashlib.sha1(df.to_csv(index=False).encode()).hexdigest()


@dataclass(frozen=True)
class Batch:
    """A batch from `ImageStore.iter_batches`: images [B,1,R,R] float32 in [-1,1]."""

    images: torch.Tensor
    index: torch.Tensor  # [B] int64 store rows
    labels: torch.Tensor | None  # [B, L] float32, NaN = not mentioned


class ImageStore:
    """A prepared store opened read-only (images stay on disk as a memmap).

    Args:
        root: store folder written by `cxredit prepare` or `cxredit phantoms`.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        info_path = self.root / "store.json"
        if not info_path.exists():
            hint = " (an unfinished preparation is here: re-run it to finish)" \
                if (self.root / ".partial").exists() else ""
            raise StoreError(f"{self.root}: not a cxredit store (no store.json){hint}")
        try:
            self.info = json.loads(info_path.read_text())
            if not isinstance(self.info, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise StoreError(f"{info_path}: not a valid store.json ({err})") from None
        version = self.info.get("format_version")
        if version != STORE_FORMAT_VERSION:
            raise StoreError(f"{self.root}: store format version {version} is not supported "
                             f"(this cxredit reads version {STORE_FORMAT_VERSION})")
        try:
            self.resolution = int(self.info["resolution"])
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"{info_path}: no valid 'resolution' entry") from None
        try:
            self.images = np.load(self.root / "images.npy", mmap_mode="r")
        except (OSError, ValueError) as err:
            raise StoreError(f"{self.root / 'images.npy'}: cannot be read ({err})") from None
        try:
            self.meta = pd.read_csv(self.root / "meta.csv", low_memory=False,
                                    dtype={"patient_id": str, "study_id": str, "view": str,
                                           "sex": str})
        except (OSError, ValueError) as err:
            raise StoreError(f"{self.root / 'meta.csv'}: cannot be read ({err})") from None
        for col in ("view", "sex", "patient_id", "study_id"):
            if col in self.meta:
                self.meta[col] = self.meta[col].fillna("")
        masks_path = self.root / "masks.npy"
        self.masks = np.load(masks_path, mmap_mode="r") if masks_path.exists() else None
        r = self.resolution
        if self.images.shape[1:] != (r, r) or len(self.images) != len(self.meta):
            raise StoreError(f"{self.root}: images.npy {self.images.shape} does not match "
                             f"meta.csv ({len(self.meta)} rows) at {r} px")

    def __len__(self) -> int:
        return len(self.meta)

    def __repr__(self) -> str:
        return f"ImageStore({str(self.root)!r}, n={len(self)}, resolution={self.resolution})"

    def select(self, split: str | None = None, query: str | None = None) -> np.ndarray:
        """Row indices of a subset.

        Args:
            split: "train", "val", "test" or None for all.
            query: label query such as "Cardiomegaly==1" or "`No Finding`==1 and view=='PA'".

        Returns:
            int64 [K] sorted row indices.
        """
        mask = np.ones(len(self.meta), dtype=bool)
        if split is not None:
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
            mask &= (self.meta["split"] == split).to_numpy()
        if query:
            from cxredit.data.sources import query as run_query

            sub = run_query(self.meta, query)
            qmask = np.zeros(len(self.meta), dtype=bool)
            qmask[sub.index.to_numpy()] = True
            mask &= qmask
        return np.flatnonzero(mask).astype(np.int64)

    def labels(self, columns: Sequence[str], rows: np.ndarray | None = None) -> np.ndarray:
        """Float32 [K, L] label matrix (NaN where not mentioned)."""
        missing = [c for c in columns if c not in self.meta.columns]
        if missing:
            raise ValueError(f"{self.root}: no label column(s) {missing} in meta.csv")
        sub = self.meta[list(columns)] if rows is None else self.meta.iloc[rows][list(columns)]
        return sub.apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)

    def tensor(self, rows: np.ndarray) -> torch.Tensor:
        """Images of `rows` as float32 [K,1,R,R] in [-1,1]."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")  # sorted reads are friendlier to the page cache
        arr = np.empty((len(rows), self.resolution, self.resolution), np.uint8)
        arr[order] = self.images[rows[order]]
        x = torch.from_numpy(arr).unsqueeze(1).float()
        return x.mul_(2.0 / 255.0).sub_(1.0)

    def iter_batches(
        self,
        batch_size: int,
        rows: np.ndarray | None = None,
        shuffle: bool = False,
        generator: np.random.Generator | None = None,
        drop_last: bool = False,
        label_columns: Sequence[str] = (),
    ) -> Iterator[Batch]:
        """Iterate over batches with one memmap read per batch (the fast path for training).

        Args:
            batch_size: images per batch.
            rows: subset of rows (default all).
            shuffle: permute rows each pass using `generator`.
            generator: numpy Generator (required for reproducible shuffling).
            drop_last: drop a final incomplete batch.
            label_columns: meta columns returned as `Batch.labels`.
        """
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, np.int64)
        if shuffle:
            gen = generator if generator is not None else np.random.default_rng()
            rows = rows[gen.permutation(len(rows))]
        labels = self.labels(label_columns) if label_columns else None
        for s in range(0, len(rows), batch_size):
            idx = rows[s:s + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            yield Batch(
                images=self.tensor(idx),
                index=torch.from_numpy(idx.copy()),
                labels=None if labels is None else torch.from_numpy(labels[idx]),
            )

    def dataset(self, split: str | None = None, query: str | None = None,
                label_columns: Sequence[str] = ("Cardiomegaly",),
                with_masks: bool = False) -> StoreDataset:
        """A torch Dataset over a subset (see `StoreDataset`)."""
        return StoreDataset(self, self.select(split, query), label_columns, with_masks)

    def summary(self) -> dict:
        """Counts, resolution, split sizes and a label table (for `cxredit info`)."""
        from cxredit.data.sources import OBSERVATIONS

        out = {"root": str(self.root), "resolution": self.resolution, "images": len(self),
               "source": self.info.get("source", ""), "has_masks": self.masks is not None,
               "errors": self.info.get("counts", {}).get("errors", 0),
               "splits": {s: int((self.meta["split"] == s).sum()) for s in SPLITS}}
        table = {}
        for col in OBSERVATIONS:
            if col in self.meta:
                v = pd.to_numeric(self.meta[col], errors="coerce")
                table[col] = {"positive": int((v == 1).sum()), "negative": int((v == 0).sum()),
                              "uncertain": int((v == -1).sum()), "missing": int(v.isna().sum())}
        out["labels"] = table
        if "view" in self.meta:
            out["views"] = {str(k): int(v) for k, v in self.meta["view"].value_counts().items()}
        return out


class StoreDataset(torch.utils.data.Dataset):
    """Torch Dataset over store rows.

    Items are dicts: `image` float32 [1,R,R] in [-1,1], `index` (store row), `labels` float32
    [L] (NaN = not mentioned) and, with `with_masks`, `masks` uint8 [3,R,R].
    `__getitems__` fetches a whole batch with one memmap read when used by a DataLoader.
    """

    def __init__(self, store: ImageStore, rows: np.ndarray,
                 label_columns: Sequence[str] = (), with_masks: bool = False) -> None:
        if with_masks and store.masks is None:
            raise StoreError(f"{store.root}: this store has no masks.npy")
        self.store = store
        self.rows = np.asarray(rows, np.int64)
        self.label_columns = tuple(label_columns)
        self._labels = store.labels(self.label_columns) if self.label_columns else \
            np.zeros((len(store), 0), np.float32)
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.rows)

    def _item(self, i: int, image: torch.Tensor) -> dict:
        row = int(self.rows[i])
        item = {"image": image, "index": row, "labels": torch.from_numpy(self._labels[row])}
        if self.with_masks:
            item["masks"] = torch.from_numpy(np.array(self.store.masks[row]))
        return item

    def __getitem__(self, i: int) -> dict:
        return self._item(i, self.store.tensor(self.rows[[i]])[0])

    def __getitems__(self, indices: list[int]) -> list[dict]:
        images = self.store.tensor(self.rows[indices])
        return [self._item(i, images[k]) for k, i in enumerate(indices)]


def load_image_files(paths: Sequence[str], resolution: int) -> torch.Tensor:
    """Read X-ray files (any format of `cxredit.data.io`) as [N,1,R,R] float32 in [-1,1]."""
    from cxredit.data.io import read_xray_resized

    arr = np.stack([read_xray_resized(p, resolution) for p in paths])
    return torch.from_numpy(arr).float().div_(127.5).sub_(1).unsqueeze(1)


@dataclass(frozen=True)
class ImageSelection:
    """Images chosen by `--images FILES...` or `--store STORE [--split] [--query]`.

    `ids` are file paths or store rows (as strings, the latents' ids); `fetch(positions)`
    returns those images as [K,1,R,R] in [-1,1].
    """

    ids: list[str]
    fetch: Callable[[Sequence[int]], torch.Tensor]
    store: ImageStore | None = None

    def __len__(self) -> int:
        return len(self.ids)


def select_images(resolution: int, images: Sequence[str] | None = None,
                  store: str | os.PathLike | None = None, split: str | None = None,
                  query: str | None = None, limit: int | None = None,
                  model: str = "the model expects", purpose: str = "to process") -> ImageSelection:
    """The image input shared by invert, project and ctr (one place for its rules and errors).

    Args:
        resolution: side R the model works at (files are resized to it; a store must match).
        images: image files, or
        store: a store folder, rows selected by `split` and `query`.
        limit: keep the first `limit` images.
        model, purpose: words for the error messages ("the generator makes", "to project").
    """
    if (images is None) == (store is None):
        raise ValueError("give either --images or --store")
    if limit is not None and limit < 0:
        raise ValueError(f"--limit must be >= 0, got {limit}")
    if store is not None:
        st = ImageStore(store)
        if st.resolution != resolution:
            raise ValueError(f"{store}: store is {st.resolution} px, {model} {resolution} px")
        rows = st.select(split, query)[:limit]
        sel = ImageSelection([str(r) for r in rows],
                             lambda pos: st.tensor(rows[np.asarray(pos, np.int64)]), st)
    else:
        ids = [str(p) for p in images][:limit]
        sel = ImageSelection(ids, lambda pos: load_image_files([ids[i] for i in pos],
                                                               resolution))
    if not sel.ids:
        where = f": none in {store} match split={split!r} query={query!r}" if store else ""
        raise ValueError(f"no images {purpose}{where}")
    return sel
