"""How well a disease is separated in latent space: LDA, the paper's number, and an honest one.

Saboo et al. (Fig. 2A) fit an LDA on the latents of cardiomegaly and healthy images, project
every image on the LDA direction and report the class separation of the 1-D projections::

    separation = |mean_pos - mean_neg| / ((std_pos + std_neg) / 2)

That number is **in-sample**: the direction was fitted on the very points it separates. With
w_dim = 512 (or 6144 for W+ flattened) and a few hundred images, an LDA separates pure noise
(see tests), so we also report the number **cross-validated**: stratified k-fold, each fold's
LDA projects only its held-out images, and the held-out projections of all folds are pooled.
The two bracket the truth: in-sample over-estimates (over-fitting), held-out under-estimates
(a direction estimated from fewer images). Held-out AUC and balanced accuracy come with it.

Pooling folds needs a common scale: an LDA's direction is defined up to sign and scale, and
its intercept differs per fold. Each fold's projection is therefore (a) oriented so that the
positive class mean is higher on the fold's *training* data, (b) centred on the fold's LDA
decision boundary (0 = the threshold its classifier uses) and (c) divided by the pooled
within-class std of its training projections. All projections here (in-sample too) are in
those units. Stds are population stds (ddof = 0), as in the fitted Gaussians of the figure.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxredit import __version__

log = logging.getLogger(__name__)

FLATTEN_MODES = ("mean", "flatten")


# ----------------------------------------------------------------------------- features + stats

def as_features(w: np.ndarray, flatten: str = "mean") -> np.ndarray:
    """Latents -> a feature matrix.

    Args:
        w: [N, w_dim] (W) or [N, num_ws, w_dim] (W+).
        flatten: W+ handling: "mean" averages over the ws -> [N, w_dim]; "flatten" concatenates
            them -> [N, num_ws * w_dim]. W input is returned as is.

    Returns:
        float64 [N, D].
    """
    if flatten not in FLATTEN_MODES:
        raise ValueError(f"flatten must be one of {FLATTEN_MODES}, got {flatten!r}")
    w = np.asarray(w, np.float64)
    if w.ndim == 2:
        return w
    if w.ndim != 3:
        raise ValueError(f"w must be [N, w_dim] or [N, num_ws, w_dim], got {list(w.shape)}")
    return w.mean(axis=1) if flatten == "mean" else w.reshape(len(w), -1)


def check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    """Bool [N] labels (True = positive); both classes must be present."""
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {list(y.shape)}")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be boolean (True = positive) or 0/1")
        y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError(f"labels need both classes, got {int(y.sum())} positive and "
                         f"{int((~y).sum())} negative")
    return y


def separation(pos: np.ndarray, neg: np.ndarray) -> float:
    """The paper's class separation of 1-D projections: |m+ - m-| / ((s+ + s-) / 2)."""
    spread = (np.std(pos) + np.std(neg)) / 2
    gap = abs(float(np.mean(pos)) - float(np.mean(neg)))
    return float(gap / spread) if spread > 0 else float("inf") if gap > 0 else 0.0


def parse_shrinkage(shrinkage: float | str | None) -> float | str | None:
    """Accept None / "none", "auto" (Ledoit-Wolf) or a number in [0, 1] (also as a string)."""
    if shrinkage is None or (isinstance(shrinkage, str) and shrinkage.lower() in ("none", "")):
        return None
    if isinstance(shrinkage, str) and shrinkage.lower() == "auto":
        return "auto"
    try:
        value = float(shrinkage)
    except (TypeError, ValueError):
        raise ValueError(f"shrinkage must be None, 'auto' or a number in [0, 1], "
                         f"got {shrinkage!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {value}")
    return value


def fit_lda(X: np.ndarray, y: np.ndarray, shrinkage: float | str | None = None):
    """Fit a scikit-learn LDA (svd solver, or lsqr when `shrinkage` is set).

    Args:
        X: [N, D]; y: bool [N].

    Returns:
        (model, rank_deficient): the flag says the within-class covariance is singular
        (N - 2 < D without shrinkage), i.e. in-sample numbers are strongly inflated.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    shrinkage = parse_shrinkage(shrinkage)
    if shrinkage is None:
        lda = LinearDiscriminantAnalysis(solver="svd")
    else:
        lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage)
    lda.fit(X, y)
    return lda, shrinkage is None and len(X) - 2 < X.shape[1]


def _axis(lda, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(unit direction [D], offset, scale) such that z = (X @ u + offset) / scale is oriented
    (positives higher on X, y), 0 at the LDA decision boundary, in within-class std units."""
    coef = lda.coef_[0].astype(np.float64)
    norm = float(np.linalg.norm(coef))
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("LDA found no direction (constant or degenerate features)")
    u, offset = coef / norm, float(lda.intercept_[0]) / norm
    d = X @ u + offset
    if d[y].mean() < d[~y].mean():
        u, offset = -u, -offset
        d = -d
    resid = np.concatenate([d[y] - d[y].mean(), d[~y] - d[~y].mean()])
    scale = float(np.sqrt(np.sum(resid ** 2) / max(len(d) - 2, 1)))
    return u, offset, scale if scale > 0 else 1.0


def _stats(z: np.ndarray, y: np.ndarray) -> dict:
    return {"mean_pos": float(z[y].mean()), "std_pos": float(z[y].std()),
            "mean_neg": float(z[~y].mean()), "std_neg": float(z[~y].std())}


# ----------------------------------------------------------------------------- the analysis

def separability(w: np.ndarray, labels: np.ndarray, flatten: str = "mean",
                 shrinkage: float | str | None = None, folds: int = 5, seed: int = 0) -> dict:
    """LDA class separation of latents, in-sample (the paper's number) and cross-validated.

    Args:
        w: [N, w_dim] or [N, num_ws, w_dim] latents.
        labels: bool [N], True = positive (e.g. cardiomegaly).
        flatten: W+ handling, see `as_features`.
        shrinkage: None (plain LDA, svd solver, as in the paper), "auto" (Ledoit-Wolf) or a
            float in [0, 1] (lsqr solver). Advisable when N is not much larger than D.
        folds: stratified folds for the held-out numbers (>= 2).
        seed: fold shuffling seed.

    Returns:
        dict with "separation" (in-sample), "separation_cv", "auc", "balanced_accuracy" (both
        held-out), "auc_in_sample", "balanced_accuracy_in_sample", "separation_per_fold",
        "counts", "dimension", "input_shape", "settings", "stats" ({"in_sample", "cv"}: class
        means / stds of the projections), "rank_deficient", and arrays "labels" bool [N],
        "projections" [N] (in-sample), "projections_cv" [N] (held-out), "direction" [D]
        (unit LDA direction of the all-data fit in feature space).
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    X = as_features(w, flatten)
    if not np.isfinite(X).all():
        raise ValueError("latents contain NaN or inf")
    y = check_labels(labels, len(X))
    shrinkage = parse_shrinkage(shrinkage)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    folds = int(folds)
    if folds < 2 or min(n_pos, n_neg) < folds:
        raise ValueError(f"{folds}-fold cross-validation needs folds >= 2 and at least {folds} "
                         f"images per class (got {n_pos} positive, {n_neg} negative)")

    lda, deficient = fit_lda(X, y, shrinkage)
    u, offset, scale = _axis(lda, X, y)
    z_in, pred_in = (X @ u + offset) / scale, lda.predict(X).astype(bool)

    z_cv, pred_cv, per_fold = np.empty(len(X)), np.empty(len(X), bool), []
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in skf.split(X, y):
        m, d = fit_lda(X[train], y[train], shrinkage)
        deficient |= d
        fu, foff, fscale = _axis(m, X[train], y[train])
        z_cv[test] = (X[test] @ fu + foff) / fscale
        pred_cv[test] = m.predict(X[test]).astype(bool)
        per_fold.append(separation(z_cv[test][y[test]], z_cv[test][~y[test]]))
    if deficient:
        log.warning("within-class covariance is singular (N=%d, D=%d): the in-sample separation "
                    "is inflated; the cross-validated number is the one to trust, and "
                    "shrinkage='auto' usually helps", len(X), X.shape[1])
    return {
        "separation": separation(z_in[y], z_in[~y]),
        "separation_cv": separation(z_cv[y], z_cv[~y]),
        "auc": float(roc_auc_score(y, z_cv)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred_cv)),
        "auc_in_sample": float(roc_auc_score(y, z_in)),
        "balanced_accuracy_in_sample": float(balanced_accuracy_score(y, pred_in)),
        "separation_per_fold": per_fold,
        "counts": {"positive": n_pos, "negative": n_neg},
        "dimension": int(X.shape[1]),
        "input_shape": [int(s) for s in np.shape(w)[1:]],
        "settings": {"flatten": flatten, "shrinkage": shrinkage,
                     "solver": "svd" if shrinkage is None else "lsqr", "folds": folds,
                     "seed": int(seed)},
        "stats": {"in_sample": _stats(z_in, y), "cv": _stats(z_cv, y)},
        "rank_deficient": bool(deficient),
        "labels": y, "projections": z_in, "projections_cv": z_cv, "direction": u,
    }


def histogram_figure(result: dict, path: str | os.PathLike, title: str | None = None,
                     class_names: tuple[str, str] = ("positive", "negative")) -> Path:
    """Paper Fig. 2A style PNG: histograms of both classes' projections with fitted Gaussians;
    left panel in-sample, right panel held-out.

    Args:
        result: output of `separability`.
        path: PNG file (written atomically).
        title: figure title.
        class_names: legend names of (positive, negative).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y = np.asarray(result["labels"], bool)
    panels = [("in-sample", result["projections"], result["separation"], result["auc_in_sample"]),
              (f"held-out ({result['settings']['folds']}-fold CV)", result["projections_cv"],
               result["separation_cv"], result["auc"])]
    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)  # Agg canvas without touching pyplot's global backend
    axes = fig.subplots(1, 2)
    for ax, (name, z, sep, auc) in zip(axes, panels):
        z = np.asarray(z, np.float64)
        edges = np.histogram_bin_edges(z, bins=min(60, max(10, len(z) // 8)))
        grid = np.linspace(edges[0], edges[-1], 400)
        for mask, label, color in ((y, class_names[0], "tab:red"),
                                   (~y, class_names[1], "tab:blue")):
            v = z[mask]
            ax.hist(v, bins=edges, density=True, alpha=0.45, color=color,
                    label=f"{label} (n={mask.sum()})")
            mu, sd = v.mean(), max(v.std(), 1e-12)
            ax.plot(grid, np.exp(-0.5 * ((grid - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi)),
                    color=color, lw=2)
        ax.axvline(0, color="0.4", lw=0.8, ls="--")
        ax.set_title(f"{name}: separation {sep:.2f}, AUC {auc:.2f}", fontsize=10)
        ax.set_xlabel("LDA projection (within-class std; 0 = decision boundary)")
        ax.set_ylabel("density")
        ax.legend(fontsize=8, title=f"separation {sep:.2f}", title_fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- latents + meta

_STR_COLS = ("path", "patient_id", "study_id", "view", "sex")


def read_meta(meta: str | os.PathLike) -> pd.DataFrame:
    """Read a store's meta.csv (a store folder or the csv itself), dtypes as `ImageStore`."""
    p = Path(meta) / "meta.csv" if Path(meta).is_dir() else Path(meta)
    if not p.is_file():
        raise ValueError(f"{p}: meta csv not found (give a store folder or its meta.csv)")
    df = pd.read_csv(p, low_memory=False, dtype={c: str for c in _STR_COLS})
    for col in _STR_COLS:
        if col in df:
            df[col] = df[col].fillna("")
    return df


def join_meta(ids: list[str], meta: pd.DataFrame) -> pd.DataFrame:
    """Meta rows for latent ids, in id order (one row per id, fresh RangeIndex).

    Integer ids are store rows: joined on the `index` column (or the row position when there
    is none). Other ids are image paths: joined on `path` (exactly, else as absolute paths).
    Raises ValueError when an id has no row, naming the first few.
    """
    ids = [str(i) for i in ids]
    if ids and all(i.strip().lstrip("-").isdigit() for i in ids):
        keys = pd.Index(meta["index"].astype(np.int64) if "index" in meta
                        else np.arange(len(meta)))
        wanted: list = [int(i) for i in ids]
        what = "'index'" if "index" in meta else "row number"
    else:
        if "path" not in meta:
            raise ValueError("latent ids are file paths but the meta has no 'path' column")
        keys = pd.Index(meta["path"].astype(str))
        wanted, what = ids, "'path'"
    if not keys.is_unique:
        raise ValueError(f"meta has duplicate {what} values; cannot join latents to it")
    pos = keys.get_indexer(wanted)
    if what == "'path'" and (pos < 0).any():
        absolute = keys.get_indexer([os.path.abspath(os.path.expanduser(i)) for i in ids])
        pos = np.where(pos < 0, absolute, pos)
    missing = [ids[i] for i in np.flatnonzero(pos < 0)]
    if missing:
        raise ValueError(f"{len(missing)} of {len(ids)} latent ids have no meta row (joined on "
                         f"{what}), e.g. {missing[:3]}; are latents and meta from the same "
                         "store?")
    return meta.iloc[pos].reset_index(drop=True)


def equals(values: pd.Series, target: object) -> np.ndarray:
    """Bool mask values == target; numeric when both are numbers, else case-insensitive text."""
    num = pd.to_numeric(values, errors="coerce")
    try:
        t = float(target)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        t = None
    if t is not None and num.notna().any():
        return (num == t).to_numpy(bool)
    text = values.astype(str).str.strip().str.upper()
    return (text == str(target).strip().upper()).to_numpy(bool)


def query_mask(df: pd.DataFrame, expr: str) -> np.ndarray:
    """Bool [len(df)] mask of the rows selected by `cxredit.data.sources.query`."""
    from cxredit.data.sources import query

    sub = query(df.reset_index(drop=True), expr)
    m = np.zeros(len(df), bool)
    m[sub.index.to_numpy()] = True
    return m


def select_classes(df: pd.DataFrame, column: str, positive: object = 1,
                   negative_query: str | None = None,
                   where: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Positive / negative masks over `df` rows.

    Args:
        df: meta rows (any index).
        column: label column, e.g. "Cardiomegaly".
        positive: value marking positives (column == positive).
        negative_query: pandas query for negatives, column names may contain spaces
            ("No Finding==1"); default column == 0.
        where: optional query restricting both classes ("view=='PA'").

    Returns:
        (pos [N] bool, neg [N] bool, description of the selection).
    """
    if column not in df.columns:
        raise ValueError(f"no column {column!r} in meta; available: {', '.join(map(str, df))}")
    base = query_mask(df, where) if where else np.ones(len(df), bool)
    pos = equals(df[column], positive) & base
    neg = (query_mask(df, negative_query) if negative_query else equals(df[column], 0)) & base
    desc = {"positive": f"{column} == {positive}",
            "negative": negative_query or f"{column} == 0", "where": where}
    both = pos & neg
    if both.any():
        raise ValueError(f"{int(both.sum())} images are both positive ({desc['positive']}) and "
                         f"negative ({desc['negative']}); make the negative query exclusive")
    for name, m in (("positive", pos), ("negative", neg)):
        if not m.any():
            raise ValueError(f"no {name} images ({desc[name]}"
                             f"{', where ' + where if where else ''}) among {len(df)} latents")
    return pos, neg, desc


def load_joined(latents: str | os.PathLike, meta: str | os.PathLike) -> dict:
    """Load latents and the meta rows of their ids.

    Returns:
        {"w": [N, ...] all latents, "ids": N ids, "info": latents sidecar,
         "meta": DataFrame of N rows aligned to ids}.
    """
    from cxredit.latent.io import load_latents

    w, ids, info, _ = load_latents(latents)
    made_from = (info.get("source") or {}).get("store")
    if made_from and Path(meta).is_dir() and Path(made_from).resolve() != Path(meta).resolve():
        # store rows are matched by number: another store's rows carry other people's labels
        log.warning("%s: these latents were made from the store %s, not %s; its labels are "
                    "used as given", latents, made_from, meta)
    return {"w": w, "ids": ids, "info": info, "meta": join_meta(ids, read_meta(meta))}


def labelled(joined: dict, column: str, positive: object = 1, negative_query: str | None = None,
             where: str | None = None) -> dict:
    """Select the two classes of `load_joined` output.

    Returns:
        {"w": [M, ...] selected latents, "labels": bool [M], "rows": int [M] positions in
         the latents file, "selection": description}.
    """
    pos, neg, desc = select_classes(joined["meta"], column, positive, negative_query, where)
    rows = np.flatnonzero(pos | neg)
    return {"w": joined["w"][rows], "labels": pos[rows], "rows": rows, "selection": desc}


def run_separability(latents_path: str | os.PathLike, meta_csv: str | os.PathLike,
                     column: str = "Cardiomegaly", positive: object = 1,
                     negative_query: str | None = None, where: str | None = None,
                     flatten: str = "mean", shrinkage: float | str | None = None,
                     folds: int = 5, seed: int = 0,
                     out_dir: str | os.PathLike | None = None) -> dict:
    """`cxredit separability`: latents + labels -> separability.json, separability.png and
    projections.csv (id, label, in-sample and held-out projection) in `out_dir`.

    Args:
        latents_path: latents `.npz` (ids = store rows or image paths).
        meta_csv: a store folder or its meta.csv (any csv with `index` or `path` + labels).
        column, positive, negative_query, where: class selection, see `select_classes`.
        flatten, shrinkage, folds, seed: see `separability`.
        out_dir: output folder (default: `<latents stem>_separability` next to the latents).

    Returns:
        The JSON document written (numbers, inputs, counts, settings, output paths).
    """
    latents_path = Path(latents_path)
    out = Path(out_dir) if out_dir is not None else \
        latents_path.with_name(latents_path.stem + "_separability")
    joined = load_joined(latents_path, meta_csv)
    data = labelled(joined, column, positive, negative_query, where)
    res = separability(data["w"], data["labels"], flatten, shrinkage, folds, seed)
    out.mkdir(parents=True, exist_ok=True)
    names = (data["selection"]["positive"], data["selection"]["negative"])
    title = (f"{column}: LDA separation {res['separation']:.2f} in-sample, "
             f"{res['separation_cv']:.2f} held-out")
    png = histogram_figure(res, out / "separability.png", title, names)
    ids = [joined["ids"][r] for r in data["rows"]]
    proj = pd.DataFrame({"id": ids, "positive": res["labels"].astype(int),
                         "projection": res["projections"],
                         "projection_cv": res["projections_cv"]})
    proj.to_csv(out / "projections.csv.tmp", index=False)
    os.replace(out / "projections.csv.tmp", out / "projections.csv")
    info = joined["info"]
    doc = {k: v for k, v in res.items()
           if k not in ("labels", "projections", "projections_cv", "direction")}
    doc.update({
        "inputs": {"latents": str(latents_path), "meta": str(meta_csv),
                   "generator": info.get("generator"), "space": info.get("space"),
                   "latents_method": info.get("method"), "latents_count": len(joined["ids"])},
        "query": {"column": column, "positive_value": positive, **data["selection"]},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cxredit": __version__,
        "outputs": {"json": str(out / "separability.json"), "png": str(png),
                    "projections": str(out / "projections.csv")},
    })
    tmp = out / "separability.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=lambda o: o.item()))  # numpy scalars
    os.replace(tmp, out / "separability.json")
    log.info("separation %.3f in-sample, %.3f held-out (AUC %.3f) on %d+%d images",
             res["separation"], res["separation_cv"], res["auc"],
             res["counts"]["positive"], res["counts"]["negative"])
    return doc
