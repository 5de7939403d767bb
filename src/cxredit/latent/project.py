"""Optimisation-based inversion ("projection"): find w (W) or ws (W+) such that G(w) ~ image.

The schedule follows NVlabs stylegan2-ada-pytorch `projector.py`: Adam (0.9, 0.999) from the
mean w, learning rate ramped up over the first 5 % of the steps and down with a half cosine
over the last 25 %, Gaussian noise of w_std * 0.05 added to the latent early on and decaying
quadratically to zero at 75 % of the steps, optional optimisation of the per-layer noise maps
with a multi-scale autocorrelation penalty (weight 1e5). The distance is MSE + (1 - SSIM)
instead of LPIPS (no VGG weights ship with cxredit).

Many images are projected at once, each with its own latent. Every loss term is per image and
summed over the batch, and every random draw comes from a per-image generator, so an image's
result does not depend on the others in its batch (nor on the batch size, up to float
rounding): a resumed `project` run therefore reproduces an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cxredit.metrics.recon import psnr
from cxredit.models.stylegan2 import Generator, SynthesisLayer
from cxredit.train.encoder import mean_w
from cxredit.train.losses import ssim

log = logging.getLogger(__name__)

SPACES = ("w", "w+")
INITS = ("mean", "encoder")
LOSS = "mse+ssim"
W_STATS_SAMPLES = 4096  # z draws for w_avg / w_std (NVlabs: 10000; the mean is stable by 4k)
NOISE_FACTOR = 0.05  # default initial latent noise, x the std of w (NVlabs' value)
_lpips_note_logged = False


def lr_factor(t: float, rampup: float = 0.05, rampdown: float = 0.25) -> float:
    """NVlabs learning-rate multiplier at progress t = step / steps in [0, 1)."""
    ramp = min(1.0, (1.0 - t) / rampdown) if rampdown > 0 else 1.0
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return ramp * (min(1.0, t / rampup) if rampup > 0 else 1.0)


@torch.no_grad()
def _w_stats(G: Generator) -> tuple[Tensor, float]:
    """(w_avg [w_dim], w_std): mean of mapping(z) and NVlabs' scalar spread sqrt(E||w-w_avg||^2).

    Uses the same z draws as `mean_w` (seed 0, cpu generator), so both come from one sample.
    """
    w_avg = mean_w(G, n=W_STATS_SAMPLES, seed=0)
    z = torch.randn([W_STATS_SAMPLES, G.z_dim], generator=torch.Generator().manual_seed(0))
    w = G.mapping(z.to(w_avg.device), broadcast=False)
    return w_avg, float((w - w_avg).square().sum(dim=1).mean().sqrt())


def _initial_w(init: Tensor | None, w_avg: Tensor, n: int, space: str, num_ws: int) -> Tensor:
    """Start latents: [n, w_dim] ("w") or [n, num_ws, w_dim] ("w+"); W inputs are broadcast,
    and a W+ start (e.g. a W+ encoder's guess) of a W projection is its mean over layers (the
    w whose broadcast is nearest to it)."""
    w0 = w_avg if init is None else init.detach().to(w_avg.device).float()
    w0 = w0.expand(n, -1) if w0.ndim == 1 else w0
    if space == "w" and w0.ndim == 3 and w0.shape[1] == num_ws:
        w0 = w0.mean(dim=1)
    if space == "w+" and w0.ndim == 2:
        w0 = w0.unsqueeze(1).expand(-1, num_ws, -1)
    want = [n, len(w_avg)] if space == "w" else [n, num_ws, len(w_avg)]
    if list(w0.shape) != want:
        raise ValueError(f"init must be [w_dim], [N, w_dim] or (space w+) [N, num_ws, w_dim] "
                         f"with N={n} and w_dim={len(w_avg)}, got {list(init.shape)}")
    return w0.clone().contiguous()


def _randn(gens: list[torch.Generator], shape: Sequence[int], device: torch.device) -> Tensor:
    """[len(gens), *shape] with row i drawn from gens[i] (batch-composition independent)."""
    return torch.stack([torch.randn(list(shape), generator=g, device=device) for g in gens])


def _noise_reg(maps: list[Tensor]) -> Tensor:
    """NVlabs noise regulariser per image: squared 1-px autocorrelations of every noise map
    [N,1,r,r] and of its 2x average-pooled versions down to 8 px, summed -> [N]."""
    reg = 0.0
    for m in maps:
        while True:
            reg = reg + (m * m.roll(1, dims=3)).mean(dim=(1, 2, 3)).square() \
                + (m * m.roll(1, dims=2)).mean(dim=(1, 2, 3)).square()
            if m.shape[2] <= 8:
                break
            m = F.avg_pool2d(m, kernel_size=2)
    return reg


@contextmanager
def _noise_maps(layers: list[SynthesisLayer], maps: list[Tensor]):
    """Swap each layer's `noise_const` [r,r] for a per-image map [N,1,r,r] (which broadcasts
    against the layer's [N,C,r,r] output), restoring the buffers afterwards."""
    saved = [layer.noise_const for layer in layers]
    try:
        for layer, m in zip(layers, maps):
            layer.noise_const = m
        yield
    finally:
        for layer, buf in zip(layers, saved):
            layer.noise_const = buf


def _check_lpips(lpips_weights, device: torch.device | str = "cpu"):
    """The LPIPS module when the user has its weights locally (a "LIN,VGG16" file pair or an
    LPIPS module); otherwise say once that the loss is MSE + SSIM only (nothing downloaded)."""
    global _lpips_note_logged
    if isinstance(lpips_weights, torch.nn.Module):
        return lpips_weights
    if lpips_weights is not None:
        from cxredit.metrics.lpips import LPIPS

        return LPIPS(lpips_weights).to(device)
    if not _lpips_note_logged:
        log.info("no local LPIPS weights; using MSE + SSIM")
        _lpips_note_logged = True
    return None


def _image_loss(img: Tensor, target: Tensor, lpips=None) -> Tensor:
    """MSE + (1 - SSIM) (+ LPIPS) per image, [N]."""
    loss = (img - target).square().mean(dim=(1, 2, 3)) + 1 - ssim(img, target)
    return loss if lpips is None else loss + lpips(img, target)


def project_images(G: Generator, targets: Tensor, space: str = "w", init: Tensor | None = None,
                   steps: int = 500, lr: float = 0.1, lr_rampup: float = 0.05,
                   lr_rampdown: float = 0.25, initial_noise_factor: float = NOISE_FACTOR,
                   noise_ramp: float = 0.75, optimize_noise: bool = False,
                   noise_weight: float = 1e5, lpips_weights: str | None = None,
                   generator: torch.Generator | None = None, seeds: Sequence[int] | None = None,
                   callback: Callable[[int, float], None] | None = None) -> dict:
    """Project a batch of images into G's latent space (each image its own latent).

    Args:
        G: generator (not modified; on the device of `targets`).
        targets: [N, 1, R, R] in [-1, 1], R = G.img_resolution.
        space: "w" (one w per image) or "w+" (num_ws vectors per image).
        init: start [w_dim], [N, w_dim] (broadcast for "w+") or [N, num_ws, w_dim] ("w+"),
            e.g. E(x) from an encoder; None = mean w of G.
        steps: Adam steps.
        lr, lr_rampup, lr_rampdown: peak learning rate and the ramp lengths (fractions).
        initial_noise_factor, noise_ramp: latent noise of w_std * factor, decaying as
            (1 - t / noise_ramp)^2 to zero at t = noise_ramp (in W+ drawn per layer).
        optimize_noise: also optimise per-image noise maps (regularised, weight
            `noise_weight`); they are returned, since `w` alone no longer reproduces the image.
        lpips_weights: "LIN_WEIGHTS,VGG16_WEIGHTS" local files: adds LPIPS to the loss
            (`cxredit.metrics.lpips`); None = MSE + SSIM only.
        generator: draws one seed per image, in order (None: torch's default RNG).
        seeds: per-image seeds instead of `generator` (a seed fixes the image's result).
        callback: called as callback(step, mean loss) after every step.

    Returns:
        {"w": [N, w_dim] or [N, num_ws, w_dim], "images": [N,1,R,R] (clamped),
         "mse", "ssim", "psnr": [N] of the clamped images vs targets,
         "loss_history": [steps] mean loss per step (with the latent noise of that step),
         "noise": list of [N,1,r,r] maps (only with optimize_noise)}, all detached.
    """
    lpips = _check_lpips(lpips_weights, targets.device)
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    r = G.img_resolution
    if targets.ndim != 4 or tuple(targets.shape[1:]) != (G.img_channels, r, r):
        raise ValueError(f"targets must be [N, {G.img_channels}, {r}, {r}] for this "
                         f"{r}-px generator, got {list(targets.shape)}")
    dev, n = targets.device, len(targets)
    targets = targets.float()
    if seeds is None:
        seeds = torch.randint(0, 2**62, [n], generator=generator,
                              device=generator.device if generator else "cpu").tolist()
    if len(seeds) != n:
        raise ValueError(f"need one seed per image ({n}), got {len(seeds)}")
    gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]

    w_avg, w_std = _w_stats(G)
    w_opt = _initial_w(init, w_avg, n, space, G.num_ws).requires_grad_(True)
    layers = [m for m in G.synthesis.modules() if isinstance(m, SynthesisLayer)]
    maps = [_randn(gens, [1, la.resolution, la.resolution], dev).requires_grad_(True)
            for la in layers] if optimize_noise else []
    params = [w_opt, *maps]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    history = torch.zeros(steps, device=dev)
    with _noise_maps(layers, maps):  # no maps: the layers keep their noise_const
        for step in range(steps):
            t = step / steps
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(t, lr_rampup, lr_rampdown)
            scale = w_std * initial_noise_factor * max(0.0, 1.0 - t / noise_ramp) ** 2 \
                if noise_ramp > 0 else 0.0
            w_in = w_opt + _randn(gens, w_opt.shape[1:], dev) * scale if scale > 0 else w_opt
            loss = _image_loss(G.synthesis(w_in, noise_mode="const"), targets, lpips)  # [N]
            total = loss.sum()  # summed, not averaged: no image's gradient depends on N
            if maps:
                total = total + noise_weight * _noise_reg(maps).sum()
            for p, g in zip(params, torch.autograd.grad(total, params)):
                p.grad = g  # autograd.grad leaves G's own .grad untouched
            opt.step()
            with torch.no_grad():
                for m in maps:  # NVlabs: keep each map zero-mean, unit-variance (per image)
                    m -= m.mean(dim=(1, 2, 3), keepdim=True)
                    m *= m.square().mean(dim=(1, 2, 3), keepdim=True).rsqrt()
                history[step] = loss.mean()
            if callback is not None:
                callback(step, float(history[step]))
        with torch.no_grad():
            img = G.synthesis(w_opt, noise_mode="const").clamp(-1, 1)
    out = {"w": w_opt.detach(), "images": img,
           "mse": (img - targets).square().mean(dim=(1, 2, 3)), "ssim": ssim(img, targets),
           "psnr": psnr(img, targets), "loss_history": history.cpu()}
    if maps:
        out["noise"] = [m.detach() for m in maps]
    return out


# ----------------------------------------------------------------------------------------------
# Files in, latents out (the API behind `cxredit project`)


def partial_path(out: str | os.PathLike) -> Path:
    """Where `project` keeps finished batches: `<out stem>.partial.npz` next to `out`."""
    out = Path(out)
    return out.with_name(out.stem + ".partial.npz")


def _image_seed(image_id: str, seed: int) -> int:
    """A stable seed per image id, so results do not depend on batching or resumption."""
    h = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 2


def _load_partial(path: Path, settings: dict) -> dict[str, tuple]:
    """Finished results {id: (w, mse, ssim, psnr)} of an interrupted run with `settings`."""
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as z:
        old = json.loads(str(z["settings"]))
        if old != settings:
            diff = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
            raise ValueError(f"{path}: an unfinished projection with other settings "
                             f"({', '.join(diff)}) is here; delete it to start over")
        cols = [z[k] for k in ("ids", "w", "mse", "ssim", "psnr")]  # each read once
    return {str(i): (w, float(a), float(b), float(c)) for i, w, a, b, c in zip(*cols)}


def _save_partial(path: Path, done: dict[str, tuple], settings: dict) -> None:
    """Write finished results atomically (an interruption leaves the previous file)."""
    ids = list(done)
    cols = list(zip(*done.values()))
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, ids=np.asarray(ids, dtype=str), w=np.stack(cols[0]),
             mse=np.asarray(cols[1], np.float32), ssim=np.asarray(cols[2], np.float32),
             psnr=np.asarray(cols[3], np.float32), settings=np.asarray(json.dumps(settings)))
    os.replace(tmp, path)


def project(gan: str | Path, out: str | Path, images: list[str] | None = None,
            store: str | Path | None = None, split: str | None = None, query: str | None = None,
            limit: int | None = None, space: str = "w", init: str = "mean",
            encoder: str | Path | None = None, steps: int = 500, batch: int = 16,
            lr: float = 0.1, seed: int = 0, recon_dir: str | Path | None = None,
            lpips_weights: str | None = None, device: str | None = None,
            progress: bool = True) -> dict:
    """Project images into the latent space of a GAN checkpoint and write latents (resumable).

    Finished batches go to `partial_path(out)` after each batch; running the same command again
    continues with the images not done yet. At the end the latents are written with
    `save_latents` (per-image "mse", "ssim", "psnr" arrays) and the partial file is removed.

    Args:
        gan: GAN run folder or checkpoint.
        out: latents `.npz`.
        images: image files (resized to G's resolution like `invert`), or
        store: a store of G's resolution (rows selected by `split` / `query`).
        limit: project only the first `limit` selected images.
        space: "w" or "w+".
        init: "mean" (mean w of G) or "encoder" (E(x); needs `encoder`).
        encoder: encoder run folder or checkpoint for init="encoder".
        steps, lr: optimisation steps and peak learning rate.
        batch: images optimised together.
        seed: base of the per-image seeds (latent / noise draws).
        recon_dir: write G(w) as PNG here (marked synthetic).
        lpips_weights: "LIN_WEIGHTS,VGG16_WEIGHTS" local files: adds LPIPS to the loss
            (`cxredit.metrics.lpips`); None = MSE + SSIM only.
        device: torch device (default: cuda if available).
        progress: tqdm bar over images with the current mean loss.

    Returns:
        {"count", "out", "projected" (this call), "resumed" (from the partial file),
         "mse", "ssim", "psnr" (means)}.
    """
    from tqdm.auto import tqdm

    from cxredit.checkpoint import checkpoint_sha256
    from cxredit.data.io import write_png
    from cxredit.data.store import select_images
    from cxredit.generate import provenance
    from cxredit.latent.io import save_latents
    from cxredit.runs import find_checkpoint
    from cxredit.train.encoder import load_encoder
    from cxredit.train.gan import load_generator

    if (images is None) == (store is None):
        raise ValueError("give either --images or --store")
    if space not in SPACES or init not in INITS:
        raise ValueError(f"space must be one of {SPACES} and init one of {INITS}, "
                         f"got {space!r}, {init!r}")
    if init == "encoder" and encoder is None:
        raise ValueError("init='encoder' needs --encoder (an encoder run or checkpoint)")
    if steps < 1 or batch < 1 or (limit is not None and limit < 0):
        raise ValueError(f"steps and batch must be >= 1 and limit >= 0, got {steps}, {batch}, "
                         f"{limit}")
    if Path(out).suffix != ".npz":
        raise ValueError(f"{out}: latents must be written to a .npz file")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lpips = _check_lpips(lpips_weights, dev)  # loaded once, before any work
    gan_ck = find_checkpoint(gan)
    gan_sha = checkpoint_sha256(gan_ck)
    G = load_generator(gan_ck, dev)
    R = G.img_resolution
    sel = select_images(R, images, store, split, query, limit,
                        model="the generator makes", purpose="to project")
    ids, fetch = sel.ids, sel.fetch
    E, enc = None, None
    if init == "encoder":
        E, info = load_encoder(encoder, dev)
        if (E.resolution, E.w_dim) != (R, G.w_dim):
            raise ValueError(f"encoder is for {E.resolution} px / w_dim {E.w_dim}, the "
                             f"generator is {R} px / w_dim {G.w_dim}")
        if E.space == "w+" and space == "w":
            raise ValueError("a W+ encoder cannot start a W projection: use --space w+")
        if info["gan"].get("sha256") not in (None, gan_sha):
            log.warning("encoder %s was trained with another generator", info["checkpoint"])
        enc = {"path": info["checkpoint"], "sha256": checkpoint_sha256(info["checkpoint"])}
    settings = {"steps": steps, "space": space, "init": init, "lr": lr, "seed": seed,
                "loss": LOSS + ("+lpips" if lpips is not None else ""),
                "generator_sha256": gan_sha, "encoder_sha256": enc and enc["sha256"],
                "selection_sha1": hashlib.sha1("\n".join(ids).encode()).hexdigest()}
    part = partial_path(out)
    part.parent.mkdir(parents=True, exist_ok=True)
    done = _load_partial(part, settings)
    resumed = len(done)
    todo = [i for i, k in enumerate(ids) if k not in done]
    meta = provenance(gan_sha, "projection reconstruction") if recon_dir else {}
    bar = tqdm(total=len(ids), initial=len(ids) - len(todo), disable=not progress,
               desc="project", unit="img")

    def show(step: int, loss: float) -> None:
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss:.4f}")

    for b0 in range(0, len(todo), batch):
        idx = todo[b0:b0 + batch]
        x = fetch(idx).to(dev)
        with torch.no_grad():
            start = E(x) if E is not None else None
        res = project_images(G, x, space=space, init=start, steps=steps, lr=lr,
                             seeds=[_image_seed(ids[i], seed) for i in idx], callback=show,
                             lpips_weights=lpips)
        for k, i in enumerate(idx):
            done[ids[i]] = (res["w"][k].cpu().numpy(),
                            *(float(res[m][k]) for m in ("mse", "ssim", "psnr")))
            if recon_dir:
                name = Path(ids[i]).stem if store is None else f"row{int(ids[i]):07d}"
                write_png(Path(recon_dir) / f"{name}_proj.png",
                          (res["images"][k, 0].cpu().numpy() + 1) / 2, provenance=meta)
        _save_partial(part, done, settings)
        bar.update(len(idx))
    bar.close()
    w = np.stack([done[k][0] for k in ids])
    metrics = {m: np.asarray([done[k][j] for k in ids], np.float32)
               for j, m in enumerate(("mse", "ssim", "psnr"), start=1)}
    side = {"method": "project", "space": space, "init": init, "steps": steps, "lr": lr,
            "seed": seed, "loss": settings["loss"],
            "generator": {"path": str(gan_ck), "sha256": gan_sha},
            "encoder": enc,
            "source": {"store": str(store) if store else None, "split": split, "query": query,
                       "limit": limit}}
    save_latents(out, w, ids, side, **metrics)
    part.unlink(missing_ok=True)
    return {"count": len(ids), "out": str(out), "projected": len(todo), "resumed": resumed,
            **{m: float(v.mean()) for m, v in metrics.items()}}
