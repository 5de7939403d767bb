"""What every cxredit training loop shares: schedule, data order, RNG, stats, checkpoints.

A trainer subclasses `Trainer` and provides `train_step()` (one iteration on one global batch),
`state_dict()` / `load_state_dict()` and `snapshot(step)` (images written at checkpoints).

Exact resume without saving RNG streams: every random draw of iteration `step` on rank `r`
comes from a torch.Generator seeded with (seed, step, phase, r), and the data order of epoch
`e` is a permutation seeded with (seed, e). A checkpoint therefore needs only the step counter
and the state of the networks and optimizers; a resumed run makes exactly the same draws as an
uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cxredit.checkpoint import build_module, load_checkpoint, save_checkpoint
from cxredit.data.store import ImageStore
from cxredit.runs import Run, find_checkpoint
from cxredit.train import distributed as dist

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/Inf: training stops; the last good checkpoint is kept. The CLI
    reports it in one line (`one_line`)."""

    one_line = True


class Trainer:
    """Base of the training loops.

    Args:
        cfg: config with at least batch, seed, kimg, snap_kimg, keep_checkpoints,
            keep_every_kimg.
        store: training images.
        run: run folder (rank 0 writes into it), or None for no files.
        device: torch device of this rank.
        rows: store rows to train on (default: the "train" split, or all if it is empty).
        progress: show a tqdm bar (rank 0).
    """

    kind = "base"  # checkpoint kind
    nan_hint = "a lower learning rate"

    def __init__(self, cfg, store: ImageStore, run: Run | None,
                 device: torch.device | str = "cpu", rows: np.ndarray | None = None,
                 progress: bool = True) -> None:
        self.cfg, self.store, self.run = cfg, store, run
        self.device = torch.device(device)
        self.world = dist.world_size()
        self.rank = 0
        if self.world > 1:
            import torch.distributed as tdist

            self.rank = tdist.get_rank()
        if rows is None:
            rows = store.select(split="train")
            if len(rows) == 0:
                rows = store.select()
        self.rows = np.asarray(rows, np.int64)
        if cfg.batch % self.world:
            raise ValueError(f"batch {cfg.batch} is not divisible by {self.world} ranks")
        self.batch_gpu = cfg.batch // self.world
        if len(self.rows) < cfg.batch:
            raise ValueError(f"{store.root}: {len(self.rows)} training images, fewer than one "
                             f"batch ({cfg.batch})")
        self.progress = progress
        self.step = 0
        # Device-side accumulators: synchronised only when logging (no per-step host sync).
        self._acc: dict[str, torch.Tensor] = {}
        self._nonfinite = torch.zeros([], dtype=torch.bool, device=self.device)

    # ------------------------------------------------------------------ to implement
    def train_step(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, st: dict) -> None:
        raise NotImplementedError

    def snapshot(self, step: int) -> None:
        """Write images for a checkpoint (rank 0)."""

    def extra_stats(self) -> dict:
        """Values added to every stats record."""
        return {}

    # ------------------------------------------------------------------ bookkeeping
    @property
    def nimg(self) -> int:
        """Real images consumed so far (over all ranks)."""
        return self.step * self.cfg.batch

    @property
    def total_steps(self) -> int:
        return int(math.ceil(self.cfg.kimg * 1000 / self.cfg.batch))

    def generator(self, phase: int) -> torch.Generator:
        """RNG for one phase of the current step on this rank (see module docstring)."""
        seed = (((self.cfg.seed * 1_000_003 + self.step) * 17 + phase) * 1009 + self.rank)
        g = torch.Generator(device=self.device)
        g.manual_seed(seed % (2**63))
        return g

    def batch_rows(self) -> np.ndarray:
        """Store rows of this rank's share of step `self.step`'s global batch (the epoch
        permutation is seeded by (seed, epoch), so a resumed run draws the same rows)."""
        per_epoch = len(self.rows) // self.cfg.batch
        epoch, j = divmod(self.step, per_epoch)
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.rows))
        idx = self.rows[perm[j * self.cfg.batch:(j + 1) * self.cfg.batch]]
        return idx[self.rank::self.world]

    def real_batch(self) -> torch.Tensor:
        """This rank's share of the global batch of step `self.step`: [B_rank,1,R,R]."""
        return self.store.tensor(self.batch_rows()).to(self.device, non_blocking=True)

    def accumulate(self, name: str, value: torch.Tensor) -> None:
        """Add a scalar to the running mean logged at the next tick (no host sync)."""
        v = value.detach().float()
        self._nonfinite |= ~torch.isfinite(v)
        zero = torch.zeros([], device=self.device)
        self._acc[name] = self._acc.get(name, zero) + v
        self._acc[name + "/n"] = self._acc.get(name + "/n", zero) + 1

    def opt_step(self, module: torch.nn.Module, opt: torch.optim.Optimizer,
                 loss: torch.Tensor) -> None:
        """Backward, average gradients over ranks, sanitise them, step, zero."""
        params = list(module.parameters())
        loss.backward()
        dist.average_gradients_(params)
        for p in params:
            if p.grad is not None:
                # as NVlabs: one bad sample must not poison Adam's moment estimates
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def stats(self, t_tick: float, steps: int) -> dict:
        """Collect accumulated means (one host sync) and reset the accumulators."""
        acc, self._acc = self._acc, {}
        rec = {"step": self.step, "kimg": round(self.nimg / 1000, 3),
               "sec_per_kimg": round(t_tick / max(steps * self.cfg.batch / 1000, 1e-9), 3)}
        for k, v in acc.items():
            if not k.endswith("/n"):
                rec[k] = float(dist.all_reduce_mean_(v / acc[k + "/n"]))
        rec.update(self.extra_stats())
        return rec

    def check_finite(self) -> None:
        flag = self._nonfinite.float()
        dist.all_reduce_sum_(flag)
        if float(flag) > 0:
            last = self.run.latest_checkpoint() if self.run is not None else None
            kept = (f"the last good checkpoint ({last.name}) is kept" if last is not None else
                    "no checkpoint had been written yet")
            raise NonFiniteLossError(
                f"a loss became NaN/Inf before step {self.step}; training stopped and {kept}; "
                f"train again with {self.nan_hint}"
                + ("" if last is None else " into another --out (--resume would continue with "
                   "the same settings)"))

    def resume_latest(self, out: str | Path) -> None:
        """Continue exactly from the newest checkpoint of run folder `out`; stats lines logged
        after it are dropped (the resumed run logs them again, identically)."""
        run = Run(out, resume=True)
        ck = run.latest_checkpoint()
        if ck is None:  # stopped before its first checkpoint: nothing to load, start afresh
            log.info("%s: no checkpoint yet; starting from step 0 with the run's config", out)
            if self.rank == 0:
                run.truncate_stats(0)
            return
        started_on = run.read_config().get("data")
        if started_on and Path(started_on).resolve() != Path(self.store.root).resolve():
            log.warning("%s: resuming on %s, but the run was started on %s (its config.json "
                        "keeps that path)", out, self.store.root, started_on)
        self.load_state_dict(load_checkpoint(ck, kind=self.kind, map_location=self.device))
        if self.rank == 0:
            run.truncate_stats(self.step)
        log.info("resumed %s at step %d (%.3f kimg)", out, self.step, self.nimg / 1000)

    # ------------------------------------------------------------------ loop
    def fit(self, desc: str = "train") -> dict:
        """Train until `cfg.kimg`, logging every ~kimg and checkpointing every `snap_kimg`.

        Returns:
            The last stats record.
        """
        cfg, main = self.cfg, self.rank == 0
        if self.step >= self.total_steps:
            if main:
                log.warning("already trained to %g kimg of %g: nothing to do (give a larger "
                            "--kimg with --resume to train further)", self.nimg / 1000, cfg.kimg)
            return {}
        snap_steps = max(1, int(round(cfg.snap_kimg * 1000 / cfg.batch)))
        tick_steps = max(1, min(snap_steps, int(round(1000 / cfg.batch))))
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step",
                   disable=not (main and self.progress), desc=desc, dynamic_ncols=True)
        rec: dict = {}
        t_tick, steps_in_tick = time.time(), 0
        while self.step < self.total_steps:
            self.train_step()
            self.step += 1
            steps_in_tick += 1
            bar.update(1)
            last = self.step >= self.total_steps
            if self.step % tick_steps == 0 or last or self.step % snap_steps == 0:
                self.check_finite()
                rec = self.stats(time.time() - t_tick, steps_in_tick)
                t_tick, steps_in_tick = time.time(), 0
                if main:
                    bar.set_postfix({k.split("/")[-1] if k.startswith("loss/") else k:
                                     f"{v:.3g}" for k, v in rec.items()
                                     if k.startswith("loss/") or k in ("kimg", "sec_per_kimg")})
                    if self.run is not None:
                        self.run.log(rec)
            if self.step % snap_steps == 0 or last:
                self.checkpoint()
        bar.close()
        return rec

    def _kept_steps(self) -> set[int]:
        """Steps whose checkpoints survive pruning (first step past each keep_every_kimg)."""
        every = self.cfg.keep_every_kimg * 1000
        if every <= 0 or self.run is None:
            return set()
        b = self.cfg.batch
        return {s for s, _ in self.run.checkpoints() if (s * b) // every > ((s - 1) * b) // every}

    def checkpoint(self) -> Path | None:
        """Rank 0 writes a checkpoint and its snapshot images; old checkpoints are pruned."""
        if self.run is None:
            return None
        path = None
        if self.rank == 0:
            path = save_checkpoint(self.run.checkpoint_path(self.step), self.state_dict(),
                                   kind=self.kind)
            self.snapshot(self.step)
            self.run.prune(self.cfg.keep_checkpoints, self._kept_steps())
        dist.barrier()
        return path


class SingleNetTrainer(Trainer):
    """A `Trainer` of one network `self.net` with one optimizer `self.opt` (the segmenter and
    the classifier): what their checkpoints hold."""

    def state_dict(self) -> dict:
        return {"config": self.cfg.to_dict(), "step": self.step, "nimg": self.nimg,
                "net_config": self.net.config, "net": self.net.state_dict(),
                "opt": self.opt.state_dict(), "data": str(self.store.root)}

    def load_state_dict(self, st: dict) -> None:
        self.net.load_state_dict(st["net"])
        self.opt.load_state_dict(st["opt"])
        self.step = int(st["step"])


def open_run(out: str | Path, cfg, kind: str, data: str | Path, resume: bool,
             info: dist.DistInfo) -> Run | None:
    """The run folder of a supervised training job on this rank: rank 0 opens `out` (a new one
    gets config.json with the resolved config, the data path and the world size); the other
    ranks get None. All ranks wait until the folder exists."""
    run = None
    if resume:
        run = Run(out, resume=True) if info.is_main else None
    else:
        if info.is_main:
            run = Run(out)
            run.write_config(cfg.to_dict(), kind=kind,
                             extra={"data": str(Path(data).resolve()),
                                    "world_size": info.world_size})
        dist.barrier()
    return run


@torch.no_grad()
def eval_batches(net: torch.nn.Module, images, batch: int, fn) -> list[torch.Tensor]:
    """`fn(net(chunk))` on the CPU for chunks of `batch` images, with `net` in eval mode (its
    mode is restored afterwards). images: [N,...] tensor or array, moved to `net`'s device."""
    x = torch.as_tensor(images, dtype=torch.float32)
    dev = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        return [fn(net(x[i:i + batch].to(dev))).cpu() for i in range(0, len(x), batch)]
    finally:
        net.train(was_training)


def load_net(path, kind: str, cls, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild a single-network model (`net_config` + `net` entries) from a checkpoint or run
    folder, in eval mode without gradients; only those two entries are read."""
    ck = find_checkpoint(path)
    st = load_checkpoint(ck, kind=kind, map_location=device, keys=["net_config", "net"])
    net = build_module(ck, lambda: cls.from_config(st["net_config"]), st["net"])
    return net.to(device).eval().requires_grad_(False)
