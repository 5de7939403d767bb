"""Editing: w' = w + alpha * v, rendered by G, written with provenance.

Every file written here is a synthetic image and says so: PNG text chunks (and, for DICOM,
ImageType DERIVED/SECONDARY plus a comment) name the source id, the direction, alpha and the
generator's sha256.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from cxredit import __version__


def parse_layers(text: str | None, num_ws: int) -> list[int] | None:
    """"0-5" or "0,2,4" -> layer indices (None = all layers)."""
    if not text:
        return None
    out: list[int] = []
    usage = f"--layers {text!r}: expected indices or ranges in 0..{num_ws - 1}, e.g. 0-5 or 0,2,4"
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise ValueError(usage)
        a = int(m[1])
        b = int(m[2]) if m[2] is not None else a
        if b < a:
            raise ValueError(f"--layers {text!r}: range {a}-{b} is reversed (write {b}-{a})")
        out.extend(range(a, b + 1))
    if any(not 0 <= i < num_ws for i in out):
        raise ValueError(usage)
    return sorted(set(out))


def parse_alphas(text: str, option: str = "--alphas") -> list[float]:
    """"-2,0,2" -> [-2.0, 0.0, 2.0]: finite numbers, repeats dropped (order kept); anything
    else is a one-line error naming `option`."""
    out: list[float] = []
    for part in text.split(","):
        try:
            a = float(part)
        except ValueError:
            raise ValueError(f"{option} {text!r}: {part.strip()!r} is not a number (expected "
                             "comma-separated numbers, e.g. -2,0,2)") from None
        if not math.isfinite(a):
            raise ValueError(f"{option} {text!r}: {part.strip()} is not a finite number")
        if a not in out:
            out.append(a)
    return out


def check_latents(w: torch.Tensor, num_ws: int, w_dim: int, what: str = "w") -> None:
    """Raise a one-line ValueError unless `w` is [N, w_dim] or [N, num_ws, w_dim]."""
    ok = (w.ndim == 2 and w.shape[1] == w_dim) or \
        (w.ndim == 3 and w.shape[1] == num_ws and w.shape[2] == w_dim)
    if not ok:
        raise ValueError(f"{what} of shape {list(w.shape)} do not fit the generator: expected "
                         f"[N, {w_dim}] (W) or [N, {num_ws}, {w_dim}] (W+)")


def check_direction(v, num_ws: int, w_dim: int, where: object = "direction",
                    error: type[ValueError] = ValueError) -> None:
    """Raise a one-line `error` unless direction `v` is [w_dim] (W) or [num_ws, w_dim] (W+);
    `where` (e.g. its file) starts the message."""
    if v.ndim not in (1, 2) or v.shape[-1] != w_dim or (v.ndim == 2 and v.shape[0] != num_ws):
        raise error(f"{where}: direction of shape {list(v.shape)} does not fit the generator "
                    f"([{w_dim}] or [{num_ws}, {w_dim}])")


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

    Raises:
        ValueError: shapes that do not fit together or the generator, a non-finite alpha,
            layers outside 0..num_ws-1.
    """
    check_latents(w, num_ws, int(w.shape[-1]), "latents")
    if v.shape[-1] != w.shape[-1]:
        raise ValueError(f"direction w_dim {v.shape[-1]} != the latents' w_dim {w.shape[-1]}")
    check_direction(v, num_ws, int(w.shape[-1]))
    if not math.isfinite(alpha):
        raise ValueError(f"edit strength alpha must be finite, got {alpha}")
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < num_ws]
        if bad or not layers:
            raise ValueError(f"layers {list(layers)}: expected indices 0..{num_ws - 1}")
    if layers is None and w.ndim == 2 and v.ndim == 1:
        return w + alpha * v
    ws = w if w.ndim == 3 else w.unsqueeze(1).expand(-1, num_ws, -1)
    vs = v if v.ndim == 2 else v.unsqueeze(0).expand(num_ws, -1)
    mask = torch.zeros(num_ws, 1, dtype=ws.dtype, device=ws.device)
    mask[layers if layers is not None else slice(None)] = 1
    return ws + alpha * mask * vs.to(ws)


def edit_provenance(source_id: str, direction: str, alpha: float | str, gen_sha: str,
                    dir_info: dict, layers: list[int] | None = None) -> dict[str, str]:
    """PNG text chunks of an edited image (`alpha` may be a text such as a list of them;
    `layers`: the W+ layers edited, None = all)."""
    out = {"Software": f"cxredit {__version__}", "cxredit:synthetic": "true",
           "cxredit:edit": "true", "cxredit:source-id": source_id,
           "cxredit:direction": direction, "cxredit:direction-method": str(dir_info.get("method")),
           "cxredit:alpha": alpha if isinstance(alpha, str) else f"{alpha:g}",
           "cxredit:generator-sha256": gen_sha,
           "Description": "SYNTHETIC EDIT made by cxredit (StyleGAN2 latent edit); "
                          "not a real radiograph, not for diagnosis"}
    if layers is not None:
        out["cxredit:layers"] = ",".join(str(i) for i in layers)
    return out


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
    from cxredit.data.io import output_stems, write_dicom, write_png
    from cxredit.latent.directions import load_direction
    from cxredit.latent.io import load_latents
    from cxredit.runs import find_checkpoint, save_image_grid
    from cxredit.train.gan import load_generator

    if not alphas:
        raise ValueError("--alphas: give at least one value")
    bad = [a for a in alphas if not math.isfinite(a)]
    if bad:
        raise ValueError(f"--alphas: {bad[0]} is not a finite number")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    alphas = list(dict.fromkeys(float(a) for a in alphas))  # each alpha once
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ck = find_checkpoint(gan)
    sha = checkpoint_sha256(ck)
    G = load_generator(ck, dev)
    w_np, ids, info, _ = load_latents(latents)
    if info.get("generator", {}).get("sha256") not in (None, sha):
        raise ValueError(f"{latents}: latents were made with another generator "
                         f"({info['generator'].get('path')})")
    v_np, dinfo = load_direction(direction)
    try:
        check_latents(torch.from_numpy(np.asarray(w_np)), G.num_ws, G.w_dim, "latents")
    except ValueError as e:
        raise ValueError(f"{latents}: {e}") from None
    check_direction(v_np, G.num_ws, G.w_dim, direction)
    if limit is not None:
        w_np, ids = w_np[:limit], ids[:limit]
    lay = parse_layers(layers, G.num_ws)
    stems = output_stems(ids)
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
            for i, stem, img in zip(ids[s:s + batch], stems[s:s + batch], imgs):
                name = f"{stem}_a{a:g}"
                meta = edit_provenance(i, str(direction), a, sha, dinfo, lay)
                arr = (img[0].numpy() + 1) / 2
                files.append(write_png(out / f"{name}.png", arr, provenance=meta))
                if dicom:
                    files.append(write_dicom(out / f"{name}.dcm", arr, provenance=meta,
                                             like=i if Path(i).suffix.lower() in (".dcm", ".dicom")
                                             and Path(i).exists() else None))
    sweep = save_image_grid(grid.flatten(0, 1), out / "sweep.png", nrow=len(alphas),
                            provenance=edit_provenance(
                                "sweep", str(direction), ",".join(f"{a:g}" for a in alphas), sha,
                                dinfo, lay))
    return {"count": len(ids), "sweep": str(sweep), "files": len(files)}
