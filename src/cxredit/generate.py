"""Sampling from a trained generator: seed grids, single images, latent walks.

Every PNG written here carries provenance text chunks saying it is synthetic and which
generator (checkpoint sha256) made it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cxredit import __version__


def provenance(ckpt_sha256: str, what: str) -> dict[str, str]:
    """PNG text chunks that mark an image as synthetic."""
    return {"Software": f"cxredit {__version__}", "cxredit:synthetic": "true",
            "cxredit:generator-sha256": ckpt_sha256,
            "Description": f"SYNTHETIC image ({what}) made by cxredit; not a real radiograph"}


def seed_latents(seeds: list[int], z_dim: int) -> torch.Tensor:
    """z [N, z_dim] with one fixed draw per seed (independent of the other seeds)."""
    return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


@torch.no_grad()
def generate(ckpt: str | Path, seeds: list[int], out: str | Path, psi: float = 1.0,
             noise_mode: str = "const", interpolate: int = 0, device: str | None = None,
             batch: int = 16) -> dict:
    """Write one PNG per seed, a grid, and optionally a latent-walk strip.

    Args:
        ckpt: GAN run folder or checkpoint.
        seeds: z seeds.
        out: output folder.
        psi: truncation (1 = none).
        noise_mode: "const", "random" or "none".
        interpolate: frames between consecutive seeds in a W-space walk (0 = no walk).
        device: torch device (default cuda when available).
        batch: images per forward pass.

    Returns:
        {"count", "grid", "walk"} paths/counts.
    """
    from cxredit.checkpoint import checkpoint_sha256
    from cxredit.data.io import write_png
    from cxredit.runs import find_checkpoint, save_image_grid
    from cxredit.train.gan import load_generator

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = find_checkpoint(ckpt)
    sha = checkpoint_sha256(path)
    G = load_generator(path, dev)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    z = seed_latents(seeds, G.z_dim).to(dev)
    ws = G.mapping(z, psi=psi)
    imgs = torch.cat([G.synthesis(ws[i:i + batch], noise_mode=noise_mode)
                      for i in range(0, len(seeds), batch)]).clamp(-1, 1).cpu()
    meta = provenance(sha, f"sample, psi={psi}")
    for s, img in zip(seeds, imgs):
        write_png(out / f"seed{s:05d}.png", ((img[0].numpy() + 1) / 2), provenance=meta)
    grid = save_image_grid(imgs, out / "grid.png", nrow=int(np.ceil(np.sqrt(len(seeds)))),
                           provenance=meta)
    res = {"count": len(seeds), "grid": grid, "walk": None}
    if interpolate > 0 and len(seeds) > 1:
        t = torch.linspace(0, 1, interpolate + 2, device=dev)[:-1]
        frames = [ws[i].lerp(ws[i + 1], tt) for i in range(len(seeds) - 1) for tt in t]
        frames.append(ws[-1])
        walk_ws = torch.stack(frames)
        walk = torch.cat([G.synthesis(walk_ws[i:i + batch], noise_mode="const")
                          for i in range(0, len(walk_ws), batch)]).clamp(-1, 1).cpu()
        res["walk"] = save_image_grid(walk, out / "walk.png", nrow=interpolate + 1,
                                      provenance=provenance(sha, "latent walk"))
    return res
