"""FID and KID between two image sets, on features of a pluggable extractor.

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to the two feature sets,
  ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
- KID (Bińkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / D + 1)^3, averaged over random subsets as in NVlabs' `kernel_inception_distance`;
  being unbiased it can be slightly negative when the two sets share a distribution.

Both depend on the feature extractor, which `compare_sets` always writes into its result: never
compare numbers across extractors (or across image resolutions / sample counts for FID, which is
biased in the number of samples).

Image sources for `compare_sets` are iterables of [B,1,R,R] batches in [-1,1]: `store_batches`,
`generator_batches` and `folder_batches` make them from a store, a GAN checkpoint or PNG files.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg

from cxredit.metrics.features import FeatureExtractor, get_extractor

log = logging.getLogger(__name__)


def _as_features(f: Any, what: str) -> np.ndarray:
    f = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"{what}: expected features [N, D] with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{what}: features contain NaN or inf")
    return f.astype(np.float64)


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_features(a, "feats_a"), _as_features(b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    return a, b


def frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray,
                     cov_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b).

    A singular product (few samples for D) gets `eps` on both diagonals; imaginary parts of
    the matrix square root (numerical noise) are dropped after checking they are small.
    """
    diff = mu_a - mu_b
    with warnings.catch_warnings():
        warnings.simplefilter("error", linalg.LinAlgWarning)  # scipy warns when singular
        try:
            covmean = linalg.sqrtm(cov_a @ cov_b)
            singular = not np.isfinite(covmean).all()
        except linalg.LinAlgWarning:
            singular = True
    if singular:
        log.info("FID: singular covariance product; adding %g to the diagonals", eps)
        off = np.eye(len(cov_a)) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((cov_a + off) @ (cov_b + off))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3 * max(1.0, np.abs(np.diagonal(covmean).real).max()):
            raise ValueError(f"FID: matrix square root has a large imaginary part ({imag:.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def fid(feats_a: Any, feats_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to features [N_a, D] and [N_b, D]."""
    a, b = _pair(feats_a, feats_b)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False),
                            b.mean(0), np.cov(b, rowvar=False))


def kid(feats_a: Any, feats_b: Any, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance: unbiased MMD^2, cubic polynomial kernel, over random subsets.

    Args:
        feats_a, feats_b: [N_a, D], [N_b, D] features.
        subsets: number of random subsets.
        subset_size: images per subset (capped at min(N_a, N_b)); drawn without replacement.
        seed: for `numpy.random.default_rng`.

    Returns:
        (mean, std) of the per-subset MMD^2 estimates.
    """
    a, b = _pair(feats_a, feats_b)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    n, m = a.shape[1], min(len(a), len(b), subset_size)
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 samples, got {m}")
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / n + 1) ** 3
        kyy = (y @ y.T / n + 1) ** 3
        kxy = (x @ y.T / n + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        vals[i] = within - 2 * kxy.sum() / (m * m)
    return float(vals.mean()), float(vals.std())


# ----------------------------------------------------------------------------------------------
# Image sources


def extract(batches: Iterable[torch.Tensor] | torch.Tensor, extractor: FeatureExtractor
            ) -> np.ndarray:
    """Features [N, D] of all images of `batches` ([B,1,R,R] tensors, or one [N,1,R,R])."""
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    feats = [extractor(b) for b in batches]
    return np.concatenate(feats) if feats else np.zeros((0, extractor.dim))


def store_batches(store: Any, split: str | None = None, limit: int | None = None,
                  batch: int = 64, query: str | None = None) -> Iterator[torch.Tensor]:
    """Images of a store (path or `ImageStore`) as [B,1,R,R] batches in [-1,1].

    Args:
        split: "train", "val", "test" or None for all.
        limit: at most this many images (the first rows of the subset).
        query: optional label query (see `ImageStore.select`).
    """
    from cxredit.data.store import ImageStore

    st = store if isinstance(store, ImageStore) else ImageStore(store)
    rows = st.select(split, query)
    if limit is not None:
        rows = rows[:limit]
    for s in range(0, len(rows), batch):
        yield st.tensor(rows[s:s + batch])


@torch.no_grad()
def generator_batches(gan: Any, n: int, batch: int = 64, psi: float = 1.0, seed: int = 0,
                      device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """`n` samples of a generator (GAN run / checkpoint, or a `Generator`), [B,1,R,R] in [-1,1].

    z and the noise inputs come from one `torch.Generator` seeded with `seed`, so a seed gives
    the same images on the same device.
    """
    if isinstance(gan, torch.nn.Module):
        G = gan.to(device).eval()
    else:
        from cxredit.train.gan import load_generator

        G = load_generator(gan, device=device)
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    for s in range(0, n, batch):
        z = torch.randn(min(batch, n - s), G.z_dim, generator=gen, device=device)
        yield G(z, psi=psi, noise_mode="random", generator=gen).clamp(-1, 1).cpu()


def folder_batches(folder: str | os.PathLike, resolution: int, batch: int = 64,
                   limit: int | None = None) -> Iterator[torch.Tensor]:
    """PNG/JPEG files of `folder` (sorted, recursive), read and resized to `resolution`."""
    from cxredit.data.io import IMAGE_EXTENSIONS, read_xray_resized

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"{folder}: no PNG/JPEG images found")
    paths = paths[:limit] if limit is not None else paths
    for s in range(0, len(paths), batch):
        arr = np.stack([read_xray_resized(p, resolution) for p in paths[s:s + batch]])
        yield torch.from_numpy(arr).float().div_(127.5).sub_(1).unsqueeze(1)


def compare_sets(a_images: Iterable[torch.Tensor] | torch.Tensor,
                 b_images: Iterable[torch.Tensor] | torch.Tensor,
                 extractor: FeatureExtractor | str, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """FID and KID between two image sets, with the extractor named in the result.

    Args:
        a_images, b_images: iterables of [B,1,R,R] batches in [-1,1] (or one tensor each).
        extractor: a `FeatureExtractor`, or a name for `get_extractor` (no options).
        kid_subsets, kid_subset_size, seed: see `kid`.

    Returns:
        {"fid", "kid_mean", "kid_std", "extractor", "feature_dim", "n_a", "n_b"}.
    """
    ex = get_extractor(extractor) if isinstance(extractor, str) else extractor
    fa, fb = extract(a_images, ex), extract(b_images, ex)
    k_mean, k_std = kid(fa, fb, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    return {"fid": fid(fa, fb), "kid_mean": k_mean, "kid_std": k_std, "extractor": ex.name,
            "feature_dim": int(ex.dim), "n_a": len(fa), "n_b": len(fb)}
