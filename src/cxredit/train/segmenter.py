"""Supervised training of the heart/lung `Segmenter` on a store with masks (phantoms).

Loss: BCE-with-logits + soft Dice on the three independent masks. BCE gives well-behaved
per-pixel gradients from the start; soft Dice counters the imbalance between the small heart
and the background, which BCE alone under-weights. Schedule, data order, stats, checkpoints
and exact resume come from `Trainer`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxredit.config import DictConfig, check_fields
from cxredit.data.phantom import MASK_NAMES
from cxredit.data.store import ImageStore
from cxredit.metrics.ctr import dice
from cxredit.models.segmenter import Segmenter, SegmenterConfig
from cxredit.runs import Run, save_image_grid
from cxredit.train import distributed as dist
from cxredit.train.loop import SingleNetTrainer, eval_batches, load_net, open_run

log = logging.getLogger(__name__)

CKPT_KIND = "segmenter"
SNAPSHOT_N = 8  # images per row of the snapshot grid
EVAL_MAX = 256  # validation images scored at each snapshot


@dataclass
class SegmenterTrainConfig(DictConfig):
    """Training of the heart/lung segmenter."""

    batch: int = 32  # images per step (global, split over ranks)
    lr: float = 2e-3  # Adam learning rate
    kimg: float = 20.0  # length in thousands of images
    snap_kimg: float = 2.0  # checkpoint + snapshot interval (kimg)
    keep_checkpoints: int = 3  # newest checkpoints kept
    keep_every_kimg: float = 0.0  # also keep checkpoints at multiples of this (0 = none)
    seed: int = 0  # seed of every RNG of the run
    base_channels: int = 16  # `SegmenterConfig.base_channels`
    depth: int = 3  # `SegmenterConfig.depth`

    def __post_init__(self) -> None:
        if self.batch < 1 or self.kimg <= 0 or self.snap_kimg <= 0 or self.lr <= 0:
            raise ValueError("batch, kimg, snap_kimg and lr must be positive")
        check_fields(self, positive=("batch", "lr", "kimg", "snap_kimg", "keep_checkpoints"),
                     nonnegative=("keep_every_kimg",))


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """BCE-with-logits + mean over masks of the soft Dice loss (pooled over the batch).

    Args:
        logits: [N,3,R,R]; target: [N,3,R,R] in {0,1}.

    Returns:
        (loss, bce, soft_dice_loss), scalars.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum((0, 2, 3))
    denom = p.sum((0, 2, 3)) + target.sum((0, 2, 3))
    soft = 1 - ((2 * inter + 1) / (denom + 1)).mean()
    return bce + soft, bce, soft


def _require_masks(store: ImageStore) -> None:
    if store.masks is None:
        raise ValueError(f"{store.root}: this store has no masks.npy; the segmenter needs "
                         "masks (make one with `cxredit phantoms`, or `cxredit prepare folder` "
                         "with mask_heart/mask_right_lung/mask_left_lung columns in --labels-csv)")


class SegmenterTrainer(SingleNetTrainer):
    """The segmenter, its optimizer and one supervised step (loop in `Trainer`).

    Args:
        cfg: training configuration.
        store: images with masks (its resolution sets the segmenter's).
        run: run folder or None.
        device: torch device of this rank.
        rows: training rows (default: the "train" split).
        progress: tqdm bar on rank 0.
    """

    kind = CKPT_KIND

    def __init__(self, cfg: SegmenterTrainConfig, store: ImageStore, run: Run | None,
                 device: torch.device | str = "cpu", rows: np.ndarray | None = None,
                 progress: bool = True) -> None:
        _require_masks(store)
        super().__init__(cfg, store, run, device, rows, progress)
        with torch.random.fork_rng(devices=[]):  # same seed, same initial network
            torch.manual_seed(cfg.seed)
            self.net = Segmenter(SegmenterConfig(store.resolution, cfg.base_channels, cfg.depth))
        self.net.to(self.device).train()
        dist.broadcast_module_(self.net)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        val = store.select(split="val")
        self.val_rows = (val if len(val) else store.select())[:EVAL_MAX]

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's images [B,1,R,R] and masks [B,3,R,R] (float 0/1) of `self.step`.

        The same rows `Trainer.real_batch` would draw (its epoch permutation), with masks.
        """
        idx = np.sort(self.batch_rows())  # sorted: memmap-friendly, order-free loss
        x = self.store.tensor(idx).to(self.device, non_blocking=True)
        m = torch.from_numpy(np.asarray(self.store.masks[idx], np.float32))
        return x, m.to(self.device, non_blocking=True)

    def train_step(self) -> None:
        x, m = self.batch()
        loss, bce, soft = segmentation_loss(self.net(x), m)
        for k, v in (("loss/seg", loss), ("seg/bce", bce), ("seg/soft_dice", soft)):
            self.accumulate(k, v)
        self.opt_step(self.net, self.opt, loss)

    def evaluate(self) -> dict[str, float]:
        """Mean Dice per mask on the validation rows (thresholded predictions)."""
        rows = self.val_rows
        pred = predict_masks(self.net, self.store.tensor(rows))
        d = dice(pred.numpy(), np.asarray(self.store.masks[rows], bool)).mean(0)
        out = {f"eval/dice_{name}": float(v) for name, v in zip(MASK_NAMES, d)}
        out["eval/dice_mean"] = float(d.mean())
        return out

    def snapshot(self, step: int) -> None:
        """Grid: images, then predicted heart / right lung / left lung rows; val Dice logged."""
        rows = self.val_rows[:SNAPSHOT_N]
        x = self.store.tensor(rows)
        pred = predict_masks(self.net, x).float() * 2 - 1  # {0,1} -> {-1,1} for display
        grid = torch.cat([x, pred[:, 0:1], pred[:, 1:2], pred[:, 2:3]])
        save_image_grid(grid, self.run.sample_dir / f"masks-{step:08d}.png", nrow=len(rows))
        self.run.log({"step": step, **self.evaluate()})


@torch.no_grad()
def predict_masks(segmenter: Segmenter, images, batch: int = 64,
                  threshold: float = 0.5) -> torch.Tensor:
    """Threshold the segmenter's probabilities.

    Args:
        segmenter: a `Segmenter` (its mode is restored afterwards).
        images: [N,1,R,R] in [-1,1] (tensor or array), any device.
        batch: images per forward pass.
        threshold: probability above which a pixel is in a mask.

    Returns:
        bool [N,3,R,R] on the CPU (heart, right lung, left lung).
    """
    logit_t = float(np.log(threshold / (1 - threshold)))  # sigmoid(l) > t  <=>  l > logit(t)
    out = eval_batches(segmenter, images, batch, lambda logits: logits.gt(logit_t))
    R = segmenter.resolution
    return torch.cat(out) if out else torch.zeros(0, 3, R, R, dtype=torch.bool)


def load_segmenter(path: str | Path, device: torch.device | str = "cpu") -> Segmenter:
    """Rebuild the segmenter (eval mode, no grad) from a checkpoint or run folder."""
    return load_net(path, CKPT_KIND, Segmenter, device)


def train_segmenter(data: str | Path, out: str | Path, cfg: SegmenterTrainConfig | None = None,
                    resume: bool = False, device: str | None = None, progress: bool = True,
                    kimg: float | None = None) -> dict:
    """Train (or resume) the segmenter; the API of `cxredit train-segmenter`.

    Args:
        data: store with masks.npy (e.g. from `cxredit phantoms`).
        out: run folder.
        cfg: configuration of a new run (config.json is used on resume).
        resume: continue exactly from the newest checkpoint of `out`.
        device: torch device (None: cuda when available).
        progress: tqdm bar on rank 0.
        kimg: on resume, a new length.

    Returns:
        The last stats record.
    """
    store = ImageStore(data)
    _require_masks(store)  # before any run folder is created
    info = dist.setup(device)
    try:
        if resume:
            cfg = SegmenterTrainConfig.from_dict(Run(out, resume=True).read_config()["config"])
        cfg = cfg or SegmenterTrainConfig()
        if kimg is not None:
            cfg = cfg.replace(kimg=kimg)
        run = open_run(out, cfg, CKPT_KIND, data, resume, info)
        trainer = SegmenterTrainer(cfg, store, run, info.device, progress=progress)
        if resume:
            trainer.resume_latest(out)
        return trainer.fit(desc="train-segmenter")
    finally:
        dist.cleanup()
