"""StyleGAN2 training loop (single process or torchrun/DDP), with exact resume.

One iteration consumes one global batch of real images and runs up to four phases, as in
NVlabs stylegan2-ada: `g_step` (non-saturating loss), `pl_step` (lazy path-length
regularisation, every `pl_interval` iterations), `d_step` (logistic loss), `r1_step` (lazy R1,
every `r1_interval` iterations); then `ema_update` and the ADA update. Scheduling, data order,
RNG (and so exact resume), stats and checkpoints come from `cxredit.train.loop.Trainer`.
"""

from __future__ import annotations

import copy
import logging
import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from cxredit.checkpoint import build_module, load_checkpoint
from cxredit.config import GanConfig
from cxredit.data.store import ImageStore
from cxredit.models.stylegan2 import Discriminator, Generator
from cxredit.runs import Run
from cxredit.train import distributed as dist
from cxredit.train.augment import AdaController, AugmentPipe
from cxredit.train.loop import NonFiniteLossError, Trainer  # noqa: F401 (re-exported)
from cxredit.train.losses import d_logistic, g_nonsaturating, path_length, r1_penalty

log = logging.getLogger(__name__)

CKPT_KIND = "gan"
SAMPLE_SEED = 1234  # fixed latents of the snapshot grids


def build_networks(cfg: GanConfig) -> tuple[Generator, Discriminator]:
    """Fresh G and D for a config, initialised from `cfg.seed` (same seed, same weights)."""
    # Module constructors draw from the global RNG: fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _build(cfg)


def _build(cfg: GanConfig) -> tuple[Generator, Discriminator]:
    G = Generator(z_dim=cfg.z_dim, w_dim=cfg.w_dim, img_resolution=cfg.resolution,
                  img_channels=1, mapping_layers=cfg.mapping_layers,
                  channel_base=cfg.channel_base, channel_max=cfg.channel_max,
                  conv_clamp=cfg.conv_clamp, noise_seed=cfg.seed)
    D = Discriminator(img_resolution=cfg.resolution, img_channels=1,
                      channel_base=cfg.channel_base, channel_max=cfg.channel_max,
                      mbstd_group_size=cfg.mbstd_group, conv_clamp=cfg.conv_clamp)
    return G, D


def _lazy_adam(params, lr: float, betas: tuple[float, float], interval: int):
    """Adam with the lazy-regularisation correction of lr and betas (Karras et al. 2020)."""
    ratio = interval / (interval + 1) if interval > 0 else 1.0
    return torch.optim.Adam(params, lr=lr * ratio,
                            betas=(betas[0] ** ratio, betas[1] ** ratio), eps=1e-8)


class GanTrainer(Trainer):
    """Networks, optimizers and phases of one StyleGAN2 run (see `Trainer` for the loop).

    Args:
        cfg: resolved configuration.
        store: training images.
        run: run folder (rank 0 writes into it).
        device: torch device of this rank.
        rows: store rows to train on (default: the "train" split, or all if it is empty).
        compile: wrap G.synthesis and D in torch.compile for the main phases.
        progress: show a tqdm bar (rank 0).
    """

    kind = CKPT_KIND
    nan_hint = "lower learning rates (--set g_lr=... d_lr=...) or a higher gamma"

    def __init__(self, cfg: GanConfig, store: ImageStore, run: Run | None,
                 device: torch.device | str = "cpu", rows: np.ndarray | None = None,
                 compile: bool = False, progress: bool = True) -> None:
        if store.resolution != cfg.resolution:
            raise ValueError(f"{store.root}: store is {store.resolution} px but the config "
                             f"asks for {cfg.resolution} px (--set resolution=..., or another "
                             "store)")
        super().__init__(cfg, store, run, device, rows, progress)
        if self.batch_gpu % min(cfg.mbstd_group, self.batch_gpu):
            raise ValueError(f"per-rank batch {self.batch_gpu} must be divisible by the "
                             f"minibatch-std group {cfg.mbstd_group}")

        self.G, self.D = build_networks(cfg)
        self.G.to(self.device).train().requires_grad_(False)
        self.D.to(self.device).train().requires_grad_(False)
        dist.broadcast_module_(self.G)
        dist.broadcast_module_(self.D)
        self.G_ema = copy.deepcopy(self.G).eval()
        self.G_opt = _lazy_adam(self.G.parameters(), cfg.g_lr, cfg.betas,
                                cfg.pl_interval if cfg.pl_weight > 0 else 0)
        self.D_opt = _lazy_adam(self.D.parameters(), cfg.d_lr, cfg.betas,
                                cfg.r1_interval if cfg.gamma > 0 else 0)
        self.augment = AugmentPipe().to(self.device) if cfg.aug != "none" else None
        if self.augment is not None:
            self.augment.p.fill_(cfg.aug_p)
        self.ada = AdaController(target=cfg.ada_target, interval=cfg.ada_interval,
                                 kimg=cfg.ada_kimg, batch_size=cfg.batch) \
            if cfg.aug == "ada" else None
        self.pl_mean = torch.zeros([], device=self.device)
        self.G_main, self.D_main = self.G.synthesis, self.D
        if compile:
            self.G_main = torch.compile(self.G.synthesis)
            self.D_main = torch.compile(self.D)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if cfg.precision == "bf16" else nullcontext())

    # ------------------------------------------------------------------ phases
    def _latents(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Mapped latents with style mixing: [n, num_ws, w_dim]."""
        z = torch.randn([n, self.cfg.z_dim], generator=gen, device=self.device)
        ws = self.G.mapping(z, update_emas=False)
        if self.cfg.style_mixing > 0:
            # Decide on the device (no host sync): with probability style_mixing, layers from
            # a random cutoff on take their w from a second latent.
            num_ws = ws.shape[1]
            u = torch.rand([2], generator=gen, device=self.device)
            cutoff = torch.where(u[0] < self.cfg.style_mixing,
                                 1 + (u[1] * (num_ws - 1)).long(), torch.tensor(num_ws,
                                                                            device=self.device))
            z2 = torch.randn([n, self.cfg.z_dim], generator=gen, device=self.device)
            mix = torch.arange(num_ws, device=self.device) >= cutoff
            ws = torch.where(mix[None, :, None], self.G.mapping(z2), ws)
        return ws

    def _run_D(self, images: torch.Tensor, gen: torch.Generator, main: bool = True):
        if self.augment is not None:
            images = self.augment(images, generator=gen)
        return (self.D_main if main else self.D)(images)

    def g_step(self) -> None:
        """Non-saturating G loss on a batch of fakes."""
        gen = self.generator(0)
        self.G.requires_grad_(True)
        with self.autocast:
            ws = self._latents(self.batch_gpu, gen)
            fake = self.G_main(ws, generator=gen).float()
            loss = g_nonsaturating(self._run_D(fake, gen).float())
        self.accumulate("loss/G", loss)
        self.opt_step(self.G, self.G_opt, loss)
        self.G.requires_grad_(False)
        with torch.no_grad():  # w_avg tracks the mapping output (used by truncation)
            z = torch.randn([self.batch_gpu, self.cfg.z_dim], generator=gen, device=self.device)
            self.G.mapping(z, update_emas=True)
            dist.all_reduce_mean_(self.G.mapping.w_avg)

    def pl_step(self) -> None:
        """Lazy path-length regularisation (weight * interval, on a shrunken batch)."""
        cfg = self.cfg
        gen = self.generator(1)
        n = max(self.batch_gpu // cfg.pl_batch_shrink, 1)
        self.G.requires_grad_(True)
        ws = self._latents(n, gen)  # requires grad through the mapping network, as in NVlabs
        fake = self.G.synthesis(ws, generator=gen)
        lengths = path_length(fake, ws, gen)
        mean = lengths.detach().mean()
        dist.all_reduce_mean_(mean)
        self.pl_mean.copy_(self.pl_mean.lerp(mean, cfg.pl_decay))
        penalty = (lengths - self.pl_mean).square().mean()
        self.accumulate("loss/pl", penalty)
        # `fake[:,0,0,0] * 0` keeps every synthesis parameter in the graph (zero grads, not None)
        self.opt_step(self.G, self.G_opt,
                       penalty * cfg.pl_weight * cfg.pl_interval + fake[:, 0, 0, 0].mean() * 0)
        self.G.requires_grad_(False)

    def d_step(self, reals: torch.Tensor) -> None:
        """Logistic D loss on fakes and reals; feeds ADA with the sign of D(reals)."""
        gen = self.generator(2)
        self.D.requires_grad_(True)
        with torch.no_grad(), self.autocast:
            fake = self.G_main(self._latents(self.batch_gpu, gen), generator=gen).float()
        with self.autocast:
            fake_logits = self._run_D(fake, gen).float()
            real_logits = self._run_D(reals, gen).float()
            loss = d_logistic(real_logits, fake_logits)
        self.accumulate("loss/D", loss)
        self.accumulate("D/real", real_logits.mean())
        self.accumulate("D/fake", fake_logits.mean())
        self.accumulate("D/real_sign", real_logits.sign().mean())
        if self.ada is not None:
            self.ada.accumulate(real_logits.detach())  # summed over ranks by the controller
        self.opt_step(self.D, self.D_opt, loss)
        self.D.requires_grad_(False)

    def r1_step(self, reals: torch.Tensor) -> None:
        """Lazy R1 on (augmented) reals: gamma/2 * ||grad||^2 * interval."""
        gen = self.generator(3)
        self.D.requires_grad_(True)
        x = reals.detach().requires_grad_(True)
        logits = self._run_D(x, gen, main=False)
        penalty = r1_penalty(logits, x)
        self.accumulate("loss/r1", penalty.mean())
        self.opt_step(self.D, self.D_opt,
                       penalty.mean() * (self.cfg.gamma / 2) * self.cfg.r1_interval
                       + logits.mean() * 0)
        self.D.requires_grad_(False)

    @torch.no_grad()
    def ema_update(self) -> None:
        """G_ema <- lerp(G, G_ema, beta) with a half-life of ema_kimg (ramped up early)."""
        cfg = self.cfg
        ema_nimg = cfg.ema_kimg * 1000
        if cfg.ema_rampup is not None:
            ema_nimg = min(ema_nimg, (self.step + 1) * cfg.batch * cfg.ema_rampup)
        beta = 0.5 ** (cfg.batch / max(ema_nimg, 1e-8))
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.copy_(p.lerp(p_ema, beta))
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)

    def train_step(self) -> None:
        """One iteration: G (+PL), D (+R1), EMA, ADA."""
        cfg = self.cfg
        reals = self.real_batch()
        self.g_step()
        if cfg.pl_weight > 0 and cfg.pl_interval > 0 and self.step % cfg.pl_interval == 0:
            self.pl_step()
        self.d_step(reals)
        if cfg.gamma > 0 and cfg.r1_interval > 0 and self.step % cfg.r1_interval == 0:
            self.r1_step(reals)
        self.ema_update()
        if self.ada is not None and self.augment is not None:
            self.ada.maybe_update(self.augment)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "format": CKPT_KIND, "config": self.cfg.to_dict(), "step": self.step,
            "nimg": self.nimg, "G_config": self.G.config, "D_config": self.D.config,
            "G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
            "G_opt": self.G_opt.state_dict(), "D_opt": self.D_opt.state_dict(),
            "pl_mean": self.pl_mean,
            "augment": None if self.augment is None else {
                "config": self.augment.config, "state": self.augment.state_dict()},
            "ada": None if self.ada is None else self.ada.state_dict(),
        }

    def load_state_dict(self, st: dict) -> None:
        self.G.load_state_dict(st["G"])
        self.D.load_state_dict(st["D"])
        self.G_ema.load_state_dict(st["G_ema"])
        self.G_opt.load_state_dict(st["G_opt"])
        self.D_opt.load_state_dict(st["D_opt"])
        self.pl_mean.copy_(st["pl_mean"])
        if self.augment is not None and st.get("augment"):
            self.augment.load_state_dict(st["augment"]["state"])
        if self.ada is not None and st.get("ada") is not None:
            self.ada.load_state_dict(st["ada"])
        self.step = int(st["step"])

    def extra_stats(self) -> dict:
        rec = {"pl_mean": float(self.pl_mean)}
        if self.augment is not None:
            rec["aug/p"] = float(self.augment.p)
        return rec

    @torch.no_grad()
    def snapshot(self, step: int, n: int = 64) -> None:
        """Grid of G_ema samples from fixed seeds (const noise)."""
        from cxredit.runs import save_image_grid

        g = torch.Generator(device="cpu").manual_seed(SAMPLE_SEED)
        z = torch.randn([n, self.cfg.z_dim], generator=g).to(self.device)
        imgs = torch.cat([self.G_ema(z[i:i + 16], noise_mode="const")
                          for i in range(0, n, 16)])
        from cxredit.checkpoint import checkpoint_sha256
        from cxredit.generate import provenance

        ck = self.run.checkpoint_path(step)
        sha = checkpoint_sha256(ck) if ck.with_suffix(".json").exists() else "unsaved"
        save_image_grid(imgs, self.run.sample_dir / f"samples-{step:08d}.png",
                        nrow=int(math.sqrt(n)),
                        provenance=provenance(sha, f"G_ema samples at training step {step}"))


def load_generator(path, device: torch.device | str = "cpu", which: str = "G_ema") -> Generator:
    """Rebuild G (default: G_ema) from a GAN checkpoint or run folder, in eval mode."""
    from cxredit.runs import find_checkpoint

    ck = find_checkpoint(path)
    st = load_checkpoint(ck, kind=CKPT_KIND, map_location=device,
                         keys=["G_config", which])  # not D, not the optimizer states
    G = build_module(ck, lambda: Generator(**st["G_config"]), st[which])
    return G.to(device).eval().requires_grad_(False)


def train_gan(data: str | Path, out: str | Path, cfg: GanConfig | None = None,
              resume: bool = False, device: str | None = None, compile: bool = False,
              progress: bool = True, kimg: float | None = None) -> dict:
    """Train (or resume) a StyleGAN2 run; the API behind `cxredit train-gan`.

    Args:
        data: store folder.
        out: run folder.
        cfg: configuration for a new run (ignored on resume, where config.json is used).
        resume: continue from the newest checkpoint of `out`, exactly.
        device: "cpu", "cuda", ... (None: cuda when available). Under torchrun every rank
            uses its LOCAL_RANK GPU.
        compile: torch.compile G.synthesis and D for the main phases.
        progress: tqdm bar on rank 0.
        kimg: on resume, a new training length (to extend a finished run).

    Returns:
        The last stats record.
    """
    info = dist.setup(device)
    try:
        store = ImageStore(data)
        run: Run | None = None
        if resume:
            run = Run(out, resume=True) if info.is_main else None
            doc = (run.read_config() if run else Run(out, resume=True).read_config())
            cfg = GanConfig.from_dict(doc["config"])
            if kimg is not None:
                cfg = cfg.replace(kimg=kimg)
        else:
            cfg = cfg or GanConfig()
            if info.is_main:
                run = Run(out)
                run.write_config(cfg.to_dict(), kind="gan",
                                 extra={"data": str(Path(data).resolve()),
                                        "world_size": info.world_size,
                                        "device": str(info.device)})
            dist.barrier()
        trainer = GanTrainer(cfg, store, run, info.device, compile=compile, progress=progress)
        if resume:
            trainer.resume_latest(out)
        return trainer.fit(desc="train-gan")
    finally:
        dist.cleanup()
