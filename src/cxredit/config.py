"""Typed configurations and the named presets (`tiny`, `demo64`, `paper128`).

A preset is a complete `GanConfig`; the CLI starts from one and overrides fields with
`--set field=value` or the dedicated options. The resolved config is written to the run's
`config.json` and stored in every checkpoint, so a run can always be rebuilt from its folder.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields


class DictConfig:
    """JSON round trip for config dataclasses: `to_dict`, `from_dict` (unknown keys are an
    error, which catches typos in hand-edited configs), `replace` (validated by __post_init__).
    Tuples are stored as JSON lists and restored from the field type."""

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        """Inverse of `to_dict`."""
        known = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) and str(known[k].type).startswith(
            "tuple") else v for k, v in d.items()})

    def replace(self, **changes):
        """Copy with fields changed (validated)."""
        return dataclasses.replace(self, **changes)


def check_fields(cfg, positive: tuple[str, ...] = (), nonnegative: tuple[str, ...] = (),
                 unit: tuple[str, ...] = (), betas: str | None = None) -> None:
    """One-line ValueErrors for numeric fields of a config: `positive` (> 0), `nonnegative`
    (>= 0), `unit` (in [0, 1]), all finite; `betas`: a pair in [0, 1) (Adam)."""
    def num(name):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
        return v
    for name in positive:
        if num(name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in nonnegative:
        if num(name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in unit:
        if not 0 <= num(name) <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
    if betas is not None:
        b = getattr(cfg, betas)
        if len(b) != 2 or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b):
            raise ValueError(f"{betas} must be two numbers in [0, 1), e.g. 0.0,0.99; got {b}")


@dataclass
class GanConfig(DictConfig):
    """Everything that defines a StyleGAN2 training run (NVlabs 'auto'-style hyper-parameters)."""

    # --- networks
    resolution: int = 128  # image side R (power of two, >= 8)
    z_dim: int = 512  # latent z dimensionality
    w_dim: int = 512  # intermediate latent w dimensionality
    mapping_layers: int = 2  # depth of the mapping network (8 in the original StyleGAN2)
    channel_base: int = 16384  # channels at resolution r = min(channel_base // r, channel_max)
    channel_max: int = 512  # upper bound on channels
    conv_clamp: float | None = 256.0  # clamp conv outputs (NVlabs default 256; None = off)
    mbstd_group: int = 4  # minibatch-std group size in D
    # --- optimisation
    batch: int = 32  # global batch (split over DDP ranks)
    g_lr: float = 0.0025  # Adam lr of G
    d_lr: float = 0.0025  # Adam lr of D
    betas: tuple[float, float] = (0.0, 0.99)  # Adam betas (before lazy-reg correction)
    gamma: float = 0.1024  # R1 weight
    r1_interval: int = 16  # lazy R1: every this many D steps (0 = off)
    pl_weight: float = 2.0  # path-length regularisation weight (0 = off)
    pl_interval: int = 4  # lazy path-length: every this many G steps
    pl_decay: float = 0.01  # decay of the running path-length mean
    pl_batch_shrink: int = 2  # path-length batch = batch // shrink
    style_mixing: float = 0.9  # probability of mixing two latents
    ema_kimg: float = 10.0  # half-life of G_ema in kimg
    ema_rampup: float | None = 0.05  # half-life ramp-up as a fraction of images seen (None = off)
    # --- augmentation (ADA)
    aug: str = "ada"  # "ada" (adaptive p), "fixed" (p = aug_p), "none"
    aug_p: float = 0.0  # initial / fixed augmentation probability
    ada_target: float = 0.6  # target of r_t = E[sign(D(real))]
    ada_interval: int = 4  # steps between p adjustments
    ada_kimg: float = 100.0  # p can move 0 -> 1 in this many kimg
    # --- schedule and bookkeeping
    kimg: float = 25000.0  # training length in thousands of real images shown to D
    snap_kimg: float = 200.0  # snapshot (checkpoint + sample grid) interval in kimg
    keep_checkpoints: int = 3  # newest checkpoints kept
    keep_every_kimg: float = 0.0  # also keep, forever, checkpoints at multiples of this (0 = none)
    seed: int = 0  # seed of every RNG of the run
    precision: str = "fp32"  # "fp32" or "bf16" (autocast on the networks' forward)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a one-line message for inconsistent settings."""
        r = self.resolution
        if r < 8 or 2 ** int(round(math.log2(r))) != r:
            raise ValueError(f"resolution must be a power of two >= 8, got {r}")
        if self.aug not in ("ada", "fixed", "none"):
            raise ValueError(f"aug must be ada, fixed or none, got {self.aug!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.batch < 1 or self.kimg <= 0 or self.snap_kimg <= 0:
            raise ValueError("batch, kimg and snap_kimg must be positive")
        check_fields(self, positive=("z_dim", "w_dim", "mapping_layers", "channel_base",
                                     "channel_max", "mbstd_group", "batch", "g_lr", "d_lr",
                                     "pl_interval", "pl_batch_shrink", "ema_kimg",
                                     "ada_interval", "ada_kimg", "kimg", "snap_kimg",
                                     "keep_checkpoints"),
                     nonnegative=("gamma", "r1_interval", "pl_weight", "keep_every_kimg"),
                     unit=("pl_decay", "style_mixing", "aug_p", "ada_target"), betas="betas")
        if self.conv_clamp is not None and not (math.isfinite(self.conv_clamp)
                                                and self.conv_clamp > 0):
            raise ValueError(f"conv_clamp must be positive or None, got {self.conv_clamp}")
        if self.ema_rampup is not None and not (math.isfinite(self.ema_rampup)
                                                and self.ema_rampup >= 0):
            raise ValueError(f"ema_rampup must be >= 0 or None, got {self.ema_rampup}")

    @property
    def num_ws(self) -> int:
        """Number of w vectors fed to the synthesis network: 2*log2(R) - 2."""
        return 2 * int(math.log2(self.resolution)) - 2


def _auto(resolution: int, batch: int, **kw) -> GanConfig:
    """NVlabs 'auto' heuristics: gamma = 2e-4 * R^2 / batch, EMA half-life = batch * 10 / 32."""
    base = {"resolution": resolution, "batch": batch,
            "gamma": 0.0002 * resolution**2 / batch, "ema_kimg": batch * 10 / 32}
    base.update(kw)
    return GanConfig(**base)


PRESETS: dict[str, GanConfig] = {
    # For tests and smoke runs: seconds on a CPU.
    "tiny": _auto(32, 8, z_dim=64, w_dim=64, channel_base=512, channel_max=64,
                  kimg=1.0, snap_kimg=0.5, ada_kimg=10.0, conv_clamp=None),
    # Trainable on 2 CPU cores in an hour or two (DESIGN.md sizing: ~65 kimg/hour on NVlabs' nets)
    "demo64": _auto(64, 16, z_dim=128, w_dim=128, channel_base=2048, channel_max=128,
                    g_lr=0.002, d_lr=0.002, kimg=120.0, snap_kimg=10.0, ada_kimg=50.0),
    # The paper's setting at 128 px with NVlabs auto defaults (batch 32, gamma 0.1024, ...).
    "paper128": GanConfig(),
}

PRESET_NOTES = {
    "tiny": "32 px, w_dim 64 — tests and smoke runs, seconds on CPU",
    "demo64": "64 px, w_dim 128, channel_base 2048 — about an hour or two on 2 CPU cores",
    "paper128": "128 px, z=w=512, channel_base 16384 — the paper's setting, for a GPU",
}


def preset(name: str) -> GanConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def parse_overrides(pairs: list[str], cfg_cls=GanConfig) -> dict:
    """Parse `field=value` strings into typed values for a config dataclass.

    Values are converted with the field's type (int, float, bool, str, None, tuples as
    comma-separated numbers).
    """
    types = {f.name: f.type for f in fields(cfg_cls)}
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects field=value, got {pair!r}")
        key, val = (s.strip() for s in pair.split("=", 1))
        key = key.replace("-", "_")
        if key not in types:
            raise ValueError(f"unknown config field {key!r}; known: {', '.join(types)}")
        typ = str(types[key])
        try:
            if val.lower() == "none" and "None" in typ:
                out[key] = None
            elif typ.startswith("tuple"):
                out[key] = tuple(float(v) for v in val.split(","))
            elif typ.startswith("bool"):
                if val.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(val)
                out[key] = val.lower() in ("1", "true", "yes", "on")
            elif typ.startswith("int"):
                out[key] = int(val)
            elif typ.startswith("float"):
                out[key] = float(val)
            else:
                out[key] = val
        except ValueError:
            raise ValueError(f"--set {key}: cannot parse {val!r} as {typ}") from None
    return out


@dataclass
class EncoderTrainConfig(DictConfig):
    """Cyclic Reverse Generator (CRG) training of the encoder E against a frozen G.

    Every loss term has a weight; the defaults (all 1) are the paper's plain sum.
    """

    space: str = "w"  # "w" ([N, w_dim], the paper) or "w+" ([N, num_ws, w_dim])
    batch: int = 16  # images per cycle (global, split over ranks)
    lr: float = 1e-4  # Adam learning rate of E
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas
    psi: float = 1.0  # truncation of the synthetic latents (1 = the full W distribution)
    # synthetic cycle: z -> w -> x = G(w) -> w' = E(x) -> x' = G(w')
    w_l1: float = 1.0  # L1(w, w')
    syn_mse: float = 1.0  # L2(x, x')
    syn_ssim: float = 1.0  # 1 - SSIM(x, x')
    g_content: float = 1.0  # sum_i mean |G_i(w) - G_i(w')| over G's hidden layers
    # real cycle: I -> w' = E(I) -> I' = G(w')
    real_mse: float = 1.0  # L2(I, I')
    real_ssim: float = 1.0  # 1 - SSIM(I, I')
    e_content: float = 1.0  # sum_i mean |E_i(I) - E_i(I')| over E's own layers
    real_cycle: bool = True  # run the real cycle (off: synthetic-only training)
    # schedule and bookkeeping
    kimg: float = 200.0  # length in thousands of images per cycle
    snap_kimg: float = 10.0  # checkpoint + reconstruction grid interval (kimg)
    keep_checkpoints: int = 3  # newest checkpoints kept
    keep_every_kimg: float = 0.0  # also keep checkpoints at multiples of this (0 = none)
    seed: int = 0  # seed of every RNG of the run

    def __post_init__(self) -> None:
        if self.space not in ("w", "w+"):
            raise ValueError(f"space must be w or w+, got {self.space!r}")
        if self.batch < 1 or self.kimg <= 0 or self.snap_kimg <= 0 or self.lr <= 0:
            raise ValueError("batch, kimg, snap_kimg and lr must be positive")
        check_fields(self, positive=("batch", "lr", "kimg", "snap_kimg", "keep_checkpoints",
                                     "psi"),
                     nonnegative=("w_l1", "syn_mse", "syn_ssim", "g_content", "real_mse",
                                  "real_ssim", "e_content", "keep_every_kimg"), betas="betas")
        if not isinstance(self.real_cycle, bool):
            raise ValueError(f"real_cycle must be true or false, got {self.real_cycle!r}")


ENCODER_TRAIN_PRESETS: dict[str, EncoderTrainConfig] = {
    "tiny": EncoderTrainConfig(batch=8, lr=3e-4, kimg=1.0, snap_kimg=0.5),
    "demo64": EncoderTrainConfig(batch=16, lr=2e-4, kimg=60.0, snap_kimg=5.0),
    "paper128": EncoderTrainConfig(batch=16, lr=1e-4, kimg=2000.0, snap_kimg=50.0),
}


def encoder_train_preset(name: str) -> EncoderTrainConfig:
    """A fresh copy of a named encoder-training preset."""
    if name not in ENCODER_TRAIN_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(ENCODER_TRAIN_PRESETS)}")
    return dataclasses.replace(ENCODER_TRAIN_PRESETS[name])
