"""Cyclic Reverse Generator (CRG) training of the encoder E that inverts a frozen G.

Each iteration makes two updates of E (Saboo et al. 2020):

1. **synthetic cycle** z -> w = G.mapping(z) -> x = G(w) -> w' = E(x) -> x' = G(w'):
   L1(w, w') + L2(x, x') + (1 - SSIM(x, x')) + sum_i mean |G_i(w) - G_i(w')|
   over the feature maps of G's synthesis blocks (computed in the same forward pass);
2. **real cycle** I -> w' = E(I) -> I' = G(w'):
   L2(I, I') + (1 - SSIM(I, I')) + sum_i mean |E_i(I) - E_i(I')| over E's own feature maps.

G is frozen (eval mode, no gradients to its weights) and renders with its constant noise maps,
so w alone determines the image. In the real cycle's content loss the features of the input
I are the target (detached): E is asked to make the reconstruction *look the same to itself*,
not to change its features of I to match a poor reconstruction (which would let it collapse
its feature space to shrink the loss).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxredit.checkpoint import build_module, checkpoint_sha256, load_checkpoint
from cxredit.config import EncoderTrainConfig
from cxredit.data.store import ImageStore
from cxredit.models.encoder import Encoder, encoder_config_for
from cxredit.models.stylegan2 import Generator
from cxredit.runs import Run, find_checkpoint, save_image_grid
from cxredit.train import distributed as dist
from cxredit.train.gan import load_generator
from cxredit.train.loop import Trainer
from cxredit.train.losses import ssim

log = logging.getLogger(__name__)

CKPT_KIND = "encoder"
SNAPSHOT_N = 8  # images per row of the reconstruction grids


def content_loss(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """sum_i (1/N_i) ||a_i - b_i||_1: mean absolute difference per layer, summed over layers."""
    return sum(F.l1_loss(x.float(), y.float()) for x, y in zip(a, b))


@torch.no_grad()
def mean_w(G: Generator, psi: float = 1.0, n: int = 4096, seed: int = 0) -> torch.Tensor:
    """Mean of G.mapping(z) over n draws: the point E's predictions start from.

    G's tracked `w_avg` is a moving average that lags behind early in training; the sample mean
    is exact for the generator at hand and costs one batched pass of the small mapping MLP.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev = G.mapping.w_avg.device
    z = torch.randn([n, G.z_dim], generator=g).to(dev)
    return G.mapping(z, psi=psi, broadcast=False).mean(dim=0)


class EncoderTrainer(Trainer):
    """E, its optimizer and the two cycles (see module docstring; loop in `Trainer`).

    Args:
        cfg: training configuration.
        G: frozen generator (moved to `device`, eval, no grad).
        store: real images (same resolution as G).
        run: run folder or None.
        device: torch device of this rank.
        encoder_overrides: `EncoderConfig` fields replacing the defaults matched to G.
        gan_source: {"path", "sha256"} of G's checkpoint, recorded in E's checkpoints.
        progress: tqdm bar on rank 0.
    """

    kind = CKPT_KIND

    def __init__(self, cfg: EncoderTrainConfig, G: Generator, store: ImageStore,
                 run: Run | None, device: torch.device | str = "cpu",
                 encoder_overrides: dict | None = None, gan_source: dict | None = None,
                 rows: np.ndarray | None = None, progress: bool = True) -> None:
        if store.resolution != G.img_resolution:
            raise ValueError(f"{store.root}: store is {store.resolution} px but the generator "
                             f"makes {G.img_resolution} px images")
        super().__init__(cfg, store, run, device, rows, progress)
        self.G = G.to(self.device).eval().requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # same seed, same initial E
            torch.manual_seed(cfg.seed)
            ecfg = encoder_config_for(G, cfg.space, **(encoder_overrides or {}))
            self.E = Encoder(ecfg, w_avg=mean_w(G, cfg.psi)).to(self.device).train()
        dist.broadcast_module_(self.E)
        self.opt = torch.optim.Adam(self.E.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.gan_source = gan_source or {}
        val = store.select(split="val")
        pool = val if len(val) >= SNAPSHOT_N else store.select()
        self.snapshot_rows = pool[:SNAPSHOT_N]

    def _broadcast_w(self, w: torch.Tensor) -> torch.Tensor:
        """[N, w_dim] -> the shape E predicts ([N, w_dim] or [N, num_ws, w_dim])."""
        return w if self.cfg.space == "w" else w.unsqueeze(1).expand(-1, self.G.num_ws, -1)

    def synthetic_cycle(self) -> None:
        cfg = self.cfg
        gen = self.generator(0)
        with torch.no_grad():
            z = torch.randn([self.batch_gpu, self.G.z_dim], generator=gen, device=self.device)
            w = self.G.mapping(z, psi=cfg.psi, broadcast=False)
            x, feats = self.G.synthesis(w, noise_mode="const", return_features=True)
        w_pred = self.E(x)
        x_rec, feats_rec = self.G.synthesis(w_pred, noise_mode="const", return_features=True)
        l_w = F.l1_loss(w_pred, self._broadcast_w(w))
        l_mse = F.mse_loss(x_rec, x)
        s = ssim(x_rec, x)
        l_content = content_loss(feats, feats_rec)
        loss = (cfg.w_l1 * l_w + cfg.syn_mse * l_mse + cfg.syn_ssim * (1 - s.mean())
                + cfg.g_content * l_content)
        for k, v in (("loss/syn", loss), ("syn/w_l1", l_w), ("syn/mse", l_mse),
                     ("syn/ssim", s.mean()), ("syn/g_content", l_content)):
            self.accumulate(k, v)
        self.opt_step(self.E, self.opt, loss)

    def real_cycle(self) -> None:
        cfg = self.cfg
        reals = self.real_batch()
        w_pred, feats = self.E(reals, return_features=True)
        rec = self.G.synthesis(w_pred, noise_mode="const")
        _, feats_rec = self.E(rec, return_features=True)
        l_mse = F.mse_loss(rec, reals)
        s = ssim(rec, reals)
        l_content = content_loss([f.detach() for f in feats], feats_rec)
        loss = cfg.real_mse * l_mse + cfg.real_ssim * (1 - s.mean()) + cfg.e_content * l_content
        for k, v in (("loss/real", loss), ("real/mse", l_mse), ("real/ssim", s.mean()),
                     ("real/e_content", l_content)):
            self.accumulate(k, v)
        self.opt_step(self.E, self.opt, loss)

    def train_step(self) -> None:
        self.synthetic_cycle()
        if self.cfg.real_cycle:
            self.real_cycle()
        dist.broadcast_buffers_(self.E)  # BatchNorm statistics: rank 0's, as DDP does

    def state_dict(self) -> dict:
        return {"config": self.cfg.to_dict(), "step": self.step, "nimg": self.nimg,
                "E_config": self.E.config, "E": self.E.state_dict(),
                "opt": self.opt.state_dict(), "G_config": self.G.config, "gan": self.gan_source}

    def load_state_dict(self, st: dict) -> None:
        self.E.load_state_dict(st["E"])
        self.opt.load_state_dict(st["opt"])
        self.step = int(st["step"])

    @torch.no_grad()
    def reconstruct_fixed(self) -> dict:
        """Synthetic and real reconstructions of fixed samples with E in eval mode."""
        was_training = self.E.training
        self.E.eval()
        g = torch.Generator(device="cpu").manual_seed(4321)
        z = torch.randn([SNAPSHOT_N, self.G.z_dim], generator=g).to(self.device)
        x = self.G.synthesis(self.G.mapping(z, psi=self.cfg.psi), noise_mode="const")
        x_rec = self.G.synthesis(self.E(x), noise_mode="const")
        real = self.store.tensor(self.snapshot_rows).to(self.device)
        real_rec = self.G.synthesis(self.E(real), noise_mode="const")
        self.E.train(was_training)
        return {"x": x, "x_rec": x_rec, "real": real, "real_rec": real_rec,
                "ssim_syn": ssim(x_rec, x), "ssim_real": ssim(real_rec, real)}

    def snapshot(self, step: int) -> None:
        """Grid: synthetic x / x' and real I / I' rows; their SSIM goes to stats.jsonl."""
        from cxredit.generate import provenance

        r = self.reconstruct_fixed()
        what = ("encoder training snapshot: rows 1, 2 and 4 made by G (synthetic x, its and the "
                "real row's reconstructions); row 3 real inputs")
        save_image_grid(torch.cat([r["x"], r["x_rec"], r["real"], r["real_rec"]]).clamp(-1, 1),
                        self.run.sample_dir / f"recon-{step:08d}.png", nrow=len(r["x"]),
                        provenance=provenance(str(self.gan_source.get("sha256")), what))
        self.run.log({"step": step, "eval/ssim_syn": float(r["ssim_syn"].mean()),
                      "eval/ssim_real": float(r["ssim_real"].mean())})


def load_encoder(path, device: torch.device | str = "cpu") -> tuple[Encoder, dict]:
    """Rebuild E (eval mode) from an encoder checkpoint or run folder.

    Returns:
        (E, info) where info has the GAN source {"path", "sha256"} and the checkpoint path.
    """
    ck = find_checkpoint(path)
    st = load_checkpoint(ck, kind=CKPT_KIND, map_location=device, keys=["E_config", "E", "gan"])
    E = build_module(ck, lambda: Encoder.from_config(st["E_config"]), st["E"])
    gan = dict(st.get("gan", {}))
    if gan.get("path") and not Path(gan["path"]).is_absolute():  # bundles store "G"
        gan["path"] = str(Path(ck).parent / gan["path"])
    return E.to(device).eval().requires_grad_(False), {"gan": gan, "checkpoint": str(ck)}


def init_encoder_from(E: Encoder, path: str | Path) -> dict:
    """Start `E` from another encoder's weights (a fine-tuning start; E keeps its own w_avg).

    Meant for an encoder of a generator that was trained further: the offsets it learned
    from the old G's w_avg are a far better start than random weights. The two encoders must
    have the same config (trunk, width, ...), except that a W encoder may start a W+ one: the
    last head layer is then repeated once per layer, so the start predicts the source's w on
    every layer (E_w+(x)[:, i] == E_w(x)) and training lets the layers part from there.

    Returns:
        {"path", "sha256"} of the checkpoint used, plus {"space": "w"} when a W encoder
        started a W+ one.
    """
    ck = find_checkpoint(path)
    st = load_checkpoint(ck, kind=CKPT_KIND, map_location="cpu", keys=["E_config", "E"])
    src_cfg, sd = st["E_config"], dict(st["E"])
    widen = src_cfg.get("space") == "w" and E.space == "w+"
    if ({**src_cfg, "space": E.space} if widen else src_cfg) != E.config:
        diff = sorted(k for k in set(E.config) | set(src_cfg)
                      if E.config.get(k) != src_cfg.get(k))
        raise ValueError(f"{ck}: cannot start from this encoder: its config differs in "
                         f"{', '.join(diff)}")
    if widen:  # head output index = layer * w_dim + d (see Encoder.forward's view)
        last = f"head.{len(E.head) - 1}"
        sd[f"{last}.weight"] = sd[f"{last}.weight"].repeat(E.num_ws, 1)
        sd[f"{last}.bias"] = sd[f"{last}.bias"].repeat(E.num_ws)
    dev = E.w_avg.device
    E.load_state_dict({**{k: v.to(dev) for k, v in sd.items()}, "w_avg": E.w_avg})
    out = {"path": str(Path(ck).resolve()), "sha256": checkpoint_sha256(ck)}
    return {**out, "space": "w"} if widen else out


def train_encoder(gan: str | Path, data: str | Path, out: str | Path,
                  cfg: EncoderTrainConfig | None = None, resume: bool = False,
                  device: str | None = None, encoder_overrides: dict | None = None,
                  progress: bool = True, kimg: float | None = None,
                  init_from: str | Path | None = None) -> dict:
    """Train (or resume) E against the G_ema of a GAN run; the API of `cxredit train-encoder`.

    Args:
        gan: GAN run folder or checkpoint.
        data: store of real images.
        out: run folder.
        cfg: configuration of a new run (config.json is used on resume).
        resume: continue exactly from the newest checkpoint of `out`.
        device: torch device (None: cuda when available).
        encoder_overrides: `EncoderConfig` fields (e.g. {"trunk": "resnet50"}).
        progress: tqdm bar on rank 0.
        kimg: on resume, a new length.
        init_from: a new run starts from this encoder's weights (`init_encoder_from`),
            e.g. the encoder of an earlier checkpoint of the same GAN run; recorded in
            config.json. Ignored on resume (the checkpoint holds the weights).

    Returns:
        The last stats record.
    """
    info = dist.setup(device)
    try:
        gan_ck = find_checkpoint(gan)
        gan_source = {"path": str(Path(gan_ck).resolve()), "sha256": checkpoint_sha256(gan_ck)}
        store = ImageStore(data)
        run = None
        if resume:
            doc = Run(out, resume=True).read_config()
            cfg = EncoderTrainConfig.from_dict(doc["config"])
            encoder_overrides = doc.get("encoder_overrides") or {}
            if doc.get("gan", {}).get("sha256") not in (None, gan_source["sha256"]):
                raise ValueError(f"{out}: was trained against another generator "
                                 f"({doc['gan']['path']}); train a new run for this one, "
                                 "started from it with --init-from")
            if kimg is not None:
                cfg = cfg.replace(kimg=kimg)
            run = Run(out, resume=True) if info.is_main else None
        else:
            cfg = cfg or EncoderTrainConfig()
        G = load_generator(gan_ck, info.device)
        trainer = EncoderTrainer(cfg, G, store, None, info.device, encoder_overrides,
                                 gan_source, progress=progress)
        if resume:
            trainer.resume_latest(out)
        else:  # the config is written once the start (and its source) is known to be good
            init = init_encoder_from(trainer.E, init_from) if init_from is not None else None
            if info.is_main:
                run = Run(out)
                run.write_config(cfg.to_dict(), kind="encoder",
                                 extra={"gan": gan_source, "data": str(Path(data).resolve()),
                                        "encoder_overrides": encoder_overrides or {},
                                        "init_from": init, "world_size": info.world_size})
            dist.barrier()
        trainer.run = run
        return trainer.fit(desc="train-encoder")
    finally:
        dist.cleanup()
