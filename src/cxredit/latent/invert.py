"""Encoder inversion: images -> latents in one batched, gradient-free pass of E."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cxredit.data.store import select_images
from cxredit.generate import provenance
from cxredit.latent.io import save_latents
from cxredit.metrics.recon import psnr
from cxredit.train.losses import ssim

log = logging.getLogger(__name__)


@torch.no_grad()
def invert(encoder: str | Path, out: str | Path, images: list[str] | None = None,
           store: str | Path | None = None, split: str | None = None, query: str | None = None,
           gan: str | Path | None = None, batch: int = 32, recon_dir: str | Path | None = None,
           metrics: bool = True, device: str | None = None, progress: bool = True) -> dict:
    """Encode images with E and write latents (+ optional reconstructions and SSIM/PSNR).

    Args:
        encoder: encoder run folder or checkpoint.
        out: latents `.npz`.
        images: image files, or
        store: a store (rows selected by `split` / `query`).
        gan: generator checkpoint for reconstructions (default: the one E was trained with).
        batch: images per forward pass.
        recon_dir: write reconstructions as PNG here (marked synthetic).
        metrics: compute per-image SSIM/PSNR of G(E(I)) against I (needs G).
        device: torch device.
        progress: tqdm bar.

    Returns:
        {"count", "out", "ssim", "psnr"} (means; NaN without metrics).
    """
    from cxredit.checkpoint import checkpoint_sha256
    from cxredit.data.io import output_stems, write_png
    from cxredit.runs import find_checkpoint
    from cxredit.train.encoder import load_encoder
    from cxredit.train.gan import load_generator

    if (images is None) == (store is None):
        raise ValueError("give either --images or --store")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    E, info = load_encoder(encoder, dev)
    sel = select_images(E.resolution, images, store, split, query,
                        model="the encoder expects", purpose="to invert")
    ids = sel.ids
    G = None
    gan_path = gan or info["gan"].get("path")
    if metrics or recon_dir:
        if not gan_path:
            raise ValueError("reconstructions need the generator: pass --gan")
        G = load_generator(gan_path, dev)
    meta = provenance(checkpoint_sha256(find_checkpoint(gan_path)), "encoder reconstruction") \
        if recon_dir else {}
    stems = output_stems(ids, rows=store is not None)
    ws, ssims, psnrs = [], [], []
    n_batches = math.ceil(len(ids) / batch)
    for b in tqdm(range(n_batches), disable=not progress, desc="invert", unit="batch"):
        sl = slice(b * batch, (b + 1) * batch)
        x = sel.fetch(range(len(ids))[sl]).to(dev)
        w = E(x)
        ws.append(w.cpu())
        if G is not None:
            rec = G.synthesis(w, noise_mode="const").clamp(-1, 1)
            ssims.append(ssim(rec, x).cpu())
            psnrs.append(psnr(rec, x).cpu())
            if recon_dir:
                for name, img in zip(stems[sl], rec.cpu()):
                    write_png(Path(recon_dir) / f"{name}_recon.png", (img[0].numpy() + 1) / 2,
                              provenance=meta)
    w_all = torch.cat(ws).numpy()
    extra = {}
    if ssims:
        extra = {"ssim": torch.cat(ssims).numpy(), "psnr": torch.cat(psnrs).numpy()}
    gan_ck = find_checkpoint(gan_path) if gan_path else None
    side = {"method": "encoder",
            "generator": {"path": str(gan_ck) if gan_ck else info["gan"].get("path"),
                          "sha256": checkpoint_sha256(gan_ck) if gan_ck
                          else info["gan"].get("sha256")},
            "encoder": {"path": info["checkpoint"],
                        "sha256": checkpoint_sha256(info["checkpoint"])},
            "source": {"store": str(store) if store else None, "split": split, "query": query}}
    save_latents(out, w_all, ids, side, **extra)
    return {"count": len(ids), "out": str(out),
            "ssim": float(np.mean(extra["ssim"])) if extra else float("nan"),
            "psnr": float(np.mean(extra["psnr"])) if extra else float("nan")}
