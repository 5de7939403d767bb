"""Losses of the GAN (non-saturating logistic, R1, path length) and image similarity (SSIM).

Kept free of training-loop state so they can be tested in isolation; the lazy intervals and
weights are applied by the caller.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def g_nonsaturating(fake_logits: Tensor) -> Tensor:
    """G loss: softplus(-D(G(z))), mean over the batch. fake_logits: [N,1]."""
    return F.softplus(-fake_logits).mean()


def d_logistic(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """D loss: softplus(D(G(z))) + softplus(-D(x)), mean over the batch."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def r1_penalty(real_logits: Tensor, reals: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): ||d D(x) / d x||^2 per sample, [N].

    `reals` must require grad and `real_logits` be computed from it; the graph is kept
    (create_graph) so the penalty can be back-propagated into D.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), reals, create_graph=True)
    return grad.square().sum(dim=(1, 2, 3))


def path_length(images: Tensor, ws: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Path lengths ||J_w^T y|| per sample, y ~ N(0, I) / sqrt(H*W) (Karras et al. 2020), [N].

    Args:
        images: [N,C,H,W] generated from `ws` (graph kept).
        ws: [N,num_ws,w_dim] requiring grad.
        generator: RNG for the random image-space direction.
    """
    n, _, h, w = images.shape
    y = torch.randn(images.shape, generator=generator, device=images.device,
                    dtype=images.dtype) / math.sqrt(h * w)
    (grad,) = torch.autograd.grad((images * y).sum(), ws, create_graph=True)
    return grad.square().sum(dim=2).mean(dim=1).sqrt()


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0, win_size: int | None = None) -> Tensor:
    """Per-image SSIM of images in [-1,1] (pytorch-msssim), [N].

    The Gaussian window (11 px, sigma 1.5 in the original) is shrunk for small images so that
    32-px test images still have a valid interior.
    """
    from pytorch_msssim import ssim as _ssim

    side = min(x.shape[-2:])
    win = win_size or (11 if side >= 64 else (7 if side >= 32 else 3))
    return _ssim(x.float(), y.float(), data_range=data_range, win_size=win,
                 size_average=False)
