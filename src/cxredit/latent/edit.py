"""Editing: w' = w + alpha * v, rendered by G, written with provenance.

Every file written here is a synthetic image and says so: PNG text chunks (and, for DICOM,
ImageType DERIVED/SECONDARY plus a comment) name the source id, the direction, alpha and the
generator's sha256.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cxredit import __version__


def parse_layers(text: str | None, num_ws: int) -> list[int] | None:
    """"0-5" or "0,2,4" -> layer indices (None = all layers)."""
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    bad = [i for i in out if not 0 <= i < num_ws]
    if bad:
        raise ValueError(f"--layers {text!r}: layers must be in 0..{num_ws - 1}")
    return sorted(set(out))


def apply_direction(w: torch.Tensor, v: torch.Tensor, alpha: float, num_ws: int,
                    layers: list[int] | None = None) -> torch.Tensor:
    """Edited latents.

    Args:
        w: [N, w_dim] (W) or [N, num_ws, w_dim] (W+).
        v: [w_dim] or [num_ws, w_dim] unit direction.
        alpha: strength.
        num_ws: the generator's number of ws.
        layers: restrict the edit to these ws (the result is W+); None = everywhere.

    Returns:
        [N, w_dim] when w, v are W and no layers are given; else [N, num_ws, w_dim].
    """
    if layers is None and w.ndim == 2 and v.ndim == 1:
        return w + alpha * v
    ws = w if w.ndim == 3 else w.unsqueeze(1).expand(-1, num_ws, -1)
    vs = v if v.ndim == 2 else v.unsqueeze(0).expand(num_ws, -1)
    mask = torch.zeros(num_ws, 1, dtype=ws.dtype, device=ws.device)
    mask[layers if layers is not None else slice(None)] = 1
    return ws + alpha * mask * vs.to(ws)


def edit_provenance(source_id: str, direction: str, alpha: float, gen_sha: str,
                    dir_info: dict) -> dict[str, str]:
    """PNG text chunks of an edited image."""
    return {"Software": f"cxredit {__version__}", "cxredit:synthetic": "true",
            "cxredit:edit": "true", "cxredit:source-id": source_id,
            "cxredit:direction": direction, "cxredit:direction-method": str(dir_info.get("method")),
            "cxredit:alpha": f"{alpha:g}", "cxredit:generator-sha256": gen_sha,
            "Description": "SYNTHETIC EDIT made by cxredit (StyleGAN2 latent edit); "
                           "not a real radiograph, not for diagnosis"}


@torch.no_grad()
def run_edit(gan: str | Path, latents: str | Path, direction: str | Path, alphas: list[float],
             out: str | Path, layers: str | None = None, limit: int | None = None,
             dicom: bool = False, device: str | None = None, batch: int = 16) -> dict:
    """Edit latents along a direction for every alpha; the API of `cxredit edit`.

    Writes `<id>_a<alpha>.png` per image and alpha (and `.dcm` with `dicom`), and `sweep.png`
    (rows = images, columns = alphas).

    Returns:
        {"count", "sweep", "files"}.
    """
    from cxredit.checkpoint import checkpoint_sha256
    from cxredit.data.io import write_dicom, write_png
    from cxredit.latent.directions import load_direction
    from cxredit.latent.io import load_latents
    from cxredit.runs import find_checkpoint, save_image_grid
    from cxredit.train.gan import load_generator

    if not alphas:
        raise ValueError("--alphas: give at least one value")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ck = find_checkpoint(gan)
    sha = checkpoint_sha256(ck)
    G = load_generator(ck, dev)
    w_np, ids, info, _ = load_latents(latents)
    if info.get("generator", {}).get("sha256") not in (None, sha):
        raise ValueError(f"{latents}: latents were made with another generator "
                         f"({info['generator'].get('path')})")
    v_np, dinfo = load_direction(direction)
    if w_np.shape[-1] != G.w_dim or v_np.shape[-1] != G.w_dim:
        raise ValueError(f"w_dim mismatch: latents {w_np.shape[-1]}, direction "
                         f"{v_np.shape[-1]}, generator {G.w_dim}")
    if limit is not None:
        w_np, ids = w_np[:limit], ids[:limit]
    lay = parse_layers(layers, G.num_ws)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    w = torch.from_numpy(np.asarray(w_np, np.float32)).to(dev)
    v = torch.from_numpy(np.asarray(v_np, np.float32)).to(dev)
    grid = torch.empty(len(ids), len(alphas), 1, G.img_resolution, G.img_resolution)
    files = []
    for j, a in enumerate(alphas):
        for s in range(0, len(ids), batch):
            wa = apply_direction(w[s:s + batch], v, a, G.num_ws, lay)
            imgs = G.synthesis(wa, noise_mode="const").clamp(-1, 1).cpu()
            grid[s:s + batch, j] = imgs
            for i, img in zip(ids[s:s + batch], imgs):
                name = f"{Path(i).stem if not i.isdigit() else 'row' + i.zfill(7)}_a{a:g}"
                meta = edit_provenance(i, str(direction), a, sha, dinfo)
                arr = (img[0].numpy() + 1) / 2
                files.append(write_png(out / f"{name}.png", arr, provenance=meta))
                if dicom:
                    files.append(write_dicom(out / f"{name}.dcm", arr, provenance=meta,
                                             like=i if Path(i).suffix.lower() in (".dcm", ".dicom")
                                             and Path(i).exists() else None))
    sweep = save_image_grid(grid.flatten(0, 1), out / "sweep.png", nrow=len(alphas),
                            provenance=edit_provenance("sweep", str(direction), float("nan"), sha,
                                                       dinfo))
    return {"count": len(ids), "sweep": str(sweep), "files": len(files)}
