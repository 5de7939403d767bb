"""`cxredit demo`: the paper's experiment on built-in phantoms with the shipped weights.

1. Renders a fresh phantom test set (subject seeds disjoint from every training seed): 100
   healthy and 250 cardiomegaly images by default, as in the paper, with masks and true CTR.
2. Finds the disease direction the paper's way: one healthy test image I, a copy I* whose
   heart the segmenter's box and `enlarge-heart` widen by 30 %, v = normalize(E(I*) - E(I)).
3. Runs `cxredit evaluate` with the bundle: encoder inversion of every image, optimisation
   started from the encoder for a subset (in W+ by default: one w per layer), LDA
   separability of the encoder's latents (in-sample and cross-validated),
   the cosines between v and the bundle's directions (its LDA direction among them), edits of
   16 healthy images along v with an alpha sweep, CTR by the segmenter, identity outside the
   heart, and the SSIM to each subject's true counterfactual.
4. Writes `report.html` and `metrics.json` and prints a summary table.

Re-running the same command reuses the test set and the finished projections.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

TEST_SEED = 900  # phantom seed of the demo test set (training uses 1, directions 700)
WARP_SCALE = 1.3


def paper_direction(bundle, image: np.ndarray, out: Path) -> tuple[np.ndarray, dict]:
    """v = normalize(E(I*) - E(I)) for one image I (float [R,R] in [0,1]) and its warped I*.

    The heart box comes from the bundle's segmenter, as it would for a real X-ray. Writes
    I.png, I_star.png (marked synthetic) and directions/pair_demo.npz into `out`.
    """
    from cxredit.data.io import write_png
    from cxredit.latent.directions import pair_direction, save_direction
    from cxredit.latent.heart_warp import HeartBox, enlarge_heart
    from cxredit.train.segmenter import predict_masks

    x = torch.from_numpy(image[None, None].astype(np.float32) * 2 - 1)
    heart = predict_masks(bundle.segmenter, x)[0, 0].numpy()
    if not heart.any():
        raise ValueError("the segmenter finds no heart in the demo's image I")
    warped, _ = enlarge_heart(image, HeartBox.from_mask(heart), scale=WARP_SCALE)
    write_png(out / "I.png", image)
    write_png(out / "I_star.png", warped,
              provenance={"cxredit:synthetic": "true", "Description":
                          f"SYNTHETIC: heart widened x{WARP_SCALE} by cxredit enlarge-heart"})
    dev = next(bundle.E.parameters()).device
    with torch.no_grad():
        w = bundle.E(torch.from_numpy(np.stack([image, warped])[:, None].astype(np.float32)
                                      * 2 - 1).to(dev)).cpu().numpy()
    v = pair_direction(w[:1], w[1:])
    info = {"method": "pair", "latents_from": "encoder",
            "generator": {"path": str(bundle.path("generator")),
                          "sha256": bundle.generator_sha256},
            "inputs": {"I": str(out / "I.png"), "I_star": str(out / "I_star.png"),
                       "warp_scale": WARP_SCALE}}
    path = save_direction(out / "directions" / "pair_demo.npz", v, info)
    return v, {**info, "file": str(path.relative_to(out))}


def run_demo(out: str | Path = "runs/demo", weights: str | Path = "weights/demo",
             n_healthy: int = 100, n_cardio: int = 250, n_project: int = 32,
             project_steps: int = 100, n_edit: int = 16, device: str | None = None,
             progress: bool = True, project_space: str = "w+") -> dict:
    """Run the demo into `out` and return its metrics (see module doc)."""
    from cxredit.bundle import load_bundle, read_manifest
    from cxredit.data.prepare import make_phantom_store
    from cxredit.data.store import ImageStore
    from cxredit.evaluate import evaluate
    from cxredit.report import write_report

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(weights) / "bundle.json").exists():
        raise ValueError(f"{weights}: no weights bundle here; make one with `cxredit "
                         "make-weights` (hours on CPU) or pass --weights")
    res = int(read_manifest(weights)["resolution"])
    n = n_healthy + n_cardio
    test_dir = out / "test_store"
    if not (test_dir / "store.json").exists():
        make_phantom_store(test_dir, n, res, n_cardio / n, TEST_SEED, progress=progress)
    st = ImageStore(test_dir)
    if st.resolution != res or len(st) != n:
        raise ValueError(f"{test_dir}: holds {len(st)} images at {st.resolution} px, not {n} at "
                         f"{res} px; remove it or use another --out")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bundle = load_bundle(weights, dev, components=("encoder", "segmenter"))
    first_healthy = int(np.flatnonzero(st.meta["Cardiomegaly"].to_numpy() == 0)[0])
    v, info = paper_direction(bundle, st.images[first_healthy].astype(np.float32) / 255, out)
    m = evaluate(out, test_dir, weights, n_project=n_project, project_steps=project_steps,
                 n_edit=n_edit, direction="pair_demo", device=device, progress=progress,
                 command=["cxredit", "demo", "--out", str(out), "--weights", str(weights),
                          "--project-space", project_space],
                 extra_directions={"pair_demo": (v, info)}, project_space=project_space)
    report = write_report(out)
    m["demo_seconds"] = round(time.time() - t0, 1)
    (out / "demo.json").write_text(json.dumps({"seconds": m["demo_seconds"],
                                               "report": str(report)}, indent=2))
    m["report"] = str(report)
    return m


def _fmt(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def print_summary(m: dict, out: Path) -> None:
    """Short table of the demo's numbers and the report's path."""
    d, r = m["data"], m.get("reconstruction", {})
    sep = m.get("separability", {}).get("encoder", {})
    e = m.get("edit", {})
    names = m.get("directions", {}).get("names", [])
    cos = m.get("directions", {}).get("cosine", [])
    print(f"\ncxredit demo -> {out}")
    print(f"  test phantoms      {d['n_healthy']} healthy + {d['n_cardiomegaly']} cardiomegaly "
          f"at {d['resolution']} px")
    if "generation" in m:
        g = m["generation"]
        print(f"  generation         FID {_fmt(g['fid'], '.2f')} (real vs real "
              f"{_fmt(g['baseline_fid'], '.2f')}), {g['extractor']} features")
    pr = r.get("projection", {})
    how = f" ({pr['space'].upper()}, {pr['steps']} steps)" if "space" in pr else ""
    print(f"  reconstruction     SSIM encoder {_fmt(r.get('encoder', {}).get('ssim'))}, "
          f"projection {_fmt(pr.get('ssim'))}{how}")
    print(f"  separability       {_fmt(sep.get('separation'), '.2f')} in-sample, "
          f"{_fmt(sep.get('separation_cv'), '.2f')} cross-validated (paper: 4.8), "
          f"AUC {_fmt(sep.get('auc'))}")
    truth = m.get("separability", {}).get("true_ctr")
    if truth:
        print(f"{'':21}the phantoms' true CTR: {_fmt(truth.get('separation'), '.2f')} "
              f"in-sample, {_fmt(truth.get('separation_cv'), '.2f')} cross-validated")
    if "pair_demo" in names and "lda" in names:
        c = cos[names.index("pair_demo")][names.index("lda")]
        print(f"  directions         cos(paper pair, LDA) = {_fmt(c)}")
    if e:
        print(f"  edit ({e['direction']})   CTR {_fmt(e['ctr_mean'][0])} -> "
              f"{_fmt(e['ctr_mean'][-1])} over alpha 0..{e['alphas'][-1]:g} sigma; "
              f"{_fmt(e.get('pushed_past_0_5'), '.0%')} pushed past 0.5 with SSIM outside "
              f"heart >= {e['identity_ssim_threshold']:g}")
        tcf = [x for x in e.get("ssim_true_counterfactual") or [] if x is not None]
        if tcf:
            print(f"  true counterfactual SSIM of the edits {_fmt(min(tcf))} (worst alpha) to "
                  f"{_fmt(max(tcf))}")
    for t in m.get("targets", []):
        status = {True: "met   ", False: "MISSED", None: "n/a   "}[t["met"]]
        print(f"  {status} {t['name']}: {_fmt(t['value'])} "
              f"(target {t['target']})")
    print(f"  time               {m.get('demo_seconds')} s")
    print(f"  report             {m.get('report')}")
