"""LPIPS perceptual distance (Zhang et al. 2018, VGG-16 variant) from local weight files only.

Nothing is downloaded: the user points to two files they already have,
- the LPIPS linear-layer weights (`vgg.pth` of the `lpips` package, v0.1: keys
  `lin{i}.model.1.weight`, [1, C_i, 1, 1]),
- torchvision's ImageNet VGG-16 weights (`vgg16-397923af.pth`, or only its `features.*`),
as "LIN_WEIGHTS,VGG16_WEIGHTS". Grayscale X-rays are repeated to three channels.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features
_CHANNELS = (64, 128, 256, 512, 512)
# input scaling of the lpips package (inputs in [-1, 1])
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _load_state(path: str) -> dict[str, Tensor]:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: LPIPS weight file not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for bad files
        raise ValueError(f"{p}: cannot read weights ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{p}: expected a state dict")
    return state


class LPIPS(nn.Module):
    """d(x, y) per image, [N]; x, y: [N,1,R,R] (or 3 channels) in [-1,1].

    Args:
        weights: "LIN_WEIGHTS,VGG16_WEIGHTS" (see module docstring).
    """

    def __init__(self, weights: str) -> None:
        super().__init__()
        from torchvision.models import vgg16

        parts = [s.strip() for s in str(weights).split(",")]
        if len(parts) != 2:
            raise ValueError(f"LPIPS weights must be 'LIN_WEIGHTS,VGG16_WEIGHTS', got {weights!r}")
        lin_state, vgg_state = _load_state(parts[0]), _load_state(parts[1])
        self.features = vgg16(weights=None).features[: _TAPS[-1] + 1]
        feats = {k.removeprefix("features."): v for k, v in vgg_state.items()
                 if k.startswith("features.") or k[0].isdigit()}
        missing, _ = self.features.load_state_dict(feats, strict=False)
        if missing:
            raise ValueError(f"{parts[1]}: not VGG-16 weights (missing {missing[0]})")
        lins = []
        for i, c in enumerate(_CHANNELS):
            w = lin_state.get(f"lin{i}.model.1.weight", lin_state.get(f"lin{i}.weight"))
            if w is None or tuple(w.shape) != (1, c, 1, 1):
                raise ValueError(f"{parts[0]}: not LPIPS VGG linear weights (lin{i})")
            lins.append(w.float())
        self.register_buffer("lin", torch.cat([w.flatten() for w in lins]))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def _taps(self, x: Tensor) -> list[Tensor]:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        d = torch.zeros(len(x), device=x.device)
        lins = self.lin.split(list(_CHANNELS))
        for fx, fy, w in zip(self._taps(x), self._taps(y), lins):
            diff = F.conv2d((fx - fy).square(), w.view(1, -1, 1, 1))  # weighted channel sum
            d = d + diff.mean(dim=(1, 2, 3))
        return d
