"""Binary chest X-ray classifier (cardiomegaly vs. not): the judge of edits and a feature source.

Two architectures behind one interface:

* "cnn" (default): a small plain CNN, conv3x3 blocks with stride-2 downsampling, GroupNorm and
  ReLU, global average pooling. Trains in seconds on 32-px phantoms on a CPU.
* "resnet18": torchvision's ResNet-18 (random init) with a 1-channel conv1, for real data.

`features(x)` returns the pooled penultimate features [N, D] (the "classifier" FID/KID
extractor of `cxredit.metrics.features`); `forward(x)` returns one logit per image for
P(positive class), by default cardiomegaly.

The network is tied to the resolution it was trained at: convolutional features are scale
dependent (the heart is a given number of pixels wide), so inputs of another side are resized
(bilinear, antialiased when shrinking) to `resolution` instead of being fed as they are.

GroupNorm (not BatchNorm) in "cnn" keeps an image's features independent of the batch it is
run in, in training and eval mode alike; "resnet18" keeps torchvision's BatchNorm (use eval
mode for inference, as `load_classifier` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from cxredit.config import DictConfig

ARCHS = ("cnn", "resnet18")


@dataclass
class ClassifierConfig(DictConfig):
    """Everything that defines a `Classifier`."""

    arch: str = "cnn"  # "cnn" (small, GroupNorm) or "resnet18" (torchvision, BatchNorm)
    resolution: int = 128  # input side R in 32..256; other sides are resized to it
    base_channels: int = 16  # cnn: width of the stem; doubles at each downsampling
    depth: int = 4  # cnn: number of stride-2 blocks (final map is about R / 2**depth px)
    max_channels: int = 256  # cnn: upper bound on the width (= feature dimension D)
    label: str = "Cardiomegaly"  # what the logit means (metadata; the network ignores it)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        r, d = self.resolution, self.depth
        if not 32 <= r <= 256:
            raise ValueError(f"resolution must be in 32..256, got {r}")
        if not 1 <= d <= 6 or 2**d > r:
            raise ValueError(f"depth must be in 1..6 with 2**depth <= resolution, got {d} at {r}")
        if self.base_channels < 2 or self.max_channels < self.base_channels:
            raise ValueError(f"need 2 <= base_channels <= max_channels, got "
                             f"{self.base_channels} and {self.max_channels}")


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, c), c)


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    """conv3x3 -> GroupNorm -> ReLU: [N,cin,h,w] -> [N,cout,ceil(h/stride),ceil(w/stride)]."""
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _norm(cout), nn.ReLU(inplace=True)]


def _resnet18_trunk() -> nn.Module:
    """torchvision ResNet-18, random init, 1-channel conv1, no fc: [N,1,R,R] -> [N,512]."""
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Identity()
    return net


class Classifier(nn.Module):
    """Images [N,1,R,R] in [-1,1] -> logits [N] of the positive class (default cardiomegaly).

    Args:
        cfg: `ClassifierConfig` or its dict; keyword overrides replace its fields.

    Attributes:
        dim: feature dimension D of `features`.

    Example:
        >>> clf = Classifier(resolution=32, base_channels=8, depth=3)
        >>> clf(torch.zeros(2, 1, 32, 32)).shape, clf.features(torch.zeros(2, 1, 64, 64)).shape
        (torch.Size([2]), torch.Size([2, 64]))
    """

    def __init__(self, cfg: ClassifierConfig | dict | None = None, **overrides) -> None:
        super().__init__()
        base = cfg.to_dict() if isinstance(cfg, ClassifierConfig) else dict(cfg or {})
        c = ClassifierConfig.from_dict({**base, **overrides})
        self.config = c.to_dict()
        self.resolution, self.arch = c.resolution, c.arch
        if c.arch == "resnet18":
            self.trunk = _resnet18_trunk()
            self.dim = 512
        else:
            widths = [min(c.base_channels * 2**i, c.max_channels) for i in range(c.depth + 1)]
            layers = _conv(1, widths[0])
            for cin, cout in zip(widths[:-1], widths[1:]):
                layers += _conv(cin, cout, stride=2) + _conv(cout, cout)
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            self.trunk = nn.Sequential(*layers)
            self.dim = widths[-1]
        self.head = nn.Linear(self.dim, 1)

    @classmethod
    def from_config(cls, config: dict) -> Classifier:
        """Rebuild from `clf.config` (weights are loaded separately)."""
        return cls(ClassifierConfig.from_dict(config))

    def resize(self, x: Tensor) -> Tensor:
        """Check [N,1,H,W] and bring it to [N,1,R,R] (bilinear, antialiased when shrinking)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"Classifier expects images [N,1,R,R] in [-1,1], got {list(x.shape)}")
        R = self.resolution
        if x.shape[2] != R or x.shape[3] != R:
            x = F.interpolate(x, size=(R, R), mode="bilinear", align_corners=False,
                              antialias=min(x.shape[2:]) > R)
        return x

    def features(self, x: Tensor) -> Tensor:
        """Pooled penultimate features: [N,1,H,W] in [-1,1] -> [N, D] (D = `self.dim`)."""
        f = self.trunk(self.resize(x))
        assert f.shape == (x.shape[0], self.dim), f.shape
        return f

    def forward(self, x: Tensor) -> Tensor:
        """Logits [N] (sigmoid = P(positive)) of images [N,1,H,W] in [-1,1]."""
        return self.head(self.features(x)).squeeze(1)
