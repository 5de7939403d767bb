"""Supervised training of the binary `Classifier` (cardiomegaly vs. not) on a store's labels.

Labels come from one meta column (default "Cardiomegaly"): 1 is positive, 0 negative, and
rows with anything else (-1 uncertain, NaN not mentioned) are dropped. With `negative_query`
the negatives are instead the rows matching a query, e.g. "`No Finding`==1" (the paper's
cardiomegaly vs. no-finding setting: on CheXpert, an explicit Cardiomegaly==0 is rare).

Loss: BCE-with-logits (optionally class-balanced). Augmentation is deliberately light and
geometry-preserving: integer translations and brightness/contrast jitter through the project's
`AugmentPipe`, with no flips and no rotations: the heart sits on the patient's left, so a
mirrored film is a different (situs inversus) anatomy, not the same label. Validation AUC and
accuracy are logged at every snapshot and returned at the end. Schedule, data order, stats,
checkpoints and exact resume come from `Trainer`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxredit.config import DictConfig, check_fields
from cxredit.data.store import ImageStore
from cxredit.models.classifier import ARCHS, Classifier, ClassifierConfig
from cxredit.runs import Run, save_image_grid
from cxredit.train import distributed as dist
from cxredit.train.augment import AugmentPipe
from cxredit.train.loop import SingleNetTrainer, eval_batches, load_net, open_run

log = logging.getLogger(__name__)

CKPT_KIND = "classifier"
SNAPSHOT_N = 8  # images per row of the snapshot grid
_AUG_PHASE = 0  # `Trainer.generator` phase of the augmentation draws


@dataclass
class ClassifierTrainConfig(DictConfig):
    """Training of the binary classifier."""

    label: str = "Cardiomegaly"  # meta column: 1 = positive, 0 = negative, others dropped
    negative_query: str | None = None  # negatives = rows matching this query instead of label==0
    arch: str = "cnn"  # `ClassifierConfig.arch`: "cnn" or "resnet18"
    base_channels: int = 16  # `ClassifierConfig.base_channels` (cnn)
    depth: int = 4  # `ClassifierConfig.depth` (cnn)
    batch: int = 32  # images per step (global, split over ranks)
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    balance: bool = False  # weight positives by n_neg / n_pos in the BCE (imbalanced data)
    aug_p: float = 0.5  # probability of each augmentation per image (0 = off)
    translate: float = 0.0625  # largest integer shift, fraction of the side
    brightness_std: float = 0.1  # std of the additive brightness offset ([-1,1] units)
    contrast_std: float = 0.2  # log2 std of the contrast factor
    eval_max: int = 2048  # validation images scored at each snapshot (evenly spaced subset)
    kimg: float = 20.0  # length in thousands of images
    snap_kimg: float = 2.0  # checkpoint + evaluation interval (kimg)
    keep_checkpoints: int = 3  # newest checkpoints kept
    keep_every_kimg: float = 0.0  # also keep checkpoints at multiples of this (0 = none)
    seed: int = 0  # seed of every RNG of the run

    def __post_init__(self) -> None:
        if self.batch < 1 or self.kimg <= 0 or self.snap_kimg <= 0 or self.lr <= 0:
            raise ValueError("batch, kimg, snap_kimg and lr must be positive")
        check_fields(self, positive=("batch", "lr", "kimg", "snap_kimg", "keep_checkpoints"),
                     nonnegative=("keep_every_kimg",))
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if not 0 <= self.aug_p <= 1:
            raise ValueError(f"aug_p must be in [0, 1], got {self.aug_p}")
        if self.eval_max < 1:
            raise ValueError(f"eval_max must be >= 1, got {self.eval_max}")


def binary_labels(store: ImageStore, column: str = "Cardiomegaly",
                  negative_query: str | None = None) -> np.ndarray:
    """Per-row class of a store: float32 [N] with 1 (positive), 0 (negative), NaN (unused).

    Positives are rows with `column == 1`; negatives those with `column == 0`, or, with
    `negative_query`, the rows matching it that are not positive.
    """
    y = store.labels([column])[:, 0]  # raises a ValueError naming the store if no column
    out = np.full(len(store), np.nan, np.float32)
    if negative_query:
        neg = store.select(query=negative_query)
        out[neg] = 0.0
    else:
        out[y == 0] = 0.0
    out[y == 1] = 1.0
    return out


def labelled_rows(store: ImageStore, y: np.ndarray, split: str, column: str) -> np.ndarray:
    """Rows of `split` with a 0/1 class in `y`; logs how many were dropped."""
    rows = store.select(split=split)
    keep = rows[np.isfinite(y[rows])]
    if len(keep) < len(rows):
        log.info("%s split: dropped %d of %d rows whose %s is neither positive nor negative "
                 "(uncertain or not mentioned)", split, len(rows) - len(keep), len(rows), column)
    return keep


def _require_both_classes(store: ImageStore, y: np.ndarray, rows: np.ndarray, column: str,
                          negative_query: str | None) -> tuple[int, int]:
    n_pos = int((y[rows] == 1).sum())
    n_neg = len(rows) - n_pos
    if n_pos == 0 or n_neg == 0:
        neg = negative_query or f"{column}==0"
        missing = f"positive ({column}==1)" if n_pos == 0 else f"negative ({neg})"
        raise ValueError(f"{store.root}: no {missing} rows in the train split "
                         f"({n_pos} positive, {n_neg} negative); the classifier needs both")
    return n_pos, n_neg


class ClassifierTrainer(SingleNetTrainer):
    """The classifier, its optimizer, augmentation and one supervised step (loop in `Trainer`).

    Args:
        cfg: training configuration.
        store: images with a `cfg.label` meta column (its resolution sets the classifier's).
        run: run folder or None.
        device: torch device of this rank.
        progress: tqdm bar on rank 0.
    """

    kind = CKPT_KIND

    def __init__(self, cfg: ClassifierTrainConfig, store: ImageStore, run: Run | None,
                 device: torch.device | str = "cpu", progress: bool = True) -> None:
        self.y = binary_labels(store, cfg.label, cfg.negative_query)
        rows = labelled_rows(store, self.y, "train", cfg.label)
        n_pos, n_neg = _require_both_classes(store, self.y, rows, cfg.label, cfg.negative_query)
        super().__init__(cfg, store, run, device, rows, progress)
        log.info("training on %d %s positives and %d negatives", n_pos, cfg.label, n_neg)
        with torch.random.fork_rng(devices=[]):  # same seed, same initial network
            torch.manual_seed(cfg.seed)
            self.net = Classifier(ClassifierConfig(cfg.arch, store.resolution, cfg.base_channels,
                                                   cfg.depth, label=cfg.label))
        self.net.to(self.device).train()
        dist.broadcast_module_(self.net)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        self.pos_weight = torch.tensor(n_neg / n_pos if cfg.balance else 1.0, device=self.device)
        self.augment = AugmentPipe(xflip=0, rotate90=0, xint=1, xint_max=cfg.translate, scale=0,
                                   rotate=0, aniso=0, xfrac=0, brightness=1, contrast=1,
                                   brightness_std=cfg.brightness_std,
                                   contrast_std=cfg.contrast_std).to(self.device)
        self.augment.p.fill_(cfg.aug_p)
        val = labelled_rows(store, self.y, "val", cfg.label)
        # an evenly spaced subset keeps the class mix of a large validation split
        self.val_rows = val[np.linspace(0, len(val) - 1, cfg.eval_max).round().astype(np.int64)
                            ] if len(val) > cfg.eval_max else val
        if len(self.val_rows) == 0:
            log.warning("%s: no labelled validation rows; no AUC will be reported", store.root)
        self.last_eval: dict[str, float] = {}

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's images [B,1,R,R] and classes [B] (float 0/1) of `self.step`.

        The same rows `Trainer.real_batch` would draw (its epoch permutation), with classes.
        """
        idx = np.sort(self.batch_rows())  # sorted: memmap-friendly, order-free loss
        x = self.store.tensor(idx).to(self.device, non_blocking=True)
        return x, torch.from_numpy(self.y[idx]).to(self.device, non_blocking=True)

    def train_step(self) -> None:
        x, y = self.batch()
        x = self.augment(x, self.generator(_AUG_PHASE))
        logits = self.net(x)
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=self.pos_weight)
        self.accumulate("loss/bce", loss)
        self.accumulate("train/acc", ((logits > 0).float() == y).float().mean())
        self.opt_step(self.net, self.opt, loss)

    def _score_val(self) -> np.ndarray:
        return predict_proba(self.net, self.store.tensor(self.val_rows))

    def evaluate(self, p: np.ndarray | None = None) -> dict[str, float]:
        """Validation AUC (NaN with one class) and accuracy at 0.5; also kept in `last_eval`."""
        if len(self.val_rows) == 0:
            return {}
        from sklearn.metrics import roc_auc_score

        y = self.y[self.val_rows]
        p = self._score_val() if p is None else p
        auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
        self.last_eval = {"eval/auc": auc, "eval/acc": float(((p > 0.5) == (y == 1)).mean()),
                          "eval/n": len(y), "eval/pos": int(y.sum())}
        return self.last_eval

    def snapshot(self, step: int) -> None:
        """Grid: the most positive-looking validation images, then the most negative; val
        AUC/accuracy logged."""
        if len(self.val_rows) == 0:
            return
        p = self._score_val()
        self.run.log({"step": step, **self.evaluate(p)})
        order = np.argsort(-p, kind="stable")
        n = min(SNAPSHOT_N, len(order))
        rows = np.concatenate([self.val_rows[order[:n]], self.val_rows[order[::-1][:n]]])
        save_image_grid(self.store.tensor(rows), self.run.sample_dir / f"val-{step:08d}.png",
                        nrow=n)


@torch.no_grad()
def predict_proba(clf: Classifier, images, batch: int = 64) -> np.ndarray:
    """P(positive class) per image.

    Args:
        clf: a `Classifier` (its mode is restored afterwards).
        images: [N,1,H,W] in [-1,1] (tensor or array), any device; resized to the
            classifier's resolution when H, W differ.
        batch: images per forward pass.

    Returns:
        float32 [N] in [0,1].
    """
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"predict_proba expects images [N,1,R,R], got {list(x.shape)}")
    out = eval_batches(clf, x, batch, lambda logits: torch.sigmoid(logits).float())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> Classifier:
    """Rebuild the classifier (eval mode, no grad) from a checkpoint or run folder."""
    return load_net(path, CKPT_KIND, Classifier, device)


def train_classifier(data: str | Path, out: str | Path, cfg: ClassifierTrainConfig | None = None,
                     resume: bool = False, device: str | None = None, progress: bool = True,
                     kimg: float | None = None) -> dict:
    """Train (or resume) the classifier; the API of `cxredit train-classifier`.

    Args:
        data: store whose meta.csv has the label column (e.g. from `cxredit phantoms`).
        out: run folder.
        cfg: configuration of a new run (config.json is used on resume).
        resume: continue exactly from the newest checkpoint of `out`.
        device: torch device (None: cuda when available).
        progress: tqdm bar on rank 0.
        kimg: on resume, a new length.

    Returns:
        The last stats record with the final validation numbers (eval/auc, eval/acc, ...).
    """
    store = ImageStore(data)
    if resume:
        cfg = ClassifierTrainConfig.from_dict(Run(out, resume=True).read_config()["config"])
    cfg = cfg or ClassifierTrainConfig()
    if kimg is not None:
        cfg = cfg.replace(kimg=kimg)
    y = binary_labels(store, cfg.label, cfg.negative_query)  # user errors before any run folder
    train = store.select(split="train")
    _require_both_classes(store, y, train[np.isfinite(y[train])], cfg.label, cfg.negative_query)
    try:
        ClassifierConfig(cfg.arch, store.resolution, cfg.base_channels, cfg.depth)
    except ValueError as e:
        raise ValueError(f"{store.root}: {e}") from None
    info = dist.setup(device)
    try:
        run = open_run(out, cfg, CKPT_KIND, data, resume, info)
        trainer = ClassifierTrainer(cfg, store, run, info.device, progress=progress)
        if resume:
            trainer.resume_latest(out)
        rec = trainer.fit(desc="train-classifier")
        if info.is_main and not trainer.last_eval:
            trainer.evaluate()
        return {**rec, **trainer.last_eval}
    finally:
        dist.cleanup()
