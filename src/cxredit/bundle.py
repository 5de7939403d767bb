"""Weight bundles: the inference-only models of a trained pipeline in one folder.

A bundle (e.g. the shipped `weights/demo/`) is what `cxredit demo`, `cxredit serve` and the
Python API load to edit X-rays without any training run at hand:

    weights/demo/
      bundle.json           manifest: format version, resolution, components, directions,
                            how each tensor file was stored (fp16/fp32) and what that cost
      G.json/.safetensors   a "gan" checkpoint holding only G_config + G_ema
      E.json/.safetensors   an "encoder" checkpoint (E_config, E, and the bundle's G as its GAN)
      segmenter.*           a "segmenter" checkpoint (net_config, net)
      classifier.*          a "classifier" checkpoint (its config and weights)
      directions/<name>.npz direction files (+ JSON sidecars naming the bundle's G)

Every component is an ordinary cxredit checkpoint, so the usual loaders read it directly
(`load_generator("weights/demo/G")`). Only what inference needs is kept: no discriminator, no
optimizer state, no training-time copy of G. Float tensors are stored in fp16 when that is
lossless enough for the component's output (measured at export on a fixed input and written
to the manifest); otherwise they stay fp32. Loaders cast back to fp32.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxredit import __version__
from cxredit.checkpoint import (
    checkpoint_sha256,
    load_checkpoint,
    read_checkpoint_json,
    save_checkpoint,
)

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "cxredit.bundle"
BUNDLE_FORMAT_VERSION = 1

# component -> (file stem, checkpoint kind, the entries inference needs)
COMPONENTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "generator": ("G", "gan", ("G_config", "G_ema")),
    "encoder": ("E", "encoder", ("E_config", "E", "gan")),
    "segmenter": ("segmenter", "segmenter", ("net_config", "net")),
    "classifier": ("classifier", "classifier", ("net_config", "net")),
}
# Largest output change (images in [-1,1], logits, latents) accepted for fp16 storage.
FP16_TOLERANCE = {"generator": 2e-2, "encoder": 2e-2, "segmenter": 5e-2, "classifier": 5e-2}


class BundleError(ValueError):
    """A bundle folder is missing, incomplete or of an unsupported format."""


@dataclass
class Bundle:
    """Loaded models of a bundle (eval mode, no grad, on `device`).

    Attributes:
        root: the bundle folder.
        manifest: the parsed `bundle.json`.
        G: the generator (always present).
        E: the encoder, or None.
        segmenter: the heart/lung segmenter, or None.
        classifier: the cardiomegaly classifier, or None.
        directions: name -> (unit v [w_dim] or [num_ws, w_dim] float32, sidecar dict).
    """

    root: Path
    manifest: dict
    G: Any
    E: Any = None
    segmenter: Any = None
    classifier: Any = None
    directions: dict[str, tuple[np.ndarray, dict]] = field(default_factory=dict)

    @property
    def resolution(self) -> int:
        return int(self.G.img_resolution)

    @property
    def generator_sha256(self) -> str:
        return self.manifest["components"]["generator"]["sha256"]

    def path(self, component: str) -> Path:
        """Checkpoint path (no suffix) of a component, for the path-taking APIs."""
        return self.root / self.manifest["components"][component]["file"]

    # -- the few calls an editing script needs (all under no_grad, on the models' device)
    @property
    def device(self) -> torch.device:
        return next(self.G.parameters()).device

    def read(self, path: str | os.PathLike) -> torch.Tensor:
        """An X-ray file (PNG/JPEG/DICOM) as [1,1,R,R] in [-1,1] at the bundle's resolution."""
        from cxredit.data.store import load_image_files

        return load_image_files([str(path)], self.resolution)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """E's latents of images [N,1,R,R] in [-1,1] -> w [N, w_dim] (or W+)."""
        if self.E is None:
            raise BundleError(f"{self.root}: the bundle has no encoder")
        return self.E(images.to(self.device))

    def _latents(self, w) -> torch.Tensor:
        """`w` (tensor or array) as float32 on the bundle's device, checked against G."""
        from cxredit.latent.edit import check_latents

        w = torch.as_tensor(w, dtype=torch.float32, device=self.device)
        check_latents(w, self.G.num_ws, self.G.w_dim)
        return w

    @torch.no_grad()
    def synthesize(self, w: torch.Tensor) -> torch.Tensor:
        """G(w) with constant noise, clamped to [-1,1]: [N,1,R,R]. w: [N, w_dim] (W) or
        [N, num_ws, w_dim] (W+), tensor or array."""
        return self.G.synthesis(self._latents(w), noise_mode="const").clamp(-1, 1)

    def edit(self, w: torch.Tensor, direction: str, alpha: float) -> torch.Tensor:
        """G(w + alpha v) for a named direction of the bundle: [N,1,R,R] in [-1,1]."""
        from cxredit.latent.edit import apply_direction

        if direction not in self.directions:
            raise BundleError(f"{self.root}: no direction {direction!r}; there are "
                              f"{', '.join(self.directions) or 'none'}")
        v = torch.from_numpy(self.directions[direction][0]).to(self.device)
        return self.synthesize(apply_direction(self._latents(w), v, float(alpha),
                                               self.G.num_ws))

    @torch.no_grad()
    def ctr(self, images: torch.Tensor) -> np.ndarray:
        """Cardiothoracic ratio of images [N,1,R,R] from the segmenter's masks (NaN: none)."""
        from cxredit.metrics.ctr import ctr
        from cxredit.train.segmenter import predict_masks

        if self.segmenter is None:
            raise BundleError(f"{self.root}: the bundle has no segmenter")
        return np.atleast_1d(ctr(predict_masks(self.segmenter, images))["ctr"])


def _to_half(state: Any) -> Any:
    """fp32 tensors -> fp16 where the values fit fp16's range (nested dicts/lists)."""
    if isinstance(state, torch.Tensor):
        if state.dtype == torch.float32 and state.numel() and \
                float(state.abs().max()) < 6.0e4:
            return state.half()
        return state
    if isinstance(state, dict):
        return {k: _to_half(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_half(v) for v in state)
    return state


def _probe(component: str, ck: Path, res: int) -> torch.Tensor:
    """Output of a component on a fixed input (to measure what fp16 storage changes)."""
    gen = torch.Generator().manual_seed(0)
    if component == "generator":
        from cxredit.train.gan import load_generator

        G = load_generator(ck)
        z = torch.randn(8, G.z_dim, generator=gen)
        return G(z, noise_mode="const")
    x = torch.rand(8, 1, res, res, generator=gen) * 2 - 1
    if component == "encoder":
        from cxredit.train.encoder import load_encoder

        return load_encoder(ck)[0](x)
    if component == "segmenter":
        from cxredit.train.segmenter import load_segmenter

        return load_segmenter(ck)(x)
    from cxredit.train.classifier import load_classifier

    return load_classifier(ck)(x)


def _export_component(component: str, source: str | os.PathLike, out: Path, half: bool,
                      res: int, extra: dict | None = None) -> dict:
    from cxredit.runs import find_checkpoint

    stem, kind, keys = COMPONENTS[component]
    src = find_checkpoint(source)
    state = load_checkpoint(src, kind=kind, keys=list(keys))
    state.update(extra or {})
    dest = out / stem
    save_checkpoint(dest, state, kind)
    rec = {"file": stem, "kind": kind, "source": str(src), "source_sha256": checkpoint_sha256(src),
           "dtype": "float32"}
    if half:
        ref = _probe(component, dest, res)
        save_checkpoint(dest, _to_half(state), kind)
        err = float((_probe(component, dest, res) - ref).abs().max())
        rec["fp16_max_abs_diff"] = err
        if err <= FP16_TOLERANCE[component]:
            rec["dtype"] = "float16"
        else:
            log.info("%s: fp16 changes the output by %.3g > %.3g, kept fp32", component, err,
                     FP16_TOLERANCE[component])
            save_checkpoint(dest, state, kind)
    rec["sha256"] = checkpoint_sha256(dest)
    rec["bytes"] = sum((out / f"{stem}{s}").stat().st_size for s in (".json", ".safetensors"))
    return rec


def export_bundle(out: str | os.PathLike, gan: str | os.PathLike,
                  encoder: str | os.PathLike | None = None,
                  segmenter: str | os.PathLike | None = None,
                  classifier: str | os.PathLike | None = None,
                  directions: dict[str, str | os.PathLike] | None = None,
                  half: bool = True, info: dict | None = None) -> Path:
    """Write a bundle from training runs (or checkpoints).

    Args:
        out: bundle folder (created; existing component files are replaced).
        gan: GAN run folder or checkpoint (its G_ema is kept).
        encoder: encoder run/checkpoint trained against `gan`.
        segmenter: segmenter run/checkpoint.
        classifier: classifier run/checkpoint.
        directions: name -> direction `.npz` (made with `gan`'s generator).
        half: store fp16 where the measured output change is within `FP16_TOLERANCE`.
        info: free-form fields added to the manifest (e.g. training commands).

    Returns:
        Path of `bundle.json`.
    """
    from cxredit.latent.directions import load_direction, save_direction
    from cxredit.latent.edit import check_direction
    from cxredit.models.stylegan2 import num_ws_for
    from cxredit.runs import find_checkpoint

    out = Path(out)
    for name in directions or {}:
        if not _DIRECTION_NAME.fullmatch(name):
            raise BundleError(f"direction name {name!r}: use letters, digits, '_' and '-' "
                              "(it names a file inside the bundle)")
    old_files = _listed_files(out)
    out.mkdir(parents=True, exist_ok=True)
    g_cfg = read_checkpoint_json(find_checkpoint(gan))["state"]["G_config"]
    res = int(g_cfg["img_resolution"])
    num_ws = num_ws_for(res)
    gan_sha = checkpoint_sha256(find_checkpoint(gan))
    comps = {"generator": _export_component("generator", gan, out, half, res)}
    g_ref = {"path": comps["generator"]["file"], "sha256": comps["generator"]["sha256"]}
    if encoder is not None:
        e_gan = read_checkpoint_json(find_checkpoint(encoder))["state"].get("gan", {})
        if e_gan.get("sha256") not in (None, gan_sha):
            raise BundleError(f"{encoder}: encoder was trained against another generator "
                              f"({e_gan.get('path')})")
        comps["encoder"] = _export_component("encoder", encoder, out, half, res,
                                             extra={"gan": g_ref})
    for name, src in (("segmenter", segmenter), ("classifier", classifier)):
        if src is not None:
            comps[name] = _export_component(name, src, out, half, res)
    dirs = {}
    for name, path in (directions or {}).items():
        v, side = load_direction(path)
        if (side.get("generator") or {}).get("sha256") not in (None, gan_sha):
            raise BundleError(f"{path}: direction was made with another generator")
        check_direction(v, num_ws, int(g_cfg["w_dim"]), path, BundleError)
        rel = f"directions/{name}.npz"
        keep = {k: val for k, val in side.items()
                if k not in ("format", "format_version", "space", "shape", "w_dim", "num_ws")}
        keep.setdefault("method", "unknown")  # a direction .npz made outside cxredit
        save_direction(out / rel, v, {**keep, "generator": g_ref,
                                      "source_generator": side.get("generator")})
        dirs[name] = {"file": rel, "method": side.get("method")}
    manifest = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "cxredit": __version__, "resolution": res, "w_dim": int(g_cfg["w_dim"]),
                "components": comps, "directions": dirs,
                "total_bytes": sum(c["bytes"] for c in comps.values()), **(info or {})}
    tmp = out / "bundle.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "bundle.json")
    for rel in old_files - _listed_files(out):  # what an earlier export left and this one dropped
        (out / rel).unlink(missing_ok=True)
    return out / "bundle.json"


_DIRECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _listed_files(out: Path) -> set[str]:
    """Files (relative to `out`) that the bundle manifest in `out` lists; empty if none."""
    try:
        mf = json.loads((out / "bundle.json").read_text())
        files = {f"{c['file']}{s}" for c in mf["components"].values() for s in (".json",
                                                                                ".safetensors")}
        for d in mf["directions"].values():
            files |= {d["file"], str(Path(d["file"]).with_suffix(".json"))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    # only plain names inside the bundle (a hand-edited manifest cannot point elsewhere)
    return {f for f in files if ".." not in Path(f).parts and not Path(f).is_absolute()}


def read_manifest(path: str | os.PathLike) -> dict:
    """Parse and check `bundle.json` of a bundle folder."""
    root = Path(path)
    mf = root / "bundle.json"
    if not mf.exists():
        raise BundleError(f"{root}: not a cxredit weights bundle (no bundle.json)")
    try:
        doc = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mf}: not valid JSON ({e.msg})") from None
    if doc.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{mf}: not a cxredit bundle manifest")
    if doc.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{mf}: bundle format version {doc.get('format_version')} is not "
                          f"supported (expected {BUNDLE_FORMAT_VERSION})")
    if "generator" not in doc.get("components", {}):
        raise BundleError(f"{mf}: the bundle has no generator")
    return doc


def load_bundle(path: str | os.PathLike, device: torch.device | str = "cpu",
                components: tuple[str, ...] | None = None) -> Bundle:
    """Load a bundle's models (eval mode, fp32) and directions.

    Args:
        path: bundle folder.
        device: where the models live.
        components: load only these (the generator always); None = all present.
    """
    from cxredit.train.encoder import load_encoder
    from cxredit.train.gan import load_generator
    from cxredit.train.segmenter import load_segmenter

    root = Path(path)
    mf = read_manifest(root)
    comps = mf["components"]
    want = set(comps) if components is None else {"generator", *components}
    missing = want - set(comps)
    if missing:
        raise BundleError(f"{root}: the bundle has no {', '.join(sorted(missing))}")
    b = Bundle(root=root, manifest=mf, G=load_generator(root / comps["generator"]["file"],
                                                         device))
    if "encoder" in want:
        b.E = load_encoder(root / comps["encoder"]["file"], device)[0]
    if "segmenter" in want:
        b.segmenter = load_segmenter(root / comps["segmenter"]["file"], device)
    if "classifier" in want:
        from cxredit.train.classifier import load_classifier

        b.classifier = load_classifier(root / comps["classifier"]["file"], device)
    for name, d in mf.get("directions", {}).items():
        b.directions[name] = _fitting_direction(root / d["file"], b.G)
    return b


def _fitting_direction(path: Path, G) -> tuple[np.ndarray, dict]:
    """`load_direction(path)`, checked to fit generator G (w_dim; num_ws of a W+ one)."""
    from cxredit.latent.directions import load_direction
    from cxredit.latent.edit import check_direction

    v, info = load_direction(path)
    check_direction(v, G.num_ws, G.w_dim, path, BundleError)
    return v, info



def assemble_bundle(gan: str | os.PathLike, encoder: str | os.PathLike | None = None,
                    segmenter: str | os.PathLike | None = None,
                    classifier: str | os.PathLike | None = None,
                    directions: dict[str, str | os.PathLike] | None = None,
                    device: torch.device | str = "cpu") -> Bundle:
    """A `Bundle` made in memory from training runs or checkpoints (nothing is written).

    The manifest's component "file" entries are the checkpoints' absolute paths.
    """
    from cxredit.runs import find_checkpoint
    from cxredit.train.encoder import load_encoder
    from cxredit.train.gan import load_generator
    from cxredit.train.segmenter import load_segmenter

    srcs = {"generator": gan, "encoder": encoder, "segmenter": segmenter,
            "classifier": classifier}
    comps = {}
    for name, src in srcs.items():
        if src is not None:
            ck = find_checkpoint(src).resolve()
            comps[name] = {"file": str(ck.with_suffix("")), "kind": COMPONENTS[name][1],
                           "sha256": checkpoint_sha256(ck), "source": str(ck)}
    G = load_generator(gan, device)
    dirs = {n: _fitting_direction(Path(p), G) for n, p in (directions or {}).items()}
    mf = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION,
          "resolution": int(G.img_resolution), "w_dim": int(G.w_dim), "components": comps,
          "directions": {n: {"file": str(p), "method": dirs[n][1].get("method")}
                         for n, p in (directions or {}).items()}}
    b = Bundle(root=Path("/"), manifest=mf, G=G, directions=dirs)
    if encoder is not None:
        b.E, e_info = load_encoder(encoder, device)
        if e_info["gan"].get("sha256") not in (None, comps["generator"]["sha256"]):
            raise BundleError(f"{encoder}: encoder was trained against another generator "
                              f"({e_info['gan'].get('path')})")
    if segmenter is not None:
        b.segmenter = load_segmenter(segmenter, device)
    if classifier is not None:
        from cxredit.train.classifier import load_classifier

        b.classifier = load_classifier(classifier, device)
    return b
