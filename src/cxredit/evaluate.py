"""`cxredit evaluate`: every number of the paper's pipeline on one labelled store.

Given a weights bundle (or the runs behind one) and a store with a Cardiomegaly column, this
measures, in order, and writes `metrics.json` (schema: `cxredit.report`) plus figures:

1. generation: FID/KID of G's samples against the store, with the extractor named, next to
   the same metric between two halves of the store (the floor at this sample size);
2. reconstruction: G(E(I)) for every image, then optimisation started from E's guess for the
   first `n_project` healthy and `n_project` cardiomegaly images (per-image seeds);
3. separability: LDA on the encoder's latents (and the projections'), in-sample and
   cross-validated, with the histogram figure;
4. directions: the cosine matrix of the bundle's directions;
5. edits: `n_edit` healthy images (their projected latents) along one direction for a sweep
   of alphas, measured by `cxredit.metrics.edit` (CTR from the segmenter, identity outside the
   heart, P(cardiomegaly), the true counterfactual on phantoms, LEC);
6. the targets of the demo issue, met or not.

Alphas are given in units of sigma_v, the standard deviation of the evaluated latents along
the direction (w . v), so that one alpha grid fits directions and generators of any scale;
`edit.sigma_v` records the unit. The metrics file is rewritten after every stage, so an
interrupted run keeps what it finished; projection results are kept per batch and resumed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cxredit import __version__
from cxredit.bundle import Bundle

log = logging.getLogger(__name__)

DEFAULT_ALPHAS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
TARGETS = {  # name -> (metrics path, threshold): the demo issue's targets
    "cross-validated class separation (encoder latents)":
        (("separability", "encoder", "separation_cv"), 4.8),
    "healthy images pushed past CTR 0.5 with SSIM outside the heart >= 0.90":
        (("edit", "pushed_past_0_5"), 0.80),
    "encoder reconstruction SSIM": (("reconstruction", "encoder", "ssim"), 0.80),
    "projection reconstruction SSIM": (("reconstruction", "projection", "ssim"), 0.90),
}


def _finite(obj):
    """NaN/inf -> None (strict JSON, readable by browsers), recursively; numpy -> Python."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(doc), indent=2, allow_nan=False))
    os.replace(tmp, path)


def _means(metrics: dict[str, torch.Tensor], **extra) -> dict:
    return {**{k: float(v.float().mean()) for k, v in metrics.items()}, **extra}


def _model_record(bundle, name: str) -> dict:
    from cxredit.checkpoint import read_checkpoint_json

    comp = bundle.manifest["components"][name]
    state = read_checkpoint_json(bundle.path(name))["state"]
    cfg = next((state[k] for k in ("G_config", "E_config", "net_config") if k in state), None)
    return {"path": str(bundle.path(name)), "sha256": comp["sha256"],
            "source": comp.get("source"), "dtype": comp.get("dtype"), "config": cfg}


@torch.no_grad()
def _encode(E, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    dev = next(E.parameters()).device
    return torch.cat([E(x[s:s + batch].to(dev)).cpu() for s in range(0, len(x), batch)])


@torch.no_grad()
def _synth(G, w: torch.Tensor, batch: int = 64) -> torch.Tensor:
    dev = next(G.parameters()).device
    return torch.cat([G.synthesis(w[s:s + batch].to(dev), noise_mode="const").clamp(-1, 1).cpu()
                      for s in range(0, len(w), batch)])


def _project(G, x: torch.Tensor, init: torch.Tensor, rows: np.ndarray, steps: int,
             partial: Path, batch: int, progress: bool, space: str,
             noise: float, generator: str) -> torch.Tensor:
    """Projected latents of `x` (resumed from `partial`: finished batches are kept).

    `space` "w" gives [N, w_dim], "w+" [N, num_ws, w_dim]; `noise` is the projection's
    initial latent-noise factor; `generator` G's sha256. A partial file made with other
    settings or another G is ignored, and a finished row is reused only if it started from
    the same latent (so new encoder weights project again).
    """
    from tqdm.auto import tqdm

    from cxredit.latent.project import NOISE_FACTOR, project_images

    done: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # row -> (projection, its start)
    init_np = init.detach().cpu().numpy()
    if partial.exists():
        with np.load(partial) as z:
            same = (int(z["steps"]) == steps and str(z.get("space", "w")) == space
                    and float(z.get("noise", NOISE_FACTOR)) == noise
                    and str(z.get("generator", "")) == generator and "init" in z)
            if same:
                start = {int(r): i for r, i in zip(rows, init_np)}
                done = {r: (w, i) for r, w, i in zip(z["rows"].tolist(), z["w"], z["init"])
                        if r in start and np.array_equal(i, start[r])}
    dev = next(G.parameters()).device
    todo = [i for i, r in enumerate(rows) if int(r) not in done]
    for s in tqdm(range(0, len(todo), batch), disable=not progress, desc="project",
                  unit="batch"):
        idx = todo[s:s + batch]
        out = project_images(G, x[idx].to(dev), space=space, init=init[idx].to(dev),
                             steps=steps, initial_noise_factor=noise,
                             seeds=[int(rows[i]) for i in idx])
        done.update({int(rows[i]): (w, init_np[i])
                     for i, w in zip(idx, out["w"].cpu().numpy())})
        keys = sorted(done)
        tmp = partial.with_name(partial.stem + ".tmp.npz")
        np.savez(tmp, rows=np.asarray(keys), w=np.stack([done[k][0] for k in keys]),
                 init=np.stack([done[k][1] for k in keys]), steps=steps, space=space,
                 noise=noise, generator=generator)
        os.replace(tmp, partial)
    return torch.from_numpy(np.stack([done[int(r)][0] for r in rows]))


def evaluate(out: str | os.PathLike, data: str | os.PathLike,
             weights: str | os.PathLike | Bundle | None = None,
             split: str | None = None, query: str | None = None, limit: int | None = None,
             n_fid: int = 1000, n_project: int = 32, project_steps: int = 100,
             n_edit: int = 16, direction: str | None = None,
             alphas: tuple[float, ...] = DEFAULT_ALPHAS, device: str | None = None,
             progress: bool = True, command: str | list[str] | None = None,
             extra_directions: dict[str, tuple[np.ndarray, dict]] | None = None,
             metrics_name: str = "metrics.json", project_space: str = "w") -> dict:
    """Evaluate a bundle on a labelled store; the API of `cxredit evaluate`.

    Every stage whose models are present runs: without an encoder, projection starts from
    G's mean w and separability uses the projections; without a segmenter or a direction the
    edit stage is skipped; FID/KID uses the classifier's features, else the encoder's, else it
    is skipped (no in-domain extractor). Skipped stages are simply absent from the metrics.

    Args:
        out: folder for the metrics file, figures and latents.
        data: store with a Cardiomegaly column (1 / 0; other values are left out).
        weights: bundle folder (`cxredit export-bundle`, `cxredit make-weights`) or a `Bundle`
            (e.g. from `assemble_bundle` over training runs).
        split, query, limit: which store rows to use.
        n_fid: at most this many real and generated images for FID/KID (0: skip).
        n_project: images per class projected by optimisation (0: skip).
        project_steps: optimisation steps per image.
        project_space: "w" (the paper's latents) or "w+" (one w per layer: closer
            reconstructions; separability then uses each image's mean over layers, and the
            edit adds the direction to every layer). A projection started from the encoder
            adds no latent noise (it refines a good start); from mean w it explores with the
            default noise.
        n_edit: healthy images edited.
        direction: direction to edit along (None: "pair" if present, else the first).
        alphas: edit strengths in units of sigma_v (see module doc).
        device: torch device (None: cuda when available).
        progress: tqdm bars.
        command: recorded in the metrics (default: this process's argv).
        extra_directions: name -> (v, sidecar) added to the bundle's directions (e.g. one
            the caller fitted on the spot); a sidecar "file" entry is listed as its file.
        metrics_name: file name of the metrics inside `out`.

    Returns:
        The metrics dict (also written to `out/metrics_name`).
    """
    from cxredit.bundle import load_bundle
    from cxredit.data.store import ImageStore
    from cxredit.generate import provenance
    from cxredit.latent.directions import cosine
    from cxredit.latent.edit import check_direction
    from cxredit.latent.project import NOISE_FACTOR
    from cxredit.latent.separability import histogram_figure, separability
    from cxredit.metrics.features import get_extractor
    from cxredit.metrics.fid import compare_sets
    from cxredit.metrics.recon import recon_metrics
    from cxredit.report.figures import ctr_alpha_figure
    from cxredit.runs import save_image_grid

    t0 = time.time()
    for name, n in (("n_fid", n_fid), ("n_project", n_project), ("n_edit", n_edit),
                    ("project_steps", project_steps)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0 (0 skips that part), got {n}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if weights is None:
        raise ValueError("give a weights bundle (or the runs behind one)")
    b = weights if isinstance(weights, Bundle) else load_bundle(weights, dev)
    files = {n: d["file"] for n, d in b.manifest.get("directions", {}).items()}
    for name, (v_extra, info_extra) in (extra_directions or {}).items():
        v_extra = np.asarray(v_extra, np.float32)
        check_direction(v_extra, b.G.num_ws, b.G.w_dim, info_extra.get("file", name))
        b.directions[name] = (v_extra, info_extra)
        files[name] = info_extra.get("file")
    if direction is None and b.directions:
        direction = "pair" if "pair" in b.directions else next(iter(b.directions))
    if direction is not None and direction not in b.directions:
        raise ValueError(f"no direction {direction!r}; there are "
                         f"{', '.join(b.directions) or 'none'}")
    st = ImageStore(data)
    if st.resolution != b.resolution:
        raise ValueError(f"{data}: store is {st.resolution} px, the generator {b.resolution} px")
    if "Cardiomegaly" not in st.meta.columns:
        raise ValueError(f"{data}: the store has no Cardiomegaly column")
    if project_space not in ("w", "w+"):
        raise ValueError(f"project_space must be 'w' or 'w+', got {project_space!r}")
    rows = st.select(split, query)[:limit]
    lab = st.meta["Cardiomegaly"].to_numpy(float)[rows]
    rows, lab = rows[np.isin(lab, (0, 1))], lab[np.isin(lab, (0, 1))].astype(bool)
    if lab.all() or not lab.any():
        raise ValueError(f"{data}: evaluation needs both healthy (0) and cardiomegaly (1) rows")
    phantom = st.info.get("source") == "phantom"
    x = st.tensor(rows)
    m: dict = {"format": "cxredit.metrics", "format_version": 1,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "command": command if command is not None else sys.argv,
               "cxredit_version": __version__,
               "models": {k: _model_record(b, k) for k in b.manifest["components"]},
               "weights": str(weights) if not isinstance(weights, Bundle) else None,
               "data": {"store": str(data), "split": split, "query": query, "n": int(len(rows)),
                        "n_healthy": int((~lab).sum()), "n_cardiomegaly": int(lab.sum()),
                        "phantom": phantom, "resolution": st.resolution},
               "figures": {}, "skipped": {}}
    mpath = out / metrics_name
    _write_json(mpath, m)
    gen_sha = b.generator_sha256

    # -- figures of real images and samples
    show = np.concatenate([np.flatnonzero(~lab)[:8], np.flatnonzero(lab)[:8]])
    save_image_grid(x[show], out / "real.png", nrow=8)
    with torch.no_grad():
        z = torch.randn(16, b.G.z_dim, generator=torch.Generator().manual_seed(0))
        samples = b.G(z.to(dev), noise_mode="const").clamp(-1, 1).cpu()
    save_image_grid(samples, out / "samples.png", nrow=8,
                    provenance=provenance(gen_sha, "generated sample"))
    m["figures"].update(real="real.png", samples="samples.png")

    # -- 1. generation
    ex = (get_extractor("classifier", classifier=b.classifier, device=dev)
          if b.classifier is not None else
          get_extractor("encoder", encoder=b.E, device=dev) if b.E is not None else None)
    if n_fid > 0 and ex is None:
        m["skipped"]["generation"] = "no in-domain feature extractor (classifier or encoder)"
    elif n_fid > 0:
        half = min(n_fid, len(x) // 2)
        perm = np.random.default_rng(0).permutation(len(x))
        real_a, real_b = x[perm[:half]], x[perm[half:2 * half]]
        gz = torch.randn(half, b.G.z_dim, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            fake = torch.cat([b.G(gz[s:s + 64].to(dev), noise_mode="const").clamp(-1, 1).cpu()
                              for s in range(0, half, 64)])
        kw = dict(kid_subset_size=min(1000, max(2, half // 2)), kid_subsets=50)  # subsets vary
        gen = compare_sets(real_a, fake, ex, **kw)
        base = compare_sets(real_a, real_b, ex, **kw)
        m["generation"] = {"extractor": gen["extractor"], "fid": gen["fid"],
                           "kid": gen["kid_mean"], "kid_std": gen["kid_std"], "n_real": half,
                           "n_fake": half, "baseline_fid": base["fid"],
                           "baseline_kid": base["kid_mean"]}
        _write_json(mpath, m)
        log.info("evaluate: FID %.2f (real-vs-real %.2f, %s features)", gen["fid"], base["fid"],
                 gen["extractor"])

    # -- 2. reconstruction
    m["reconstruction"] = {}
    w_enc = rec_enc = None
    if b.E is not None:
        w_enc = _encode(b.E, x)
        rec_enc = _synth(b.G, w_enc)
        m["reconstruction"]["encoder"] = _means(recon_metrics(rec_enc, x), n=len(x))
        _write_json(mpath, m)
    proj_idx = np.concatenate([np.flatnonzero(~lab)[:max(n_project, n_edit)],
                               np.flatnonzero(lab)[:n_project]]) if n_project > 0 else \
        np.zeros(0, np.int64)
    w_proj = None
    if n_project == 0:
        m["skipped"]["projection"] = "n_project is 0"
    if len(proj_idx):
        init = w_enc[proj_idx] if w_enc is not None else \
            b.G.mapping.w_avg.detach().cpu().expand(len(proj_idx), -1)
        noise = 0.0 if w_enc is not None else NOISE_FACTOR
        w_proj = _project(b.G, x[proj_idx], init, rows[proj_idx], project_steps,
                          out / "projection.partial.npz", 16, progress, project_space, noise,
                          b.generator_sha256)
        rec_proj = _synth(b.G, w_proj)
        m["reconstruction"]["projection"] = _means(
            recon_metrics(rec_proj, x[proj_idx]), n=len(proj_idx), steps=project_steps,
            init="encoder" if w_enc is not None else "mean w", space=project_space,
            latent_noise=noise)
        k = min(8, len(proj_idx))
        pick = proj_idx[:k]
        cols = [x[pick]] + ([rec_enc[pick]] if rec_enc is not None else []) + [rec_proj[:k]]
        save_image_grid(torch.stack(cols, 1).flatten(0, 1), out / "reconstructions.png",
                        nrow=len(cols),
                        provenance=provenance(gen_sha, "reconstructions (columns: real, "
                                                       "encoder, optimisation)"))
        m["figures"]["reconstructions"] = "reconstructions.png"
    _write_json(mpath, m)

    # -- 3. separability
    m["separability"] = {}
    scalars = lambda r: {k: v for k, v in r.items() if isinstance(v, (int, float))}  # noqa: E731
    spaces = []
    if w_enc is not None:
        spaces.append(("encoder", w_enc, lab))
    if w_proj is not None and lab[proj_idx].sum() >= 5 and (~lab[proj_idx]).sum() >= 5:
        spaces.append(("projection", w_proj, lab[proj_idx]))
    for i, (name, w_s, y_s) in enumerate(spaces):
        sep = separability(w_s.numpy(), y_s, shrinkage="auto")  # W+: mean over layers
        m["separability"][name] = {**scalars(sep), "n_pos": int(y_s.sum()),
                                   "n_neg": int((~y_s).sum()),
                                   "latent": "W+ mean over layers" if w_s.ndim == 3 else "W"}
        if i == 0:
            histogram_figure(sep, out / "separability.png", title=f"LDA of {name} latents",
                             class_names=("cardiomegaly", "healthy"))
            m["figures"]["separability_histogram"] = "separability.png"
    truth = st.meta["ctr"].to_numpy(float)[rows] if phantom and "ctr" in st.meta else None
    if truth is not None and np.isfinite(truth).all() and spaces:
        # the same measure on the phantoms' ground-truth CTR, the quantity behind the labels:
        # what a latent axis that encoded heart size exactly (and linearly) would reach
        sep = separability(truth[:, None], lab, shrinkage="auto")
        m["separability"]["true_ctr"] = {**scalars(sep), "n_pos": int(lab.sum()),
                                         "n_neg": int((~lab).sum()),
                                         "latent": "ground-truth CTR (phantoms)"}
    _write_json(mpath, m)

    # -- 4. directions
    names = list(b.directions)
    if names:
        m["directions"] = {"names": names,
                           "cosine": [[cosine(b.directions[a][0], b.directions[c][0])
                                       for c in names] for a in names],
                           "files": {n: files.get(n) for n in names}}

    # -- 5. edits of healthy images (projected latents when available)
    if direction is None or b.segmenter is None or (w_proj is None and w_enc is None):
        m["skipped"]["edit"] = "needs a direction, a segmenter and latents (encoder or projection)"
    elif n_edit == 0:
        m["skipped"]["edit"] = "n_edit is 0"
    else:
        healthy = np.flatnonzero(~lab)[:n_edit]
        if w_proj is not None:
            pos = {int(i): j for j, i in enumerate(proj_idx)}
            w_edit = torch.stack([w_proj[pos[int(i)]] for i in healthy])
            pool = w_proj
        else:
            w_edit, pool = w_enc[healthy], w_enc
        truth = None
        if phantom:
            meta = st.meta.iloc[rows[healthy]]
            truth = {"subject_seed": meta["subject_seed"].to_numpy(),
                     "cardiomegaly": meta["Cardiomegaly"].to_numpy() == 1,
                     "device_probs": st.info.get("phantom", {}).get("device_probs",
                                                                    (0.05, 0.3))}
        w_lec = w_enc[healthy] if w_enc is not None else None
        m["edit"] = _edits(b, w_edit, pool, direction, alphas, truth, out, gen_sha, w_lec)
        m["edit"]["latents"] = "projection" if w_proj is not None else "encoder"
        m["figures"].update(edit_sweep="edit_sweep.png", ctr_vs_alpha="ctr_vs_alpha.png")
        ctr_alpha_figure(m["edit"], out / "ctr_vs_alpha.png")

    # -- 6. targets
    m["targets"] = []
    for name, (path, thr) in TARGETS.items():
        val = m
        for key in path:
            val = val.get(key) if isinstance(val, dict) else None
        ok = val is not None and np.isfinite(val)
        m["targets"].append({"name": name, "value": float(val) if ok else None,
                             "target": f">= {thr:g}",
                             "met": bool(val >= thr) if ok else None})  # None: not measured
    m["seconds"] = round(time.time() - t0, 1)
    _write_json(mpath, m)
    return m


def _edits(b, w_edit: torch.Tensor, pool: torch.Tensor, direction: str,
           alphas: tuple[float, ...], truth: dict | None, out: Path, gen_sha: str,
           w_lec: torch.Tensor | None = None) -> dict:
    """The "edit" section: sweep along `direction` (+ summaries along every other one).

    LEC re-encodes edits, so it starts from the encoder's latents `w_lec` of the same images
    (None: `w_edit`).
    """
    from cxredit.latent.directions import sigma_along
    from cxredit.latent.edit import edit_provenance
    from cxredit.metrics.edit import edit_sweep, latent_editing_consistency, summarize_sweep
    from cxredit.runs import save_image_grid

    v_np, v_info = b.directions[direction]
    v = torch.from_numpy(v_np)
    sigma_v = sigma_along(pool.numpy(), v_np)
    raw = [a * sigma_v for a in alphas]
    sweep = edit_sweep(b.G, w_edit, v, raw, b.segmenter, b.classifier, truth=truth,
                       keep_images=min(8, len(w_edit)))
    edit = summarize_sweep(sweep)
    edit["alphas_raw"] = edit["alphas"]
    edit["alphas"] = [a / sigma_v for a in edit["alphas_raw"]]
    edit.update(direction=direction, direction_method=v_info.get("method"), sigma_v=sigma_v,
                alpha_unit="sigma_v")
    edit["compare"] = {}
    for name, (v_other, _) in b.directions.items():  # the same sweep along every direction
        if name == direction:  # (W and W+ directions mix: apply_direction broadcasts)
            continue
        vo = torch.from_numpy(v_other)
        so = sigma_along(pool.numpy(), v_other)
        sm = summarize_sweep(edit_sweep(b.G, w_edit, vo, [a * so for a in alphas], b.segmenter))
        edit["compare"][name] = {"pushed_past_0_5": sm["pushed_past_0_5"], "sigma_v": so,
                                 "ctr_mean": sm["ctr_mean"],
                                 "ssim_outside_heart": sm["ssim_outside_heart"]}
    if b.E is not None:
        edit["lec"] = latent_editing_consistency(b.G, b.E, w_edit if w_lec is None else w_lec,
                                                 v, max(raw))
        edit["lec"]["alpha"] = max(alphas)
    imgs = sweep["images"]
    save_image_grid(imgs.flatten(0, 1), out / "edit_sweep.png", nrow=imgs.shape[1],
                    provenance=edit_provenance(
                        "sweep", direction, ",".join(f"{a:g} sigma" for a in alphas), gen_sha,
                        v_info))
    return edit
