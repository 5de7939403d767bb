"""Two-branch chest X-ray encoder: ResNet trunk + detail branch, merged by SPADE denormalisation.

E maps an image [N,1,R,R] in [-1,1] to the generator's W ([N, w_dim], the space of Saboo et al.
2020) or W+ ([N, num_ws, w_dim]). Data flow:

    x ─┬─> trunk: stem, layer1 .. layer3 ─> SPADE merge ─> layer4 ─> mean ─> MLP ─> + w_avg
       └─> detail: 3x3 conv, strided 3x3 convs ─┘      (merge_layer "layer3"; or after layer4)

Why it is built this way:
- Trunk: a torchvision ResNet built with `weights=None` (nothing is ever downloaded). Its
  first conv takes one channel. At R <= 64 (stem "auto") it is a 3x3 stride-1 conv without
  max-pool, as in CIFAR ResNets: the ImageNet stem (7x7 stride 2 + max-pool, /4) would leave
  a 2x2 map after layer4 at 64 px and 1x1 at 32 px. Larger images keep the ImageNet stem;
  "strided" (3x3 stride 2, no max-pool) is the CPU compromise used by the demo64 preset.
  An ImageNet state dict can be loaded from a local file; its RGB conv1 filters are summed
  into one grey filter (= the RGB conv on the grey image replicated to 3 channels, given the
  RGB-averaged ImageNet mean/std with which inputs are normalised).
  The trunk keeps torchvision's BatchNorm so that pretrained statistics load one-to-one (in
  train mode its outputs therefore depend on the batch; eval mode does not).
- Detail branch: a few cheap strided convs with GroupNorm keep local detail (edges, rib and
  vessel texture) that the deep trunk pools away. "auto" picks the number of stages that
  ends at 1-2x the merge map size, so its features are shrunk (antialiased), not blown up.
- Merge (SPADE, Park et al. 2019): trunk features are normalised without affine parameters,
  then `x_norm * (1 + gamma) + beta` with gamma/beta predicted per pixel from the detail
  features (shared 3x3 conv + ReLU, then one 3x3 conv each). The normaliser is GroupNorm, not
  BatchNorm (identical in train/eval and at batch 1, so E(I) never depends on what else is in
  the batch) nor InstanceNorm (which zeroes every channel's spatial mean — the very numbers a
  global-mean head reads — and on 4x4-8x8 maps leaves little global content). The merge sits
  after layer3 by default, so that layer4 still processes the modulated map; "layer4" merges
  right before the head and keeps the pretrained trunk intact end to end.
- Head: global mean + MLP predicting an offset from the generator's w_avg, with its last layer
  initialised small (not zero, so gradients reach every layer from the first step): at init
  E(x) ~ w_avg, the usual starting point of GAN inversion.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, conv1x1

from cxredit.config import DictConfig
from cxredit.models.ops import assert_shape

__all__ = ["ENCODER_PRESETS", "DetailBranch", "Encoder", "EncoderConfig", "SpadeMerge",
           "encoder_config_for"]

_log = logging.getLogger(__name__)

TRUNKS = ("resnet101", "resnet50", "resnet34", "resnet18", "tiny")
SPACES = ("w", "w+")
STEMS = ("auto", "small", "strided", "imagenet")
MERGE_LAYERS = ("layer3", "layer4")
_STEM_STRIDE = {"small": 1, "strided": 2, "imagenet": 4}
_LAYER_STRIDE = {"layer3": 4, "layer4": 8}  # relative to the stem output
# ImageNet mean/std averaged over RGB: what a summed-filter grey conv1 expects.
_GRAY_MEAN, _GRAY_STD = 0.449, 0.226


@dataclass
class EncoderConfig(DictConfig):
    """Everything that defines an `Encoder`; `None`/"auto" fields are resolved by `resolved()`."""

    resolution: int = 128  # input side R (power of two >= 16); must equal the generator's
    w_dim: int = 512  # W dimensionality of the generator
    num_ws: int | None = None  # W+ vectors; None = 2*log2(R) - 2, as in the generator
    space: str = "w"  # "w": [N, w_dim] (the paper) or "w+": [N, num_ws, w_dim]
    trunk: str = "resnet101"  # torchvision ResNet depth, or "tiny" (width-scaled ResNet-10)
    tiny_width: int = 16  # base width of the "tiny" trunk (its layers: w, 2w, 4w, 8w)
    stem: str = "auto"  # "small" 3x3/1 | "strided" 3x3/2 (no max-pool) | "imagenet" | "auto"
    merge_layer: str = "layer3"  # trunk output that the detail branch denormalises
    detail_channels: int = 64  # width of the detail branch
    detail_stages: int | None = None  # strided convs of the detail branch (1-4); None = auto
    spade_hidden: int = 128  # hidden width of the gamma/beta predictor (128 in SPADE)
    head_hidden: int = 512  # hidden width of the MLP head
    head_init_scale: float = 0.01  # scale of the last head layer at init (E(x) ~ w_avg)
    pretrained_path: str | None = None  # local torchvision ImageNet weights (.pth/.safetensors)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a one-line message for inconsistent settings."""
        r = self.resolution
        if r < 16 or r & (r - 1):
            raise ValueError(f"resolution must be a power of two >= 16, got {r}")
        for name, allowed in (("space", SPACES), ("trunk", TRUNKS), ("stem", STEMS),
                              ("merge_layer", MERGE_LAYERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.detail_stages is not None and not 1 <= self.detail_stages <= 4:
            raise ValueError(f"detail_stages must be 1..4 or None, got {self.detail_stages}")
        if min(self.w_dim, self.detail_channels, self.spade_hidden, self.head_hidden,
               self.tiny_width, 1 if self.num_ws is None else self.num_ws) < 1:
            raise ValueError("w_dim, num_ws and the widths must be positive")
        last = r // (_STEM_STRIDE[self.resolved_stem] * _LAYER_STRIDE["layer4"])
        if last < 2:
            raise ValueError(f"stem {self.resolved_stem!r} at {r} px leaves a {last}x{last} map "
                             "after layer4; use stem='small'")

    @property
    def resolved_stem(self) -> str:
        if self.stem != "auto":
            return self.stem
        return "small" if self.resolution <= 64 else "imagenet"

    def merge_size(self) -> int:
        """Side of the trunk map that the detail branch modulates."""
        stride = _STEM_STRIDE[self.resolved_stem] * _LAYER_STRIDE[self.merge_layer]
        return self.resolution // stride

    def resolved(self) -> EncoderConfig:
        """Copy with num_ws, stem and detail_stages made explicit."""
        stages = self.detail_stages
        if stages is None:  # end at 1-2x the merge map, with at least 2 and at most 4 stages
            stages = min(max(int(math.log2(self.resolution // self.merge_size())) - 1, 2), 4)
        num_ws = self.num_ws or 2 * int(math.log2(self.resolution)) - 2
        return dataclasses.replace(self, num_ws=num_ws, stem=self.resolved_stem,
                                   detail_stages=stages)


ENCODER_PRESETS: dict[str, EncoderConfig] = {
    # Tests and smoke runs: a width-16 ResNet-10 at 32 px.
    "tiny": EncoderConfig(resolution=32, w_dim=64, trunk="tiny", detail_channels=32,
                          spade_hidden=32, head_hidden=128),
    # CPU demo: ResNet-18 at 64 px, matching the demo64 GAN (w_dim 128). The stride-2 stem
    # runs layer1 at 32 px (maps 32 .. 4 as at 128 px with the ImageNet stem): ~3.5x cheaper
    # on CPU than the stride-1 stem, whose layer1 would run 64 channels at 64x64.
    "demo64": EncoderConfig(resolution=64, w_dim=128, trunk="resnet18", stem="strided",
                            detail_channels=32, spade_hidden=64, head_hidden=256),
    # The paper's setting: ResNet-101 at 128 px, w_dim 512.
    "paper128": EncoderConfig(resolution=128, w_dim=512, trunk="resnet101"),
}


def encoder_config_for(source: Any, space: str = "w", **overrides: Any) -> EncoderConfig:
    """Encoder config matching a generator.

    Args:
        source: a preset name ("tiny", "demo64", "paper128"), a `GanConfig`, or a `Generator`.
            For the latter two, resolution/w_dim/num_ws come from it and the rest from the
            preset at the nearest resolution (<= 32: tiny, <= 64: demo64, else paper128).
        space: "w" or "w+".
        **overrides: any other `EncoderConfig` field.
    """
    if isinstance(source, str):
        if source not in ENCODER_PRESETS:
            raise ValueError(f"unknown preset {source!r}; choose from {', '.join(ENCODER_PRESETS)}")
        return dataclasses.replace(ENCODER_PRESETS[source], space=space, **overrides)
    res = getattr(source, "img_resolution", None) or getattr(source, "resolution", None)
    if res is None or not hasattr(source, "w_dim"):
        raise ValueError(f"cannot derive an encoder config from {type(source).__name__}")
    base = "tiny" if res <= 32 else "demo64" if res <= 64 else "paper128"
    match = dict(resolution=res, w_dim=source.w_dim, num_ws=getattr(source, "num_ws", None))
    return dataclasses.replace(ENCODER_PRESETS[base], space=space, **{**match, **overrides})


# ----------------------------------------------------------------------------------------------
# Building blocks


def _groups(channels: int) -> int:
    # GroupNorm's default 32 groups, fewer where a group would hold < 8 channels: per-channel
    # means survive the merge's normalisation only relative to the other channels of a group
    g = math.gcd(channels, 32)
    while g > 1 and channels // g < 8:
        g //= 2
    return g


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = x.shape[-1] > size[-1]  # antialias when shrinking, so detail is averaged, not aliased
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


class _TinyResNet(nn.Module):
    """torchvision's ResNet layout with BasicBlock x [1,1,1,1] and widths w, 2w, 4w, 8w."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)  # replaced by the grey stem
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, mult in enumerate((1, 2, 4, 8), start=1):
            cout, stride = width * mult, 1 if i == 1 else 2
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride, down)))
            cin = cout
        for m in self.modules():  # torchvision's ResNet init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _build_trunk(name: str, stem: str, tiny_width: int) -> tuple[nn.Module, list[int]]:
    """ResNet with a 1-channel stem and no classifier; returns it and layer1..4 widths."""
    trunk = _TinyResNet(tiny_width) if name == "tiny" else getattr(torchvision.models, name)(
        weights=None)
    width = trunk.conv1.out_channels
    if stem in ("small", "strided"):
        trunk.conv1 = nn.Conv2d(1, width, 3, _STEM_STRIDE[stem], 1, bias=False)
        trunk.maxpool = nn.Identity()
    else:
        trunk.conv1 = nn.Conv2d(1, width, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(trunk.conv1.weight, mode="fan_out", nonlinearity="relu")
    trunk.fc = nn.Identity()  # the head replaces the classifier
    trunk.avgpool = nn.Identity()
    channels = []
    for i in range(1, 5):
        norms = [m for m in getattr(trunk, f"layer{i}")[-1].modules()
                 if isinstance(m, nn.BatchNorm2d)]
        channels.append(norms[-1].num_features)
    return trunk, channels


class DetailBranch(nn.Module):
    """x [N,1,R,R] -> list of `stages` maps [N, C, R/2^k, R/2^k], k = 1..stages."""

    def __init__(self, channels: int, stages: int) -> None:
        super().__init__()
        self.conv_in = nn.Sequential(nn.Conv2d(1, channels, 3, 1, 1), nn.LeakyReLU(0.2))
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, 2, 1),
                          nn.GroupNorm(_groups(channels), channels), nn.LeakyReLU(0.2))
            for _ in range(stages))

    def forward(self, x: Tensor) -> list[Tensor]:
        h, out = self.conv_in(x), []
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out


class SpadeMerge(nn.Module):
    """SPADE denormalisation: GroupNorm(x) * (1 + gamma(c)) + beta(c), c resized to x.

    Args (forward):
        x: [N, C, H, W] trunk features.
        cond: [N, C_cond, H', W'] detail features (resized bilinearly to H x W).
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, 1, 1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, 1, 1)
        self.beta = nn.Conv2d(hidden, channels, 3, 1, 1)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.shared(_resize(cond, x.shape[-2:]))
        return self.norm(x) * (1 + self.gamma(h)) + self.beta(h)


# ----------------------------------------------------------------------------------------------
# Encoder


class Encoder(nn.Module):
    """Image -> W or W+ of a StyleGAN2 generator, predicted as an offset from its w_avg.

    Build with `Encoder(cfg)`, `Encoder(**cfg_fields)`, `Encoder.for_generator(G, space)` or,
    from a checkpoint, `Encoder.from_config(E.config)` + `load_state_dict` (w_avg is a buffer,
    so it travels with the weights).

    Args:
        cfg: `EncoderConfig` or its dict; fields in `overrides` replace its values.
        w_avg: [w_dim] the generator's `mapping.w_avg` (zeros if None; see `set_w_avg`).
        load_pretrained: load `cfg.pretrained_path` into the trunk (False when the weights
            come from a checkpoint anyway, so the file need not exist there).
        **overrides: `EncoderConfig` fields.

    Example:
        >>> E = Encoder(ENCODER_PRESETS["tiny"], w_avg=G.mapping.w_avg)
        >>> w = E(img)                               # [N, 64]
        >>> w, feats = E(img, return_features=True)  # feats: list of [N, C, h, w]
    """

    def __init__(
        self,
        cfg: EncoderConfig | dict | None = None,
        *,
        w_avg: Tensor | None = None,
        load_pretrained: bool = True,
        **overrides: Any,
    ) -> None:
        super().__init__()
        base = cfg.to_dict() if isinstance(cfg, EncoderConfig) else dict(cfg or {})
        c = EncoderConfig.from_dict({**base, **overrides}).resolved()
        self.config = c.to_dict()
        self.resolution, self.w_dim, self.num_ws, self.space = (c.resolution, c.w_dim, c.num_ws,
                                                                c.space)
        self.merge_layer = c.merge_layer
        self.trunk, widths = _build_trunk(c.trunk, c.stem, c.tiny_width)
        self.detail = DetailBranch(c.detail_channels, c.detail_stages)
        merged = widths[int(c.merge_layer[-1]) - 1]
        self.merge = SpadeMerge(merged, c.detail_channels, c.spade_hidden)
        out = c.w_dim * (c.num_ws if c.space == "w+" else 1)
        self.head = nn.Sequential(nn.Linear(widths[3], c.head_hidden), nn.LeakyReLU(0.2),
                                  nn.Linear(c.head_hidden, out))
        with torch.no_grad():
            self.head[-1].weight.mul_(c.head_init_scale)
            self.head[-1].bias.zero_()
        self.register_buffer("w_avg", torch.zeros(c.w_dim))
        if w_avg is not None:
            self.set_w_avg(w_avg)
        self.feature_names = (["stem", "layer1", "layer2", "layer3", "layer4"]
                              + [f"detail{k + 1}" for k in range(c.detail_stages)])
        if c.pretrained_path and load_pretrained:
            self.load_trunk_weights(c.pretrained_path)

    @classmethod
    def from_config(cls, config: dict, w_avg: Tensor | None = None) -> Encoder:
        """Rebuild from `E.config` (pretrained_path is not read: checkpoint weights follow)."""
        return cls(EncoderConfig.from_dict(config), w_avg=w_avg, load_pretrained=False)

    @classmethod
    def for_generator(cls, G: nn.Module, space: str = "w", **overrides: Any) -> Encoder:
        """Encoder sized for generator `G` (`encoder_config_for`), holding a copy of its w_avg."""
        return cls(encoder_config_for(G, space, **overrides), w_avg=G.mapping.w_avg)

    def set_w_avg(self, w_avg: Tensor) -> None:
        """Copy the generator's w_avg [w_dim] into the buffer the offsets start from."""
        assert_shape(w_avg, [self.w_dim], "w_avg")
        with torch.no_grad():
            self.w_avg.copy_(w_avg.detach().to(self.w_avg))

    def load_trunk_weights(self, path: str | os.PathLike) -> list[str]:
        """Load a torchvision ImageNet state dict (.pth or .safetensors) into the trunk.

        conv1's RGB filters are summed into the grey filter. With a 3x3 stem ("small",
        "strided") the 7x7 ImageNet conv1 does not fit and stays at its init. The classifier
        (`fc.*`) is ignored.

        Returns:
            The trunk keys left at their initial values.
        """
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"pretrained_path {str(p)!r}: no such file")
        try:
            if p.suffix == ".safetensors":
                from safetensors.torch import load_file
                sd = load_file(str(p))
            else:
                sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"pretrained_path {str(p)!r}: cannot read a state dict "
                             f"({type(e).__name__}: {e})") from e
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise ValueError(f"pretrained_path {str(p)!r}: not a dict of tensors")
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        own, skipped = self.trunk.state_dict(), []
        w = sd.get("conv1.weight")
        if w is not None and w.ndim == 4 and w.shape[1] == 3:
            sd["conv1.weight"] = w = w.sum(dim=1, keepdim=True)  # grey replicated to RGB
        if w is not None and w.ndim == 4 and w.shape[-1] != own["conv1.weight"].shape[-1]:
            del sd["conv1.weight"]
            skipped.append("conv1.weight")
            _log.warning("%s: %dx%d conv1 does not fit the 3x3 stem; it stays at init",
                         p, w.shape[-2], w.shape[-1])
        missing = sorted(set(own) - set(sd) - set(skipped))
        unexpected = sorted(set(sd) - set(own))
        shapes = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
        if missing or unexpected or shapes:
            raise ValueError(
                f"pretrained_path {str(p)!r} does not fit the {self.config['trunk']} trunk: "
                f"{len(missing)} missing {missing[:2]}, {len(unexpected)} unexpected "
                f"{unexpected[:2]}, {len(shapes)} of another shape {shapes[:2]}")
        self.trunk.load_state_dict(sd, strict=False)
        return skipped

    def forward(
        self, x: Tensor, return_features: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Encode images.

        Args:
            x: [N, 1, R, R] images in [-1, 1], R = config resolution.
            return_features: also return the encoder's own intermediate maps (for content
                losses such as ||E_i(I) - E_i(I')||_1), named by `self.feature_names`: the
                trunk's stem, layer1 .. layer4 (layer4 runs on the merged map when
                merge_layer is "layer3") and each detail-branch stage; each is [N, C, h, w].

        Returns:
            w [N, w_dim] (space "w") or [N, num_ws, w_dim] ("w+"), or (w, features).
        """
        r = self.resolution
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, r, r):
            raise ValueError(f"Encoder expects images [N,1,{r},{r}] in [-1,1], "
                             f"got {list(x.shape)}")
        x = x.float()
        tr = self.trunk
        h = tr.maxpool(tr.relu(tr.bn1(tr.conv1(((x + 1) / 2 - _GRAY_MEAN) / _GRAY_STD))))
        details = self.detail(x)
        feats = [h]
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(tr, name)(h)
            feats.append(h)
            if name == self.merge_layer:
                h = F.relu(self.merge(h, details[-1]))
        offset = self.head(h.mean(dim=(2, 3)))
        if self.space == "w+":
            offset = offset.view(-1, self.num_ws, self.w_dim)
        w = self.w_avg + offset
        return (w, feats + details) if return_features else w
