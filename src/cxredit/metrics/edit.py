"""Edit metrics: does an edit change the disease (efficacy) and keep the patient (identity)?

For latents w of real images, a unit direction v and strengths alpha, an edit is
x_a = G(w + alpha v). Measured per image and alpha:

- efficacy: the CTR of x_a from the segmenter's masks (`cxredit.metrics.ctr`); the share of
  healthy images pushed past CTR 0.5 at some alpha *while identity holds* (SSIM outside the
  heart >= `identity_ssim`, 0.90 by default); the classifier's P(cardiomegaly) when given;
- identity: SSIM and MSE between x_a and the unedited reconstruction x_0 = G(w) outside the
  dilated union of both heart masks (the edit is meant to change the heart and nothing else;
  comparing with x_0 rather than the real image separates the edit's effect from the
  reconstruction error, which `cxredit.metrics.recon` reports);
- truth, on phantoms only: SSIM of x_a to the true counterfactual, i.e. the same subject
  rendered with the heart size whose CTR equals the CTR measured on x_a;
- latent editing consistency (LEC, after e4e, Tov et al. 2021): edit, decode, re-encode, undo
  the edit, decode, and compare with x_0 (image MSE/SSIM) and w (relative latent distance).

SSIM restricted to a region averages the SSIM map (pytorch-msssim's formulas: Gaussian
window, no padding) over the windows that lie entirely inside the region.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DATA_RANGE = 2.0  # images in [-1, 1]


def _gauss(win: int, sigma: float = 1.5) -> Tensor:
    t = torch.arange(win, dtype=torch.float32) - (win - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(x: Tensor, y: Tensor, win: int | None = None) -> Tensor:
    """SSIM map of two batches [N,1,R,R] in [-1,1] -> [N,1,R-win+1,R-win+1].

    Same constants and window as `cxredit.metrics.recon.ssim` (whose value is this map's
    mean); `win` defaults to the size rule used there (11 px from 64 px, 7 from 32, else 3).
    """
    if x.ndim != 4 or x.shape[1] != 1 or x.shape != y.shape:
        raise ValueError(f"expected two image batches [N,1,R,R] of the same shape, got "
                         f"{list(x.shape)} and {list(y.shape)}")
    side = min(x.shape[-2:])
    win = win or (11 if side >= 64 else (7 if side >= 32 else 3))
    g = _gauss(win).to(x.device)
    gx, gy = g.view(1, 1, 1, -1), g.view(1, 1, -1, 1)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, gx), gy)

    x, y = x.float(), y.float()
    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    return (2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs


def dilate(mask: Tensor, px: int) -> Tensor:
    """Binary dilation of bool masks [N,R,R] by a (2px+1)-square."""
    if px <= 0:
        return mask.bool()
    m = mask.float().unsqueeze(1)
    return F.max_pool2d(m, 2 * px + 1, stride=1, padding=px).squeeze(1) > 0.5


def region_scores(x: Tensor, y: Tensor, region: Tensor) -> dict[str, np.ndarray]:
    """SSIM and MSE of x vs y restricted to `region` (bool [N,R,R]).

    MSE averages the squared difference over the region's pixels; SSIM averages the SSIM map
    over the windows that lie entirely inside the region, so a change outside the region
    cannot leak in through a window that straddles its border. NaN where nothing qualifies.
    """
    smap = ssim_map(x, y)[:, 0]
    win = region.shape[-1] - smap.shape[-1] + 1
    inside = -F.max_pool2d(-region.float().unsqueeze(1), win, stride=1)[:, 0]  # window in region
    reg = region.float()
    d2 = (x.float() - y.float()).square()[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        ssim = (smap * inside).sum((1, 2)).numpy() / inside.sum((1, 2)).numpy()
        mse = (d2 * reg).sum((1, 2)).numpy() / reg.sum((1, 2)).numpy()
    return {"ssim": ssim.astype(np.float64), "mse": mse.astype(np.float64)}


def heart_dilation(resolution: int) -> int:
    """Pixels by which heart masks are dilated before "outside the heart" (2 at 64 px)."""
    return max(1, resolution // 32)


def true_counterfactuals(subject_seeds: Sequence[int], cardiomegaly: Sequence[bool],
                         target_ctr: Sequence[float], resolution: int,
                         device_probs: tuple[float, float] = (0.05, 0.3)) -> Tensor:
    """Phantom subjects re-rendered with the heart size of a target CTR.

    Args:
        subject_seeds, cardiomegaly: the phantom store's `subject_seed` and label per image
            (together with `device_probs` they recreate the subject exactly).
        target_ctr: wanted CTR per image (NaN or unreachable: the image is NaN).
        resolution: side R.
        device_probs: the store's pacemaker probabilities (its store.json records them).

    Returns:
        [N,1,R,R] in [-1,1], NaN images where the CTR is not reachable.
    """
    from cxredit.data.phantom import heart_scale_for_ctr, render, sample_case

    out = torch.full((len(subject_seeds), 1, resolution, resolution), float("nan"))
    for i, (seed, card, c) in enumerate(zip(subject_seeds, cardiomegaly, target_ctr)):
        if not np.isfinite(c):
            continue
        subject, _ = sample_case(int(seed), bool(card), *device_probs)
        try:
            h = heart_scale_for_ctr(subject, float(c))
        except ValueError:  # the segmenter measured a CTR this subject cannot have
            continue
        out[i, 0] = torch.from_numpy(render(subject, h, resolution).image) * 2 - 1
    return out


@torch.no_grad()
def edit_sweep(G, w: Tensor, v: Tensor, alphas: Sequence[float], segmenter, classifier=None,
               layers: list[int] | None = None, truth: dict | None = None, batch: int = 32,
               keep_images: int = 0) -> dict:
    """Edit every latent along v for every alpha and measure efficacy and identity.

    Args:
        G: generator.
        w: [N, w_dim] or [N, num_ws, w_dim] latents of the images to edit.
        v: unit direction [w_dim] or [num_ws, w_dim].
        alphas: strengths (0 is added if missing: it is the identity reference).
        segmenter: heart/lung segmenter (CTR and heart masks).
        classifier: optional cardiomegaly classifier (P per image and alpha).
        layers: edit only these W+ layers (None: all).
        truth: phantoms only: {"subject_seed", "cardiomegaly", "device_probs"} per image.
        batch: images per forward pass.
        keep_images: return the edited images of the first k latents (for sweep grids).

    Returns:
        dict of per-alpha arrays [A, N]: "ctr", "ssim_outside_heart", "mse_outside_heart",
        "p_cardiomegaly" (with a classifier), "ssim_true_counterfactual" (with truth), plus
        "alphas" [A] and "images" [k, A, 1, R, R] when asked.
    """
    from cxredit.latent.edit import apply_direction
    from cxredit.metrics.ctr import ctr
    from cxredit.train.segmenter import predict_masks

    alphas = sorted({0.0, *map(float, alphas)})
    dev = next(G.parameters()).device
    R = G.img_resolution
    px = heart_dilation(R)
    res: dict[str, list] = {k: [] for k in ("ctr", "ssim_outside_heart", "mse_outside_heart",
                                            "p_cardiomegaly", "ssim_true_counterfactual")}
    imgs = torch.empty(min(keep_images, len(w)), len(alphas), 1, R, R)
    base_imgs, base_heart = [], []
    for s in range(0, len(w), batch):
        x0 = G.synthesis(w[s:s + batch].to(dev), noise_mode="const").clamp(-1, 1).cpu()
        base_imgs.append(x0)
        base_heart.append(predict_masks(segmenter, x0)[:, 0])
    x0, h0 = torch.cat(base_imgs), torch.cat(base_heart)
    for j, a in enumerate(alphas):
        xs = []
        for s in range(0, len(w), batch):
            wa = apply_direction(w[s:s + batch].to(dev), v.to(dev), a, G.num_ws, layers)
            xs.append(G.synthesis(wa, noise_mode="const").clamp(-1, 1).cpu())
        xa = torch.cat(xs)
        masks = predict_masks(segmenter, xa)
        c = np.atleast_1d(ctr(masks)["ctr"]).astype(np.float64)
        region = ~dilate(masks[:, 0] | h0, px)
        sc = region_scores(xa, x0, region)
        res["ctr"].append(c)
        res["ssim_outside_heart"].append(sc["ssim"])
        res["mse_outside_heart"].append(sc["mse"])
        if classifier is not None:
            from cxredit.train.classifier import predict_proba

            res["p_cardiomegaly"].append(predict_proba(classifier, xa))
        if truth is not None:
            cf = true_counterfactuals(truth["subject_seed"], truth["cardiomegaly"], c, R,
                                      tuple(truth.get("device_probs", (0.05, 0.3))))
            ok = torch.isfinite(cf).flatten(1).all(1)
            vals = np.full(len(xa), np.nan)
            if ok.any():
                from cxredit.metrics.recon import ssim

                vals[ok.numpy()] = ssim(xa[ok], cf[ok]).numpy()
            res["ssim_true_counterfactual"].append(vals)
        if len(imgs):
            imgs[:, j] = xa[:len(imgs)]
    out = {k: np.stack(v) for k, v in res.items() if v}
    out["alphas"] = np.asarray(alphas)
    if keep_images:
        out["images"] = imgs
    return out


def summarize_sweep(sweep: dict, identity_ssim: float = 0.90, threshold: float = 0.5) -> dict:
    """JSON summary of `edit_sweep` (the "edit" section of metrics.json).

    "pushed_past_0_5": share of the images below `threshold` at alpha 0 that exceed it at some
    alpha >= 0 where their SSIM outside the heart is still >= `identity_ssim`.
    """
    a = sweep["alphas"]
    c = sweep["ctr"]
    ident = sweep["ssim_outside_heart"]
    i0 = int(np.flatnonzero(a == 0)[0])
    start_low = c[i0] < threshold
    pos = a >= 0
    ok = (c > threshold) & (ident >= identity_ssim) & pos[:, None]
    pushed = ok[:, start_low].any(0)

    def col(k: str, fn=np.nanmean) -> list[float]:
        with warnings.catch_warnings():  # an all-NaN column is a NaN mean, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            return [float(x) for x in fn(sweep[k], axis=1)]

    out = {"alphas": [float(x) for x in a], "n": int(c.shape[1]),
           "ctr_mean": col("ctr"), "ctr_std": col("ctr", np.nanstd),
           "frac_past_0_5": [float(x) for x in np.mean(c > threshold, axis=1)],
           "ssim_outside_heart": col("ssim_outside_heart"),
           "mse_outside_heart": col("mse_outside_heart"),
           "n_below_threshold_at_0": int(start_low.sum()),
           "pushed_past_0_5": float(pushed.mean()) if start_low.any() else float("nan"),
           "identity_ssim_threshold": identity_ssim,
           "ctr_unmeasurable": int(np.isnan(c).sum())}
    if "p_cardiomegaly" in sweep:
        out["p_cardiomegaly_mean"] = col("p_cardiomegaly")
    if "ssim_true_counterfactual" in sweep:
        out["ssim_true_counterfactual"] = col("ssim_true_counterfactual")
    return out


@torch.no_grad()
def latent_editing_consistency(G, E, w: Tensor, v: Tensor, alpha: float,
                               layers: list[int] | None = None, batch: int = 32) -> dict:
    """LEC (e4e): w -> edit -> G -> E -> undo the edit -> G, compared with G(w).

    Returns:
        {"mse", "ssim"}: images vs x_0 = G(w), means; "latent_rel": mean of
        |w_back - w| / |w|; "alpha".
    """
    from cxredit.latent.edit import apply_direction
    from cxredit.metrics.recon import mse, ssim

    dev = next(G.parameters()).device
    m, s_, lat = [], [], []
    for s in range(0, len(w), batch):
        wb = w[s:s + batch].to(dev)
        x0 = G.synthesis(wb, noise_mode="const").clamp(-1, 1)
        xe = G.synthesis(apply_direction(wb, v.to(dev), alpha, G.num_ws, layers),
                         noise_mode="const").clamp(-1, 1)
        we = E(xe)
        if we.shape != wb.shape:
            raise ValueError(f"encoder output {list(we.shape)} does not match the latents "
                             f"{list(wb.shape)} (W vs W+)")
        back = apply_direction(we, v.to(dev), -alpha, G.num_ws, layers)
        xb = G.synthesis(back, noise_mode="const").clamp(-1, 1)
        m.append(mse(xb, x0).cpu())
        s_.append(ssim(xb, x0).cpu())
        lat.append(((back - wb).flatten(1).norm(dim=1) / wb.flatten(1).norm(dim=1)).cpu())
    return {"alpha": float(alpha), "mse": float(torch.cat(m).mean()),
            "ssim": float(torch.cat(s_).mean()), "latent_rel": float(torch.cat(lat).mean())}
