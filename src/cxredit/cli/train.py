"""Training commands: train-gan, generate, train-encoder, train-segmenter, train-classifier."""

from __future__ import annotations

import argparse
import math

from cxredit.cli._common import _add_runtime, command, refuse_changes_on_resume


# ---------------------------------------------------------------------------------------- GAN
def _add_train_gan(p: argparse.ArgumentParser) -> None:
    from cxredit.config import PRESET_NOTES

    p.add_argument("--data", required=True, help="store folder (its 'train' split is used)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--preset", default="paper128", choices=list(PRESET_NOTES),
                   help="; ".join(f"{k}: {v}" for k, v in PRESET_NOTES.items()))
    p.add_argument("--kimg", type=float, help="training length in thousands of real images")
    p.add_argument("--batch", type=int, help="global batch size (split over ranks)")
    p.add_argument("--snap-kimg", type=float, help="checkpoint + sample grid interval (kimg)")
    p.add_argument("--gamma", type=float, help="R1 weight")
    p.add_argument("--aug", choices=["ada", "fixed", "none"], help="augmentation mode")
    p.add_argument("--aug-p", type=float, help="initial (ada) or fixed augmentation probability")
    p.add_argument("--no-aug", action="store_true", help="disable augmentation (= --aug none)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="autocast precision")
    p.add_argument("--seed", type=int, help="seed of every RNG of the run")
    p.add_argument("--keep-checkpoints", type=int, help="newest checkpoints to keep")
    p.add_argument("--keep-every-kimg", type=float,
                   help="also keep checkpoints at multiples of this many kimg, forever")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, e.g. --set channel_base=4096 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly from its newest checkpoint")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D")
    _add_runtime(p)


def gan_config_from_args(args: argparse.Namespace):
    """Preset + dedicated options + --set overrides -> GanConfig."""
    from cxredit.config import parse_overrides, preset

    cfg = preset(args.preset)
    changes = {}
    for name in ("kimg", "batch", "snap_kimg", "gamma", "aug", "aug_p", "precision", "seed",
                 "keep_checkpoints", "keep_every_kimg"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if args.no_aug:
        changes["aug"] = "none"
    if changes.get("aug") == "fixed" and "aug_p" not in changes:
        raise ValueError("--aug fixed needs --aug-p")
    changes.update(parse_overrides(args.set))
    return cfg.replace(**changes)


@command("train-gan", "train a StyleGAN2 generator on a store (resumable, torchrun-aware)")(
    _add_train_gan)
def run_train_gan(args: argparse.Namespace) -> int:
    from cxredit.train.gan import train_gan

    refuse_changes_on_resume(args)
    cfg = None if args.resume else gan_config_from_args(args)
    rec = train_gan(args.data, args.out, cfg, resume=args.resume, device=args.device,
                    compile=args.compile, progress=not args.no_progress, kimg=args.kimg)
    if rec:
        print(f"{args.out}: {rec['kimg']} kimg, loss G {rec.get('loss/G', float('nan')):.3f}, "
              f"loss D {rec.get('loss/D', float('nan')):.3f}")
    return 0


MAX_SEEDS = 100_000  # images of one generate call


def _parse_seeds(text: str) -> list[int]:
    """"0-63" or "1,5,9" (ranges inclusive) -> seeds in [0, 2^32), at most MAX_SEEDS."""
    import re

    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if m is None:
            raise ValueError(f"--seeds {text!r}: {part!r} is not a seed or a range such as 0-63")
        a = int(m[1])
        b = int(m[2]) if m[2] is not None else a
        if b < a:
            raise ValueError(f"--seeds {text!r}: range {part} is reversed (write {b}-{a})")
        if b >= 2**32:
            raise ValueError(f"--seeds {text!r}: seeds must be below 2^32")
        if len(seeds) + b - a + 1 > MAX_SEEDS:
            raise ValueError(f"--seeds {text!r}: more than {MAX_SEEDS:,} images in one call")
        seeds.extend(range(a, b + 1))
    if not seeds:
        raise ValueError(f"--seeds: no seeds in {text!r}")
    return seeds


def _add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="GAN run folder or checkpoint")
    p.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-63 or 1,5,9")
    p.add_argument("--trunc", type=float, default=1.0, help="truncation psi (1 = none)")
    p.add_argument("--noise-mode", default="const", choices=["const", "random", "none"],
                   help="per-layer noise")
    p.add_argument("--out", default="generated", help="output folder")
    p.add_argument("--interpolate", type=int, default=0, metavar="STEPS",
                   help="also write a latent walk strip through the seeds with STEPS frames "
                        "between consecutive seeds")
    _add_runtime(p, progress=False)


@command("generate", "sample images from a trained generator (grid, singles, latent walks)")(
    _add_generate)
def run_generate(args: argparse.Namespace) -> int:
    from cxredit.generate import generate

    seeds = _parse_seeds(args.seeds)
    if not (math.isfinite(args.trunc) and 0 <= args.trunc <= 2):
        raise ValueError(f"--trunc must be between 0 and 2 (1 = no truncation), got {args.trunc}")
    if args.interpolate < 0 or (args.interpolate and len(set(seeds)) < 2):
        raise ValueError("--interpolate STEPS needs STEPS >= 1 and at least two --seeds to walk "
                         "between")
    res = generate(args.ckpt, seeds, args.out, psi=args.trunc,
                   noise_mode=args.noise_mode, interpolate=args.interpolate, device=args.device)
    print(f"wrote {res['count']} images and {res['grid']}"
          + (f" and {res['walk']}" if res.get("walk") else ""))
    return 0


# ------------------------------------------------------------------------------------ encoder
def _add_train_encoder(p: argparse.ArgumentParser) -> None:
    from cxredit.config import ENCODER_TRAIN_PRESETS

    p.add_argument("--gan", required=True, help="GAN run folder or checkpoint (G_ema is used)")
    p.add_argument("--data", required=True, help="store of real images (its 'train' split)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--preset", default="paper128", choices=list(ENCODER_TRAIN_PRESETS),
                   help="training preset (the encoder's size follows the generator)")
    p.add_argument("--space", choices=["w", "w+"], help="latent space E predicts")
    p.add_argument("--kimg", type=float, help="training length in thousands of images")
    p.add_argument("--batch", type=int, help="images per cycle")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--snap-kimg", type=float, help="checkpoint + reconstruction grid interval")
    p.add_argument("--seed", type=int, help="seed of every RNG of the run")
    p.add_argument("--trunk", choices=["resnet101", "resnet50", "resnet34", "resnet18", "tiny"],
                   help="ResNet trunk of E (default: by resolution; resnet101 at 128 px)")
    p.add_argument("--pretrained", default=None,
                   help="local torchvision ImageNet weights for the trunk (.pth/.safetensors)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any training field, e.g. --set e_content=0.5 (repeatable)")
    p.add_argument("--init-from", metavar="ENCODER",
                   help="start from this encoder run/checkpoint's weights (same trunk; "
                        "a W encoder may start a W+ one), e.g. after training the GAN further")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    _add_runtime(p)


@command("train-encoder", "train the CRG encoder E that inverts a frozen generator")(
    _add_train_encoder)
def run_train_encoder(args: argparse.Namespace) -> int:
    from cxredit.config import EncoderTrainConfig, encoder_train_preset, parse_overrides
    from cxredit.train.encoder import train_encoder

    refuse_changes_on_resume(args)
    cfg, overrides = None, {}
    if not args.resume:
        cfg = encoder_train_preset(args.preset)
        changes = {k: getattr(args, k) for k in ("space", "kimg", "batch", "lr", "snap_kimg",
                                                  "seed") if getattr(args, k) is not None}
        changes.update(parse_overrides(args.set, EncoderTrainConfig))
        cfg = cfg.replace(**changes)
        if args.trunk:
            overrides["trunk"] = args.trunk
        if args.pretrained:
            overrides["pretrained_path"] = args.pretrained
    rec = train_encoder(args.gan, args.data, args.out, cfg, resume=args.resume,
                        device=args.device, encoder_overrides=overrides,
                        progress=not args.no_progress, kimg=args.kimg,
                        init_from=args.init_from)
    if rec:
        print(f"{args.out}: {rec['kimg']} kimg, synthetic SSIM {rec.get('syn/ssim', 0):.3f}, "
              f"real SSIM {rec.get('real/ssim', float('nan')):.3f}")
    return 0


# ---------------------------------------------------------------------- segmenter, classifier
def _add_train_segmenter(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True,
                   help="store with masks.npy (phantoms, or a folder store with mask columns)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--kimg", type=float, help="training length in thousands of images")
    p.add_argument("--batch", type=int, help="images per step")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--seed", type=int, help="seed of every RNG of the run")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    _add_runtime(p)


@command("train-segmenter", "train the heart + lung segmenter used to measure the CTR")(
    _add_train_segmenter)
def run_train_segmenter(args: argparse.Namespace) -> int:
    from cxredit.train.segmenter import SegmenterTrainConfig, train_segmenter

    refuse_changes_on_resume(args)
    cfg = None
    if not args.resume:
        changes = {k: getattr(args, k) for k in ("batch", "lr", "seed")
                   if getattr(args, k) is not None}
        cfg = SegmenterTrainConfig().replace(**changes)
    rec = train_segmenter(args.data, args.out, cfg, resume=args.resume, device=args.device,
                          progress=not args.no_progress, kimg=args.kimg)
    if rec:
        print(f"{args.out}: {rec['kimg']} kimg, loss {rec.get('loss/seg', float('nan')):.4f}")
    return 0


def _add_train_classifier(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="store whose meta.csv has the --label column")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--label", default="Cardiomegaly",
                   help="label column: 1 = positive, 0 = negative, other values are dropped")
    p.add_argument("--negative-query", default=None,
                   help="negatives = rows matching this query instead of label==0, e.g. "
                        "\"`No Finding`==1\"")
    p.add_argument("--arch", choices=["cnn", "resnet18"],
                   help="network: small GroupNorm CNN (default) or ResNet-18 for real data")
    p.add_argument("--kimg", type=float, help="training length in thousands of images")
    p.add_argument("--batch", type=int, help="images per step")
    p.add_argument("--lr", type=float, help="AdamW learning rate")
    p.add_argument("--seed", type=int, help="seed of every RNG of the run")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    _add_runtime(p)


@command("train-classifier", "train the cardiomegaly classifier (edit judge, feature extractor)")(
    _add_train_classifier)
def run_train_classifier(args: argparse.Namespace) -> int:
    from cxredit.train.classifier import ClassifierTrainConfig, train_classifier

    refuse_changes_on_resume(args)
    cfg = None
    if not args.resume:
        changes = {k: getattr(args, k) for k in ("batch", "lr", "seed", "arch")
                   if getattr(args, k) is not None}
        cfg = ClassifierTrainConfig(label=args.label, negative_query=args.negative_query,
                                    **changes)
    rec = train_classifier(args.data, args.out, cfg, resume=args.resume, device=args.device,
                           progress=not args.no_progress, kimg=args.kimg)
    if rec:
        nan = float("nan")
        print(f"{args.out}: {rec.get('kimg', 0)} kimg, loss {rec.get('loss/bce', nan):.4f}, "
              f"val AUC {rec.get('eval/auc', nan):.3f}, accuracy {rec.get('eval/acc', nan):.3f}")
    return 0

