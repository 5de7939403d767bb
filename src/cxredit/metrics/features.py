"""Pluggable feature extractors for distribution metrics (FID, KID).

`get_extractor(name, **kw)` returns a `FeatureExtractor`: call it on images [N,1,R,R] in
[-1,1] to get float64 features [N, D] (numpy), computed in batches under no_grad. Every
extractor has a `.name`; FID/KID numbers depend entirely on it, so results always carry the
name and numbers from different extractors must never be compared.

Extractors:
- "inception": torchvision's Inception-v3 pool3 features (2048-D) from a local ImageNet weights
  file (`weights=PATH`); nothing is downloaded. Note this is torchvision's port, not the
  TF-FID graph (pt_inception-2015-12-05), so values are close to, not equal to, published FIDs.
- "encoder": global-average-pooled layer4 features of a cxredit encoder's trunk
  (`encoder=RUN_OR_CKPT` or an `Encoder`): in-domain features for chest X-rays.
- "random": a fixed, seeded random conv net: for tests and sanity checks only; its numbers are
  not comparable to anything.
- "classifier": pooled penultimate features of a cxredit classifier (`classifier=RUN_OR_CKPT`
  or a `Classifier`, from `cxredit train-classifier`): in-domain, disease-aware features.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureExtractor:
    """Base class: images [N,1,R,R] in [-1,1] -> float64 numpy features [N, dim].

    Subclasses set `name`, `dim` and implement `features(x)` on one batch already on `device`.

    Args:
        device: where the network runs.
        batch_size: images per forward pass.
    """

    name: str = "base"
    dim: int = 0

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size

    def features(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: Tensor) -> np.ndarray:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"{self.name} extractor expects images [N,1,R,R] in [-1,1], "
                             f"got {list(images.shape)}")
        out = [self.features(images[s:s + self.batch_size].to(self.device, torch.float32))
               .reshape(-1, self.dim).double().cpu()
               for s in range(0, len(images), self.batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


_REGISTRY: dict[str, Callable[..., FeatureExtractor]] = {}


def register_extractor(name: str) -> Callable:
    """Decorator adding a `FeatureExtractor` factory under `name`."""

    def deco(factory: Callable[..., FeatureExtractor]) -> Callable[..., FeatureExtractor]:
        _REGISTRY[name] = factory
        return factory

    return deco


def available_extractors() -> list[str]:
    """Names accepted by `get_extractor`."""
    return sorted(_REGISTRY)


def get_extractor(name: str, **kw: Any) -> FeatureExtractor:
    """Build the extractor `name` ("inception", "encoder", "random", "classifier").

    Keyword arguments go to its constructor: `weights` (inception), `encoder` (encoder),
    `classifier` (classifier), `seed` (random), and for all `device`, `batch_size`.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown feature extractor {name!r}; choose from "
                         f"{', '.join(available_extractors())}")
    return _REGISTRY[name](**kw)


# ----------------------------------------------------------------------------------------------


def _load_state_dict(path: str | Path) -> dict[str, Tensor]:
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p))
    else:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError("not a dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


@register_extractor("inception")
class InceptionExtractor(FeatureExtractor):
    """Inception-v3 pool3 features (2048-D) of torchvision, from a local ImageNet weights file.

    Grey images are repeated to 3 channels, resized to 299 px (bilinear) and ImageNet-normalised;
    with `transform_input=True` (as torchvision's pretrained model) the network then maps them to
    the [-1,1] scaling its ported TF weights expect.

    Args:
        weights: torchvision `inception_v3` ImageNet state dict (.pth via
            `torch.load(weights_only=True)`, or .safetensors); AuxLogits keys are ignored.
    """

    name, dim = "inception", 2048

    def __init__(self, weights: str | Path | None = None, device: torch.device | str = "cpu",
                 batch_size: int = 32) -> None:
        super().__init__(device, batch_size)
        hint = ("nothing is downloaded: pass a local torchvision Inception-v3 ImageNet state "
                "dict with --inception-weights PATH (weights=PATH)")
        if weights is None or not Path(weights).is_file():
            where = "no weights file given" if weights is None else f"{weights}: no such file"
            raise ValueError(f"inception features: {where}; {hint}")
        try:
            sd = _load_state_dict(weights)
        except Exception as e:  # noqa: BLE001 - torch/safetensors raise several types
            why = (str(e).splitlines() or [""])[0][:200]
            raise ValueError(f"inception features: cannot read {weights} "
                             f"({type(e).__name__}: {why}); {hint}") from None
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=False, init_weights=False,
                           transform_input=True)
        sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}
        try:
            net.load_state_dict(sd)
        except RuntimeError as e:
            raise ValueError(f"inception features: {weights} is not a torchvision Inception-v3 "
                             f"state dict ({str(e).splitlines()[0]}); {hint}") from None
        net.fc = nn.Identity()  # pool3 (after avgpool + dropout, identity in eval)
        self.net = net.eval().requires_grad_(False).to(self.device)
        self.mean = torch.tensor(_IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(_IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def features(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = ((x + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)
        return self.net((x - self.mean) / self.std)


@register_extractor("encoder")
class EncoderExtractor(FeatureExtractor):
    """Global-average-pooled layer4 features of a cxredit encoder's trunk.

    Images of another side than the encoder's resolution are resized bilinearly.

    Args:
        encoder: run folder or checkpoint of `cxredit train-encoder`, or an `Encoder` module.
    """

    name = "encoder"

    def __init__(self, encoder: Any = None, device: torch.device | str = "cpu",
                 batch_size: int = 64) -> None:
        super().__init__(device, batch_size)
        if encoder is None:
            raise ValueError("encoder features need an encoder run or checkpoint "
                             "(--encoder RUN_OR_CKPT)")
        if isinstance(encoder, nn.Module):
            E = encoder.to(self.device).eval().requires_grad_(False)
        else:
            from cxredit.train.encoder import load_encoder

            E, _ = load_encoder(encoder, device=self.device)
        self.E = E
        self.layer = E.feature_names.index("layer4")
        self.dim = int(E.head[0].in_features)  # layer4 width

    def features(self, x: Tensor) -> Tensor:
        r = self.E.resolution
        if x.shape[-1] != r or x.shape[-2] != r:
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > r)
        _, feats = self.E(x, return_features=True)
        return feats[self.layer].mean(dim=(2, 3))


@register_extractor("random")
class RandomExtractor(FeatureExtractor):
    """A fixed random conv net (3 strided convs + ReLU, mean and std pooled): 2*width features.

    For tests and sanity checks only: the numbers it gives are not comparable to anything.

    Args:
        seed: weights come from `torch.Generator().manual_seed(seed)`.
        width: channels of the last conv (features = mean and std of each).
    """

    name = "random"

    def __init__(self, seed: int = 0, width: int = 32, device: torch.device | str = "cpu",
                 batch_size: int = 64) -> None:
        super().__init__(device, batch_size)
        gen = torch.Generator().manual_seed(seed)
        chans, layers = [1, width // 4, width // 2, width], []
        for cin, cout in zip(chans[:-1], chans[1:]):
            conv = nn.Conv2d(cin, cout, 3, 2, 1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen)
                                  * (2 / (cin * 9)) ** 0.5)
                conv.bias.copy_(torch.randn(cout, generator=gen) * 0.1)
            layers += [conv, nn.ReLU()]
        self.net = nn.Sequential(*layers).eval().requires_grad_(False).to(self.device)
        self.dim = 2 * width

    def features(self, x: Tensor) -> Tensor:
        h = self.net(x)
        return torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3), correction=0)], dim=1)


@register_extractor("classifier")
class ClassifierExtractor(FeatureExtractor):
    """Pooled penultimate features of a cxredit classifier ([N, D], D = `Classifier.dim`).

    Images of another side than the classifier's resolution are resized (bilinear,
    antialiased when shrinking) by `Classifier.features`.

    Args:
        classifier: run folder or checkpoint of `cxredit train-classifier`, or a `Classifier`.
    """

    name = "classifier"

    def __init__(self, classifier: Any = None, device: torch.device | str = "cpu",
                 batch_size: int = 64) -> None:
        super().__init__(device, batch_size)
        if classifier is None:
            raise ValueError("classifier features need a classifier run or checkpoint of "
                             "`cxredit train-classifier` (classifier=RUN_OR_CKPT)")
        if isinstance(classifier, nn.Module):
            C = classifier.to(self.device).eval().requires_grad_(False)
        else:
            from cxredit.train.classifier import load_classifier

            C = load_classifier(classifier, device=self.device)
        self.C = C
        self.dim = int(C.dim)

    def features(self, x: Tensor) -> Tensor:
        return self.C.features(x)
