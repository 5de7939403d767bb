"""Small U-Net predicting heart and lung masks: the measuring instrument behind CTR.

The three masks (heart, right lung, left lung; `cxredit.data.phantom.MASK_NAMES` order) are
predicted as *independent* logits rather than one softmax over classes: on a radiograph the
heart shadow overlaps the lung fields, so a pixel may belong to several structures.

GroupNorm (not BatchNorm) keeps the network's output independent of the batch it is run in,
so training/eval modes behave the same and batched inference equals one-by-one inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cxredit.config import DictConfig

NUM_MASKS = 3  # heart, right lung, left lung


@dataclass
class SegmenterConfig(DictConfig):
    """Everything that defines a `Segmenter`."""

    resolution: int = 128  # input side R; must be divisible by 2**depth
    base_channels: int = 16  # width of the first level; doubles at each downsampling
    depth: int = 3  # number of 2x downsamplings (the bottleneck is R / 2**depth px)

    def __post_init__(self) -> None:
        r, d, c = self.resolution, self.depth, self.base_channels
        if not 1 <= d <= 6:
            raise ValueError(f"depth must be in 1..6, got {d}")
        if r < 16 or r % (2**d):
            raise ValueError(f"resolution must be >= 16 and divisible by 2**depth = {2**d}, "
                             f"got {r}")
        if c < 2:
            raise ValueError(f"base_channels must be >= 2, got {c}")


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, c), c)


class ConvBlock(nn.Sequential):
    """(conv3x3 -> GroupNorm -> SiLU) x 2: [N,cin,h,w] -> [N,cout,h,w]."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm(cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), _norm(cout), nn.SiLU())


class Segmenter(nn.Module):
    """U-Net: images [N,1,R,R] in [-1,1] -> mask logits [N,3,R,R] (heart, right, left lung).

    Args:
        cfg: `SegmenterConfig` or its dict; keyword overrides replace its fields.

    Example:
        >>> net = Segmenter(resolution=32, base_channels=8)
        >>> logits = net(torch.zeros(2, 1, 32, 32))  # [2, 3, 32, 32]
    """

    def __init__(self, cfg: SegmenterConfig | dict | None = None, **overrides) -> None:
        super().__init__()
        base = cfg.to_dict() if isinstance(cfg, SegmenterConfig) else dict(cfg or {})
        c = SegmenterConfig.from_dict({**base, **overrides})
        self.config = c.to_dict()
        self.resolution, self.depth = c.resolution, c.depth
        widths = [c.base_channels * 2**i for i in range(c.depth + 1)]
        self.stem = ConvBlock(1, widths[0])
        self.down = nn.ModuleList(ConvBlock(widths[i], widths[i + 1]) for i in range(c.depth))
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                      for i in range(c.depth))
        self.up = nn.ModuleList(ConvBlock(2 * widths[i], widths[i]) for i in range(c.depth))
        self.head = nn.Conv2d(widths[0], NUM_MASKS, 1)

    @classmethod
    def from_config(cls, config: dict) -> Segmenter:
        """Rebuild from `net.config` (weights are loaded separately)."""
        return cls(SegmenterConfig.from_dict(config))

    def forward(self, x: Tensor) -> Tensor:
        R = self.resolution
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != R or x.shape[3] != R:
            raise ValueError(f"Segmenter expects images [N,1,{R},{R}], got {list(x.shape)}")
        h = self.stem(x)
        skips = []
        for block in self.down:
            skips.append(h)
            h = block(self.pool(h))
        for i in reversed(range(self.depth)):
            h = self.up[i](torch.cat([self.upsample[i](h), skips[i]], dim=1))
        return self.head(h)
