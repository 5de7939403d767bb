"""Disease directions in latent space: pair, LDA, SVM, mean difference, and conditional ones.

A direction `v` is a unit vector with the shape of one latent: [w_dim] (W) or [num_ws, w_dim]
(W+; flattened for the fit and reshaped back, and normalised over all its entries). Editing
moves a latent along it: w' = w + alpha * v. Every fitted direction is oriented so that
positives (the disease) project higher than negatives.

- ``pair``: the paper's direction, v = normalize(E(I*) - E(I)) for an image I and its
  counterfactual I* (e.g. the same chest with an enlarged heart); with several pairs the
  normalised differences are averaged, so no single pair dominates by its length.
- ``lda``: the LDA discriminant Sigma_w^-1 (m+ - m-) (optionally shrunk, Ledoit-Wolf).
- ``svm``: the normal of a linear SVM (InterFaceGAN). Fitted on *centred but unscaled*
  latents: standardising each coordinate would give the normal of another space; centring
  only moves the intercept and keeps the intercept penalty of liblinear from tilting it.
  Classes are weighted "balanced" because disease labels are usually rare.
- ``mean``: the difference of class means (the LDA direction for isotropic noise).
- ``conditional``: a direction with the span of confounder directions (sex, support devices,
  ...) projected out (InterFaceGAN's conditional manipulation, for any number of conditions).

Files: `.npz` with `v` + JSON sidecar (method, inputs, date, generator sha256, space, version),
both written atomically, like latents (`cxredit.latent.io`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxredit import __version__
from cxredit.latent.io import read_sidecar, sidecar_path
from cxredit.latent.separability import (
    check_labels,
    equals,
    fit_lda,
    labelled,
    load_joined,
    parse_shrinkage,
    query_mask,
    separation,
)

log = logging.getLogger(__name__)

METHODS = ("pair", "lda", "svm", "mean")
DIRECTION_FORMAT_VERSION = 1


def _flat(w: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """[N, *S] latents -> ([N, prod(S)] float64, S) with S = (w_dim,) or (num_ws, w_dim)."""
    w = np.asarray(w, np.float64)
    if w.ndim not in (2, 3):
        raise ValueError(f"latents must be [N, w_dim] or [N, num_ws, w_dim], got {list(w.shape)}")
    if not np.isfinite(w).all():
        raise ValueError("latents contain NaN or inf")
    return w.reshape(len(w), -1), tuple(w.shape[1:])


def _unit(v: np.ndarray, what: str = "direction") -> np.ndarray:
    v = np.asarray(v, np.float64)
    n = float(np.linalg.norm(v))
    if not np.isfinite(n) or n < 1e-12:
        raise ValueError(f"{what} is zero or not finite")
    return v / n


def _oriented(v: np.ndarray, X: np.ndarray, y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Unit v [D] flipped so positives project higher, reshaped to one latent's shape."""
    v = _unit(v)
    p = X @ v
    if p[y].mean() < p[~y].mean():
        v = -v
    return v.reshape(shape)


def pair_direction(w_I: np.ndarray, w_Istar: np.ndarray) -> np.ndarray:
    """v = normalize(mean_k normalize(w_Istar[k] - w_I[k])).

    Args:
        w_I: [K, w_dim] or [K, num_ws, w_dim] latents of the originals (K >= 1).
        w_Istar: same shape, latents of their counterfactuals (the disease side).

    Returns:
        Unit v of shape [w_dim] or [num_ws, w_dim].
    """
    a, shape = _flat(w_I)
    b, shape_b = _flat(w_Istar)
    if a.shape != b.shape:
        raise ValueError(f"pair latents differ in shape: {[len(a), *shape]} vs "
                         f"{[len(b), *shape_b]}")
    d = b - a
    norms = np.linalg.norm(d, axis=1)
    if (norms < 1e-12).any():
        raise ValueError(f"pair(s) {np.flatnonzero(norms < 1e-12)[:5].tolist()} have identical "
                         "latents for I and I*")
    return _unit((d / norms[:, None]).mean(0), "mean of the pair differences").reshape(shape)


def mean_direction(w: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Difference of class means, normalised. w: [N, ...]; labels: bool [N]. Returns [...]."""
    X, shape = _flat(w)
    y = check_labels(labels, len(X))
    return _oriented(X[y].mean(0) - X[~y].mean(0), X, y, shape)


def lda_direction(w: np.ndarray, labels: np.ndarray,
                  shrinkage: float | str | None = None) -> np.ndarray:
    """LDA discriminant direction (scikit-learn; svd solver, lsqr with shrinkage).

    Args:
        w: [N, w_dim] or [N, num_ws, w_dim]; labels: bool [N] (True = positive).
        shrinkage: None, "auto" (Ledoit-Wolf) or a float in [0, 1]. Plain LDA in N <= D
            (e.g. W+ flattened) is mostly noise; use shrinkage there.

    Returns:
        Unit vector of one latent's shape.
    """
    X, shape = _flat(w)
    y = check_labels(labels, len(X))
    lda, deficient = fit_lda(X, y, shrinkage)
    if deficient:
        log.warning("LDA direction from %d latents in %d dimensions without shrinkage: the "
                    "covariance is singular and the direction over-fits; try shrinkage='auto'",
                    len(X), X.shape[1])
    return _oriented(lda.coef_[0], X, y, shape)


def svm_direction(w: np.ndarray, labels: np.ndarray, C: float = 1.0) -> np.ndarray:
    """Normal of a linear SVM (scikit-learn `LinearSVC`, balanced class weights) in W units.

    Args:
        w: [N, w_dim] or [N, num_ws, w_dim]; labels: bool [N] (True = positive).
        C: inverse regularisation strength.

    Returns:
        Unit vector of one latent's shape.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    if not (math.isfinite(C) and C > 0):
        raise ValueError(f"--C (SVM regularisation) must be a positive number, got {C}")
    X, shape = _flat(w)
    y = check_labels(labels, len(X))
    svm = LinearSVC(C=float(C), class_weight="balanced", max_iter=20000, random_state=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svm.fit(X - X.mean(0), y)
    if any(issubclass(c.category, ConvergenceWarning) for c in caught):
        log.warning("LinearSVC did not converge (C=%g); try a smaller C", C)
    return _oriented(svm.coef_[0], X, y, shape)


def conditional_direction(v: np.ndarray, conditions: Sequence[np.ndarray]) -> np.ndarray:
    """Project the span of `conditions` out of `v` and renormalise.

    Args:
        v: primary direction, [w_dim] or [num_ws, w_dim].
        conditions: directions of the same shape (need not be orthogonal to each other).

    Returns:
        Unit v' orthogonal to every condition (v' . v > 0).

    Raises:
        ValueError: shapes differ, a condition is zero, or v lies in their span.
    """
    v = np.asarray(v, np.float64)
    shape = v.shape
    vf = _unit(v.ravel(), "primary direction")
    if not len(conditions):
        return vf.reshape(shape)
    rows = []
    for i, c in enumerate(conditions):
        c = np.asarray(c, np.float64)
        if c.shape != shape:
            raise ValueError(f"condition {i} has shape {list(c.shape)}, expected {list(shape)}")
        rows.append(_unit(c.ravel(), f"condition {i}"))
    # Orthonormal basis of the span by SVD (tolerates dependent conditions).
    _, s, vt = np.linalg.svd(np.stack(rows), full_matrices=False)
    basis = vt[s > s[0] * 1e-10]
    out = vf
    for _ in range(2):  # twice is enough (Kahan): restores orthogonality lost to rounding
        out = out - basis.T @ (basis @ out)
    if np.linalg.norm(out) < 1e-6:
        raise ValueError("the primary direction lies in the span of the condition directions; "
                         "nothing is left after projecting them out")
    return _unit(out).reshape(shape)


def sigma_along(latents, v) -> float:
    """Std of `latents` [N, w_dim] or [N, num_ws, w_dim] along the unit direction `v`.

    The natural unit of edit strengths. W+ latents against a W direction [w_dim] are taken
    by their mean over layers (the edit adds v to every layer).
    """
    w, v = np.asarray(latents, np.float64), np.asarray(v, np.float64)
    if w.ndim == 3 and v.ndim == 1:
        w = w.mean(1)
    return float((w.reshape(len(w), -1) @ v.reshape(-1)).std())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two directions (flattened).

    A W direction [w_dim] against a W+ one [num_ws, w_dim] is taken as the W+ displacement it
    makes, v on every layer (see `cxredit.latent.edit.apply_direction`).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim == 1 and b.ndim == 2 and a.shape[0] == b.shape[1]:
        a = np.broadcast_to(a, b.shape)
    elif b.ndim == 1 and a.ndim == 2 and b.shape[0] == a.shape[1]:
        b = np.broadcast_to(b, a.shape)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare directions of shapes {list(a.shape)} and "
                         f"{list(b.shape)}")
    return float(_unit(a.ravel()) @ _unit(b.ravel()))


# ----------------------------------------------------------------------------- files

def save_direction(path: str | os.PathLike, v: np.ndarray, info: dict) -> Path:
    """Write a direction `.npz` (`v`, float32, normalised) and its JSON sidecar atomically.

    Args:
        path: `.npz` file.
        v: [w_dim] or [num_ws, w_dim], non-zero.
        info: sidecar fields; must contain "method"; "inputs" and "generator"
            ({"path", "sha256"}) are recorded as given (None when absent).
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: directions must be written to a .npz file")
    if "method" not in info:
        raise ValueError(f"{path}: direction info needs a 'method'")
    v = np.asarray(v, np.float64)
    if v.ndim not in (1, 2):
        raise ValueError(f"v must be [w_dim] or [num_ws, w_dim], got {list(v.shape)}")
    v = _unit(v).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, v=v)
    os.replace(tmp, path)
    side = {"format": "cxredit.direction", "format_version": DIRECTION_FORMAT_VERSION,
            "space": "w" if v.ndim == 1 else "w+", "shape": list(v.shape),
            "w_dim": int(v.shape[-1]), "num_ws": int(v.shape[0]) if v.ndim == 2 else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cxredit": __version__,
            "inputs": None, "generator": None, **info}
    stmp = sidecar_path(path).with_suffix(".json.tmp")
    stmp.write_text(json.dumps(side, indent=2, default=str))
    os.replace(stmp, sidecar_path(path))
    return path


def load_direction(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read a direction file. Returns (unit v float32 [w_dim] or [num_ws, w_dim], sidecar)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: direction file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            v = z["v"] if "v" in z.files else None
    except Exception as e:  # noqa: BLE001 - numpy raises several types for bad files
        raise ValueError(f"{path}: not a readable .npz ({e})") from None
    if v is None:
        raise ValueError(f"{path}: not a cxredit direction (no 'v')")
    if v.ndim not in (1, 2) or not np.isfinite(v).all() or \
            abs(float(np.linalg.norm(v.astype(np.float64))) - 1) > 1e-4:
        raise ValueError(f"{path}: 'v' is not a finite unit vector of shape [w_dim] or "
                         f"[num_ws, w_dim] (shape {list(v.shape)})")
    return v.astype(np.float32), read_sidecar(path)


def compare(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """Cosine matrix [n, n] of direction files (`cxredit direction compare a.npz b.npz`).
    Warns when the files come from different generators (their cosines mean little)."""
    loaded = [load_direction(p) for p in paths]
    shas = {(info.get("generator") or {}).get("sha256") for _, info in loaded} - {None}
    if len(shas) > 1:
        log.warning("directions come from %d different generators; cosines across generators "
                    "are not meaningful", len(shas))
    n = len(loaded)
    m = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            try:
                m[i, j] = m[j, i] = cosine(loaded[i][0], loaded[j][0])
            except ValueError as e:
                raise ValueError(f"{paths[i]} vs {paths[j]}: {e}") from None
    return m


def format_compare(paths: Sequence[str | os.PathLike], matrix: np.ndarray | None = None) -> str:
    """The cosine matrix as a text table (rows/columns named by file stem)."""
    m = compare(paths) if matrix is None else matrix
    names = [Path(p).stem for p in paths]
    width = max(8, *(len(s) for s in names))
    head = " " * width + "".join(f"{s:>{width + 1}}" for s in names)
    lines = [head] + [f"{names[i]:<{width}}" + "".join(f"{x:>{width + 1}.3f}" for x in m[i])
                      for i in range(len(names))]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI entry

def _fit(method: str, w: np.ndarray, y: np.ndarray, shrinkage: float | str | None,
         C: float) -> np.ndarray:
    if method == "lda":
        return lda_direction(w, y, shrinkage)
    if method == "svm":
        return svm_direction(w, y, C)
    if method == "mean":
        return mean_direction(w, y)
    raise ValueError(f"method must be one of lda, svm, mean here, got {method!r}")


def condition_labels(values, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(defined [N] bool, positive [N] bool) of a condition column: "sex" M/F -> 1/0,
    otherwise 1 / 0 (uncertain -1 and missing values are left out)."""
    if column == "sex":
        pos, neg = equals(values, "M"), equals(values, "F")
    else:
        pos, neg = equals(values, 1), equals(values, 0)
    if not pos.any() or not neg.any():
        raise ValueError(f"condition {column!r} needs both classes among the latents "
                         f"({'M/F' if column == 'sex' else '1/0'} values); got "
                         f"{int(pos.sum())} and {int(neg.sum())}")
    return pos | neg, pos


def _file_ref(path: str | os.PathLike) -> dict:
    from cxredit.checkpoint import sha256_file

    return {"path": str(path), "sha256": sha256_file(path)}


def make_direction(method: str, latents: str | os.PathLike | None = None,
                   meta: str | os.PathLike | None = None, column: str = "Cardiomegaly",
                   positive: object = 1, negative_query: str | None = None,
                   where: str | None = None, conditions: Sequence[str] | None = None,
                   condition_method: str | None = None,
                   pairs: Sequence[str | os.PathLike] | None = None,
                   shrinkage: float | str | None = None, C: float = 1.0,
                   out: str | os.PathLike = "direction.npz") -> dict:
    """`cxredit direction`: fit a direction from latent files and write it.

    Args:
        method: "pair", "lda", "svm" or "mean".
        latents: latents `.npz` (ids = store rows or paths); labelled methods and conditions.
        meta: store folder or meta.csv matching the latents.
        column, positive, negative_query, where: classes, see
            `cxredit.latent.separability.select_classes`.
        conditions: meta columns whose own directions are projected out (e.g. ["sex",
            "Support Devices"]); each fitted on all latents with that label defined
            (sex: M = 1, F = 0; others: 1 vs 0).
        condition_method: how condition directions are fitted (default: `method`, or "mean"
            for method "pair").
        pairs: (latents of I, latents of I*) for "pair": matched by id when both files hold
            the same ids, else by position.
        shrinkage: LDA shrinkage (None, "auto", float). C: SVM regularisation.
        out: direction `.npz`.

    Returns:
        Summary: out, method, space, shape, generator, counts, conditions (with the cosine of
        each to the primary before projection), cosine_unconditioned (v' . v), and, when
        labelled latents are given, "separation" and "gap" (in-sample class separation and
        mean projection difference, in W units, along the final direction).
    """
    method = str(method).lower()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    shrinkage = parse_shrinkage(shrinkage)
    conditions = list(conditions or [])
    if (method != "pair" or conditions) and (latents is None or meta is None):
        raise ValueError(f"method {method!r}{' with conditions' if conditions else ''} needs "
                         "latents and meta (labels)")
    inputs: dict = {"column": column, "positive": positive, "negative_query": negative_query,
                    "where": where, "shrinkage": shrinkage, "C": C}
    joined = data = generator = None
    if latents is not None and meta is not None:
        joined = load_joined(latents, meta)
        missing = [c for c in conditions if c not in joined["meta"].columns]
        if missing:
            raise ValueError(f"condition(s) {missing} are not meta columns")
        generator = joined["info"].get("generator")
        inputs.update(latents=_file_ref(latents), meta=str(meta))
        try:
            data = labelled(joined, column, positive, negative_query, where)
        except ValueError:
            if method != "pair":
                raise
            log.info("no %s classes among the labelled latents: summary numbers skipped", column)
    if method == "pair":
        v, pair_gen, inputs["pairs"] = _pairs(pairs)
        if generator and pair_gen and generator.get("sha256") != pair_gen.get("sha256"):
            raise ValueError("the pairs and the labelled latents come from different generators")
        generator = pair_gen or generator
    else:
        v = _fit(method, data["w"], data["labels"], shrinkage, C)
    cond_method = condition_method or ("mean" if method == "pair" else method)
    v0, cond_vs, cond_info = v, [], []
    for col in conditions:
        defined, pos = condition_labels(joined["meta"][col], col)
        if where:
            defined &= query_mask(joined["meta"], where)
        c = _fit(cond_method, joined["w"][defined], pos[defined], shrinkage, C)
        cond_vs.append(c)
        cond_info.append({"column": col, "method": cond_method,
                          "positive": int((defined & pos).sum()),
                          "negative": int((defined & ~pos).sum()),
                          "cosine_with_primary": cosine(v0, c)})
    v = conditional_direction(v0, cond_vs)
    summary: dict = {"method": method, "space": "w" if v.ndim == 1 else "w+",
                     "shape": list(v.shape), "generator": generator, "conditions": cond_info,
                     "cosine_unconditioned": cosine(v0, v)}
    if data is not None:
        X, shape = _flat(data["w"])
        if shape != v.shape:
            raise ValueError(f"latents of shape {list(shape)} do not match the direction "
                             f"{list(v.shape)}")
        y = data["labels"]
        p = X @ v.ravel()
        summary.update(counts={"positive": int(y.sum()), "negative": int((~y).sum())},
                       separation=separation(p[y], p[~y]), gap=float(p[y].mean() - p[~y].mean()))
        inputs["counts"] = summary["counts"]
    path = save_direction(out, v, {"method": method, "conditions": cond_info, "inputs": inputs,
                                   "generator": generator})
    summary["out"] = str(path)
    log.info("%s direction written to %s", method, path)
    return summary


def _pairs(pairs: Sequence[str | os.PathLike] | None) -> tuple[np.ndarray, dict | None, list]:
    """Pair direction from (latents of I, latents of I*) files: (v, generator, file refs)."""
    from cxredit.latent.io import load_latents

    if not pairs or len(pairs) != 2:
        raise ValueError("method 'pair' needs pairs=(latents of I, latents of I*)")
    (wa, ia, info_a, _), (wb, ib, info_b, _) = load_latents(pairs[0]), load_latents(pairs[1])
    if len(ia) != len(ib):
        raise ValueError(f"pair files hold {len(ia)} and {len(ib)} latents; they must match")
    if ia != ib and sorted(ia) == sorted(ib):  # same images in another order: match by id
        order = {k: i for i, k in enumerate(ib)}
        wb = wb[[order[k] for k in ia]]
    gens = [i.get("generator") or {} for i in (info_a, info_b)]
    if gens[0].get("sha256") and gens[1].get("sha256") and \
            gens[0]["sha256"] != gens[1]["sha256"]:
        raise ValueError("the I and I* latents come from different generators")
    return pair_direction(wa, wb), gens[0] or gens[1] or None, [_file_ref(p) for p in pairs]


def pair_latents_from_images(image_pairs: Sequence[str], latents_from: str, out_dir: str | Path,
                             encoder: str | None = None, gan: str | None = None,
                             steps: int = 500, space: str = "w", device: str | None = None,
                             progress: bool = True) -> tuple[Path, Path]:
    """Latents of the images I and I* of the paper's pair method, by encoder or projection.

    Args:
        image_pairs: I_1, I*_1, I_2, I*_2, ... (image files).
        latents_from: "encoder" (E(I), fast) or "project" (optimisation started from E(I)
            when an encoder is given, else from the mean w).
        out_dir: where `pairs_I.npz` and `pairs_Istar.npz` are written (kept: they document
            the direction).
        encoder, gan: encoder run (needed for "encoder") and GAN run (needed for "project").
        steps, space: projection settings.

    Returns:
        Paths of the two latents files (rows in pair order), ready for `make_direction`.
    """
    if len(image_pairs) < 2 or len(image_pairs) % 2:
        raise ValueError("--image-pairs needs pairs: I1 I1* [I2 I2* ...]")
    if latents_from not in ("encoder", "project"):
        raise ValueError(f"--latents-from must be encoder or project, got {latents_from!r}")
    if latents_from == "encoder" and not encoder:
        raise ValueError("--latents-from encoder needs --encoder")
    if latents_from == "project" and not gan:
        raise ValueError("--latents-from project needs --gan")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, imgs in (("pairs_I", image_pairs[0::2]), ("pairs_Istar", image_pairs[1::2])):
        out = out_dir / f"{name}.npz"
        if latents_from == "encoder":
            from cxredit.latent.invert import invert

            invert(encoder, out, images=list(imgs), gan=gan, metrics=gan is not None,
                   device=device, progress=progress)
        else:
            from cxredit.latent.project import project

            project(gan, out, images=list(imgs), space=space,
                    init="encoder" if encoder else "mean", encoder=encoder, steps=steps,
                    device=device, progress=progress)
        paths.append(out)
    return paths[0], paths[1]
