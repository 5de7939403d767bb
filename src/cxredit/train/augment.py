"""Adaptive discriminator augmentation (ADA) for single-channel chest X-rays.

After Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data". D sees
reals and fakes through the same random, differentiable augmentation; each augmentation is
applied to a sample with probability `p * multiplier`, and `AdaController` steers `p` so that D
does not overfit. Augmentations do not "leak" into G's output (G gains nothing by imitating
them) while each is applied with probability < 1 and is invertible in distribution; the ADA
paper found the geometric and colour ops safe for p up to about 0.8.

The defaults are ADA's "bgc" pipeline adapted to radiographs: no hue/saturation (one channel),
no 90-degree rotations and no luma flip (an inverted or sideways chest film is not a plausible
image, and turning them on changes what "realistic" means for D). Every geometric op is folded
into one 3x3 inverse matrix per sample (output pixel -> input pixel, in pixel units centred on
the image), executed in a single resampling pass:

* samples whose matrix is a signed permutation plus an integer shift (x-flip, 90-degree turns,
  integer translation) are *blitted*: an exact gather with symmetric reflection at the border;
* all others are resampled with `F.grid_sample` (bilinear, `padding_mode="reflection"`), at
  `supersample` x the output resolution followed by box averaging. ADA instead pads with
  reflection, upsamples with a sym6 wavelet, samples and downsamples. Output supersampling is
  the cheap stand-in: it anti-aliases the minifying transforms (scale < 1, anisotropy) at the
  cost of a mild, invertible blur (kernel [1/8, 3/4, 1/8] per axis at identity).
  `padding_mode="reflection"` reflects about the image border as often as needed, so it needs
  no data-dependent pad margin (no host sync, no shape that varies per batch) and, like ADA's
  reflect pad, it never shows D a black border that only augmented images have.

All randomness comes from the `torch.Generator` passed to `forward` (draws happen on its
device and are then moved to the images' device), so a resumed run augments identically.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AdaController", "AugmentPipe"]


class _Rng:
    """Draws from `generator` on its device, or from the global CPU generator when None."""

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator
        self.device = generator.device if generator is not None else torch.device("cpu")

    def uniform(self, *shape: int) -> Tensor:
        return torch.rand(shape, generator=self.generator, device=self.device)

    def normal(self, *shape: int) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device)

    def gate(self, n: int, prob: float) -> Tensor:
        """[n] bool: which samples get an augmentation applied with probability `prob`."""
        return self.uniform(n) < prob


def _mat(a: Tensor, b: Tensor, tx: Tensor, c: Tensor, d: Tensor, ty: Tensor) -> Tensor:
    """Batch of homogeneous 2D matrices [[a, b, tx], [c, d, ty], [0, 0, 1]]: [N] each -> [N,3,3]."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, tx, c, d, ty, zero, zero, one], dim=-1).view(-1, 3, 3)


def _scale(sx: Tensor, sy: Tensor) -> Tensor:
    zero = torch.zeros_like(sx)
    return _mat(sx, zero, zero, zero, sy, zero)


def _rotate(cos: Tensor, sin: Tensor) -> Tensor:
    zero = torch.zeros_like(cos)
    return _mat(cos, -sin, zero, sin, cos, zero)


def _translate(tx: Tensor, ty: Tensor) -> Tensor:
    one = torch.ones_like(tx)
    return _mat(one, torch.zeros_like(tx), tx, torch.zeros_like(tx), one, ty)


def _reflect(i: Tensor, n: int) -> Tensor:
    """Fold integer indices into [0, n) by symmetric reflection (edge repeated, any distance)."""
    i = torch.remainder(i, 2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _blit(x: Tensor, mat: Tensor) -> Tensor:
    """Exact integer transform. x: [M,1,H,W]; mat: [M,3,3] integer-valued inverse -> [M,1,H,W]."""
    m, _, h, w = x.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    ys, xs = torch.meshgrid(
        torch.arange(h, device=x.device, dtype=torch.float32) - cy,
        torch.arange(w, device=x.device, dtype=torch.float32) - cx,
        indexing="ij",
    )
    dst = torch.stack([xs.flatten(), ys.flatten(), torch.ones_like(xs).flatten()])  # [3, H*W]
    src = mat.to(x.device, torch.float32) @ dst  # [M, 3, H*W]
    sx = _reflect(torch.round(src[:, 0] + cx).long(), w)
    sy = _reflect(torch.round(src[:, 1] + cy).long(), h)
    return x.reshape(m, h * w).gather(1, sy * w + sx).view(m, 1, h, w)


def _resample(x: Tensor, mat: Tensor, supersample: int) -> Tensor:
    """Bilinear resampling. x: [M,1,H,W]; mat: [M,3,3] inverse (pixel units) -> [M,1,H,W]."""
    h, w = x.shape[-2:]
    # With align_corners=False a centred pixel coordinate is the normalised one times size/2.
    half = torch.tensor([w / 2, h / 2, 1.0], device=mat.device, dtype=mat.dtype)
    theta = (mat * half[None, None, :]) / half[None, :, None]  # diag(1/half) @ mat @ diag(half)
    # Grid coordinates in at least fp32 (half-precision coordinates would be off by ~0.1 px).
    dtype = torch.promote_types(x.dtype, torch.float32)
    theta = theta[:, :2, :].to(x.device, dtype)
    # Same grid as F.affine_grid(align_corners=False), built with one einsum: several times
    # faster on CPU than affine_grid's batched matmul with an inner dimension of 3.
    hs, ws = h * supersample, w * supersample
    ys = (torch.arange(hs, device=x.device, dtype=dtype) * 2 + 1) / hs - 1
    xs = (torch.arange(ws, device=x.device, dtype=dtype) * 2 + 1) / ws - 1
    ones = torch.ones(hs, ws, device=x.device, dtype=dtype)
    base = torch.stack([*torch.meshgrid(xs, ys, indexing="xy"), ones], dim=-1)  # [hs, ws, 3]
    grid = torch.einsum("hwk,njk->nhwj", base, theta).to(x.dtype)  # [M, hs, ws, 2]
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if supersample == 2:  # same as avg_pool2d(y, 2), about 3x faster on CPU
        return (y[..., ::2, ::2] + y[..., 1::2, ::2] + y[..., ::2, 1::2] + y[..., 1::2, 1::2]) / 4
    return F.avg_pool2d(y, supersample) if supersample > 1 else y


class AugmentPipe(nn.Module):
    """ADA augmentation of grayscale images, differentiable w.r.t. the images.

    `p` (a registered buffer, saved with the module) is the overall probability; each op fires
    per sample with probability `p * multiplier`. Rebuild with `AugmentPipe(**pipe.config)` and
    restore `p` from the state dict.
    """

    def __init__(
        self,
        xflip: float = 1,  # probability multiplier for x-flip
        rotate90: float = 0,  # probability multiplier for 90-degree turns (off: films are upright)
        xint: float = 1,  # probability multiplier for integer translation
        xint_max: float = 0.125,  # range of integer translation, fraction of the image size
        scale: float = 1,  # probability multiplier for isotropic scaling
        rotate: float = 1,  # probability multiplier for arbitrary rotation
        aniso: float = 1,  # probability multiplier for anisotropic scaling
        xfrac: float = 1,  # probability multiplier for fractional translation
        scale_std: float = 0.2,  # log2 standard deviation of isotropic scaling
        rotate_max: float = 1.0,  # range of arbitrary rotation, fraction of a full turn
        aniso_std: float = 0.2,  # log2 standard deviation of anisotropic scaling
        xfrac_std: float = 0.125,  # std of fractional translation, fraction of the image size
        brightness: float = 1,  # probability multiplier for brightness
        contrast: float = 1,  # probability multiplier for contrast
        lumaflip: float = 0,  # probability multiplier for x -> -x (off: it inverts X-rays)
        brightness_std: float = 0.2,  # standard deviation of the additive brightness offset
        contrast_std: float = 0.5,  # log2 standard deviation of the contrast factor
        noise: float = 0,  # probability multiplier for additive Gaussian noise
        noise_std: float = 0.1,  # noise sigma is |N(0, noise_std)| per sample
        cutout: float = 0,  # probability multiplier for cutout (a rectangle set to 0)
        cutout_size: float = 0.5,  # cutout side, fraction of the image size
        supersample: int = 2,  # output supersampling factor of the resampling pass (1 = off)
    ) -> None:
        super().__init__()
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        # Plain floats (and one int) so the config is JSON and rebuilds with AugmentPipe(**cfg).
        self.config: dict[str, Any] = {k: float(v) for k, v in args.items()}
        self.config["supersample"] = int(supersample)
        if self.config["supersample"] < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample}")
        for key, value in self.config.items():
            setattr(self, key, value)
        self.register_buffer("p", torch.zeros([]))  # overall augmentation probability

    def extra_repr(self) -> str:
        active = {k: v for k, v in self.config.items() if v}
        return ", ".join(f"{k}={v}" for k, v in active.items())

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment a batch.

        Args:
            images: [N,1,H,W] floating point, nominally in [-1,1]; any device.
            generator: source of all randomness (its device may differ from the images'); the
                global CPU generator when None. Not consumed when `p == 0`.

        Returns:
            [N,1,H,W], same dtype and device; `images` itself when `p == 0` or no op fired.

        Reading `p` and routing samples are host decisions: one small sync per call on GPU.
        """
        if images.ndim != 4 or images.shape[1] != 1 or not images.is_floating_point():
            raise ValueError(f"expected float images [N,1,H,W], got {tuple(images.shape)}")
        p = float(self.p)
        if p <= 0:
            return images
        n, _, h, w = images.shape
        rng = _Rng(generator)
        images = self._apply_geometry(images, self._geometry(rng, n, h, w, p))
        images = self._apply_color(images, rng, p)
        return self._apply_corruptions(images, rng, p)

    def _geometry(self, rng: _Rng, n: int, h: int, w: int, p: float) -> Tensor:
        """Compose the per-sample inverse transform (output px -> input px), [N,3,3] on rng."""
        g = torch.eye(3, device=rng.device).expand(n, 3, 3)
        # Each step right-multiplies the inverse of the op, so ops apply to the image in order.
        if self.xflip > 0:
            flip = (rng.uniform(n) < 0.5) & rng.gate(n, self.xflip * p)
            g = g @ _scale(1.0 - 2.0 * flip.float(), torch.ones(n, device=rng.device))
        if self.rotate90 > 0:
            k = (rng.uniform(n) * 4).floor().long().clamp(max=3)
            k = torch.where(rng.gate(n, self.rotate90 * p), k, torch.zeros_like(k))
            table = torch.tensor([1.0, 0.0, -1.0, 0.0], device=rng.device)  # exact cos(k pi/2)
            g = g @ _rotate(table[k], table[(k + 3) % 4])
        if self.xint > 0:
            t = (rng.uniform(n, 2) * 2 - 1) * self.xint_max
            t = torch.where(rng.gate(n, self.xint * p)[:, None], t, torch.zeros_like(t))
            g = g @ _translate(-torch.round(t[:, 0] * w), -torch.round(t[:, 1] * h))
        if self.scale > 0:
            s = torch.exp2(rng.normal(n) * self.scale_std)
            s = torch.where(rng.gate(n, self.scale * p), s, torch.ones_like(s))
            g = g @ _scale(1 / s, 1 / s)
        # Rotation happens before and/or after the anisotropic stretch, each with p_rot, so that
        # P(any rotation) = rotate * p and stretches are not always axis-aligned.
        p_rot = 1 - math.sqrt(max(0.0, 1 - self.rotate * p))
        for stage in ("pre", "post"):
            if self.rotate > 0:
                theta = (rng.uniform(n) * 2 - 1) * math.pi * self.rotate_max
                theta = torch.where(rng.gate(n, p_rot), theta, torch.zeros_like(theta))
                g = g @ _rotate(torch.cos(theta), torch.sin(theta))
            if self.aniso > 0 and stage == "pre":
                s = torch.exp2(rng.normal(n) * self.aniso_std)
                s = torch.where(rng.gate(n, self.aniso * p), s, torch.ones_like(s))
                g = g @ _scale(1 / s, s)
        if self.xfrac > 0:
            t = rng.normal(n, 2) * self.xfrac_std
            t = torch.where(rng.gate(n, self.xfrac * p)[:, None], t, torch.zeros_like(t))
            g = g @ _translate(-t[:, 0] * w, -t[:, 1] * h)
        return g

    def _apply_geometry(self, images: Tensor, g: Tensor) -> Tensor:
        """Route each sample: untouched (identity), exact blit (integer), or resampled."""
        h, w = images.shape[-2:]
        eye = torch.eye(3, device=g.device)
        moved = (g - eye).abs().amax(dim=(1, 2)) > 1e-6
        if not bool(moved.any()):
            return images  # identity fast path: no resampling, no copy
        rounded = g.round()
        integer = (g - rounded).abs().amax(dim=(1, 2)) < 1e-4
        lin = rounded[:, :2, :2].abs()
        integer &= (lin.sum(dim=2) == 1).all(dim=1)  # signed permutation, no scaling
        if h != w:
            integer &= lin[:, 0, 0] == 1  # a 90-degree turn of a non-square image resamples
        out = images
        for mask, mats, fn in (
            (moved & integer, rounded, _blit),
            (moved & ~integer, g, lambda x, m: _resample(x, m, self.supersample)),
        ):
            if not bool(mask.any()):
                continue
            if bool(mask.all()):
                return fn(images, mats)
            idx = mask.nonzero().squeeze(1)
            sub = fn(images[idx.to(images.device)], mats[idx])
            out = out.index_copy(0, idx.to(images.device), sub)  # out of place: autograd-safe
        return out

    def _apply_color(self, images: Tensor, rng: _Rng, p: float) -> Tensor:
        """out = a * x + b per sample; ADA order: brightness, then contrast, then luma flip.

        Contrast scales about 0 (ADA's choice for centred data), not about each image's mean:
        the op stays independent of image content, and brightness (which precedes it) already
        moves the level. Luma flip on one channel is the reflection x -> -x.
        """
        n = images.shape[0]
        a, b = torch.ones(n, device=rng.device), torch.zeros(n, device=rng.device)
        if self.brightness > 0:
            off = rng.normal(n) * self.brightness_std
            b = b + torch.where(rng.gate(n, self.brightness * p), off, torch.zeros_like(off))
        if self.contrast > 0:
            c = torch.exp2(rng.normal(n) * self.contrast_std)  # lognormal(0, std * ln 2)
            c = torch.where(rng.gate(n, self.contrast * p), c, torch.ones_like(c))
            a, b = a * c, b * c
        if self.lumaflip > 0:
            flip = (rng.uniform(n) < 0.5) & rng.gate(n, self.lumaflip * p)
            sign = 1.0 - 2.0 * flip.float()
            a, b = a * sign, b * sign
        if bool((a == 1).all() and (b == 0).all()):
            return images
        a = a.to(images.device, images.dtype).view(n, 1, 1, 1)
        return images * a + b.to(images.device, images.dtype).view(n, 1, 1, 1)

    def _apply_corruptions(self, images: Tensor, rng: _Rng, p: float) -> Tensor:
        """Additive Gaussian noise and cutout (both off by default)."""
        n, _, h, w = images.shape
        if self.noise > 0:
            sigma = rng.normal(n).abs() * self.noise_std
            sigma = torch.where(rng.gate(n, self.noise * p), sigma, torch.zeros_like(sigma))
            if bool((sigma > 0).any()):
                z = rng.normal(n, 1, h, w) * sigma.view(n, 1, 1, 1)
                images = images + z.to(images.device, images.dtype)
        if self.cutout > 0:
            size = torch.where(rng.gate(n, self.cutout * p), self.cutout_size, 0.0)
            center = rng.uniform(n, 2)
            if bool((size > 0).any()):
                size, center = size.to(images.device), center.to(images.device)
                xs = (torch.arange(w, device=images.device) + 0.5) / w
                ys = (torch.arange(h, device=images.device) + 0.5) / h
                keep_x = (xs[None, :] - center[:, :1]).abs() >= size[:, None] / 2  # [N,W]
                keep_y = (ys[None, :] - center[:, 1:]).abs() >= size[:, None] / 2  # [N,H]
                keep = keep_y[:, None, :, None] | keep_x[:, None, None, :]
                images = images * keep.to(images.dtype)
        return images


class AdaController:
    """Adjusts `AugmentPipe.p` so that D's overfitting heuristic r_t stays at `target`.

    r_t = E[sign(D(x_real))] over the last `interval` steps: 0 when D cannot tell its training
    reals from anything else, 1 when it is confidently positive on every real it has seen (it
    memorised them). ADA moves p up when r_t > target and down otherwise, by a fixed step sized
    so that p can travel 0 -> 1 in `kimg` thousand real images.

    Call `accumulate(real_logits)` after each D step on reals and `maybe_update(pipe)` once per
    training step. Under torch.distributed the sign statistics are summed over ranks before
    each update, so every rank computes the same p; `batch_size` is then the global batch.
    """

    def __init__(
        self,
        *,
        batch_size: int,  # images per training step (all ranks together)
        target: float = 0.6,  # target value of r_t
        interval: int = 4,  # training steps between adjustments of p
        kimg: float = 500.0,  # p can go from 0 to 1 in this many thousand images
    ) -> None:
        if batch_size < 1 or interval < 1 or kimg <= 0:
            raise ValueError("batch_size and interval must be >= 1 and kimg > 0")
        self.batch_size, self.target, self.interval, self.kimg = batch_size, target, interval, kimg
        self.sign_sum: Tensor | float = 0.0  # kept as a tensor between updates: no device sync
        self.count = 0
        self.step = 0
        self.last_rt: float | None = None

    def accumulate(self, real_logits: Tensor) -> None:
        """Record D's outputs on real images. real_logits: any shape, e.g. [N] or [N,1]."""
        self.sign_sum = self.sign_sum + real_logits.detach().sign().sum().double()
        self.count += real_logits.numel()

    def maybe_update(self, pipe: AugmentPipe) -> float | None:
        """Count one training step; every `interval` steps adjust `pipe.p` in place.

        Returns:
            The new p when it was adjusted, else None.
        """
        self.step += 1
        if self.step % self.interval != 0:
            return None
        stats = torch.tensor([float(self.sign_sum), float(self.count)], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stats = stats.to(pipe.p.device)
            torch.distributed.all_reduce(stats)
        self.sign_sum, self.count = 0.0, 0
        sign_sum, count = stats.tolist()
        if count == 0:
            return None
        self.last_rt = sign_sum / count
        direction = math.copysign(1.0, self.last_rt - self.target)
        if self.last_rt == self.target:
            direction = 0.0
        adjust = direction * (self.batch_size * self.interval) / (self.kimg * 1000)
        with torch.no_grad():
            pipe.p.copy_((pipe.p + adjust).clamp(0.0, 1.0))
        return float(pipe.p)

    def state_dict(self) -> dict[str, Any]:
        """Accumulators as plain Python numbers (JSON-able), for exact resume."""
        return {
            "sign_sum": float(self.sign_sum),
            "count": int(self.count),
            "step": int(self.step),
            "last_rt": self.last_rt,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sign_sum = float(state["sign_sum"])
        self.count = int(state["count"])
        self.step = int(state["step"])
        self.last_rt = None if state.get("last_rt") is None else float(state["last_rt"])
