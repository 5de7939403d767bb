"""Per-image reconstruction metrics: MSE, PSNR, SSIM and MS-SSIM of images in [-1, 1].

All functions take two batches `x`, `y` of shape [N,1,R,R] in [-1,1] (peak-to-peak 2) and
return one value per image, [N], so callers can average, take medians or keep them per id.

MS-SSIM with scales adapted to small images. pytorch-msssim's `ms_ssim` asserts
side > (win-1) * 2^4 whatever the number of scales, i.e. > 160 px with the standard
11-px window: none of our 32-128 px images qualify. We therefore compute it here (same
formulas: Gaussian window applied without padding, 2x2 average pooling between scales,
contrast-structure terms at the finer scales and full SSIM at the coarsest, ReLU-clipped,
weighted geometric mean) and adapt three things to the image side R:

- window: 11 px (sigma 1.5) from 64 px up, 7 px from 32 px, 3 px below (the rule of
  `cxredit.train.losses.ssim`, so SSIM and the first MS-SSIM scale agree);
- scales: as many as keep the coarsest image at least one window wide, at most the standard
  5: L = min(5, 1 + floor(log2(R / win))), i.e. 3 scales at 32 px (32, 16, 8 with a 7-px
  window), 3 at 64 px (64, 32, 16 with 11 px), 4 at 128 px, 5 from 176 px (the standard
  setting, where the result equals pytorch-msssim's);
- weights: the first L of Wang et al.'s (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), renormalised to
  sum to 1.

Numbers are therefore comparable only at one resolution; `ms_ssim_config(R)` reports the
setting so that it can be written next to the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cxredit.train.losses import ssim as _ssim

DATA_RANGE = 2.0  # images in [-1, 1]
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003


def _check(x: Tensor, y: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 1 or x.shape != y.shape:
        raise ValueError(f"expected two image batches [N,1,R,R] of the same shape, got "
                         f"{list(x.shape)} and {list(y.shape)}")


def mse(x: Tensor, y: Tensor) -> Tensor:
    """Per-image mean squared error, [N] (on the [-1,1] scale)."""
    _check(x, y)
    return (x.float() - y.float()).square().mean(dim=(1, 2, 3))


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB, peak-to-peak 2, [N]; identical images give ~126 dB (MSE floor)."""
    _check(x, y)
    mse = (x.float() - y.float()).square().mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Per-image SSIM, [N] (window adapted to small images, see `cxredit.train.losses.ssim`)."""
    _check(x, y)
    return _ssim(x, y, data_range=DATA_RANGE)


def _window_size(side: int) -> int:
    return 11 if side >= 64 else (7 if side >= 32 else 3)


def ms_ssim_config(side: int) -> dict:
    """The MS-SSIM setting used for images of side `side`: {"win_size", "weights"}."""
    win = _window_size(side)
    levels = max(1, min(len(MS_SSIM_WEIGHTS), 1 + int(math.floor(math.log2(side / win)))))
    w = MS_SSIM_WEIGHTS[:levels]
    return {"win_size": win, "weights": tuple(v / sum(w) for v in w)}


def _gauss_window(size: int, sigma: float = 1.5) -> Tensor:
    c = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(c**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_cs(x: Tensor, y: Tensor, win: Tensor, k1: float = 0.01, k2: float = 0.03
             ) -> tuple[Tensor, Tensor]:
    """Mean SSIM and mean contrast-structure term per image, each [N] (valid filtering)."""
    c1, c2 = (k1 * DATA_RANGE) ** 2, (k2 * DATA_RANGE) ** 2
    wh, wv = win.view(1, 1, 1, -1), win.view(1, 1, -1, 1)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, wh), wv)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    lum = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (lum * cs).mean(dim=(1, 2, 3)), cs.mean(dim=(1, 2, 3))


def ms_ssim(x: Tensor, y: Tensor, win_size: int | None = None,
            weights: tuple[float, ...] | None = None) -> Tensor:
    """Per-image multi-scale SSIM, [N], with scales adapted to small images (module docstring).

    Args:
        x, y: [N,1,R,R] in [-1,1].
        win_size: Gaussian window (odd); default from `ms_ssim_config(R)`.
        weights: per-scale exponents (their count is the number of scales); default idem.
    """
    _check(x, y)
    cfg = ms_ssim_config(min(x.shape[-2:]))
    win_size = win_size or cfg["win_size"]
    weights = weights or cfg["weights"]
    side = min(x.shape[-2:])
    if win_size % 2 != 1 or side // 2 ** (len(weights) - 1) < win_size:
        raise ValueError(f"MS-SSIM with {len(weights)} scales and a {win_size}-px window needs "
                         f"images of at least {win_size * 2 ** (len(weights) - 1)} px, got {side}")
    win = _gauss_window(win_size).to(x.device)
    x, y = x.float(), y.float()
    terms = []
    for level in range(len(weights)):
        s, cs = _ssim_cs(x, y, win)
        if level < len(weights) - 1:
            terms.append(cs.relu())
            pad = [d % 2 for d in x.shape[2:]]
            x = F.avg_pool2d(x, kernel_size=2, padding=pad)
            y = F.avg_pool2d(y, kernel_size=2, padding=pad)
    terms.append(s.relu())
    w = torch.tensor(weights, dtype=x.dtype, device=x.device).view(-1, 1)
    return torch.prod(torch.stack(terms) ** w, dim=0)


METRICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": mse,
    "psnr": psnr,
    "ssim": ssim,
    "ms_ssim": ms_ssim,
}


@torch.no_grad()
def recon_metrics(x: Tensor, y: Tensor, names: tuple[str, ...] | None = None
                  ) -> dict[str, Tensor]:
    """All (or the named) reconstruction metrics of `x` vs `y`, each a [N] tensor.

    Args:
        x, y: [N,1,R,R] in [-1,1] (e.g. real images and their reconstructions).
        names: subset of `METRICS` keys; default all.
    """
    names = tuple(METRICS) if names is None else names
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    return {n: METRICS[n](x, y) for n in names}
