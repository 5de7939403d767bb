"""The models behind `cxredit serve`: encode, edit, project and measure, safe across threads.

Nothing here imports FastAPI, so the logic is tested (and usable) without the web extra.

Thread safety. The web server runs requests on a thread pool. Every call of the shared models
(G, E, segmenter) holds one lock and runs under `torch.inference_mode`: torch modules are not
documented as thread-safe, and `predict_masks` flips the segmenter's train/eval mode. Projection
is the exception: it needs autograd and runs for seconds, so it runs on a background worker
with its *own copy* of G (one projection at a time) and never holds the lock for more than the
final CTR measurement; the edit slider stays responsive while a projection runs.

Uploads. Bytes are checked (size, then type by magic bytes, never by the user's file name),
written under a fixed, random name inside a temporary folder owned by the engine (removed by
`close()`), decoded with `cxredit.data.io.read_xray` and deleted at once.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import logging
import math
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo

log = logging.getLogger(__name__)

DIFF_RANGE = 0.25  # |edited - reconstruction| (in [0,1] grey units) shown at full colour
PROJECTION_SEED = 0  # projections are reproducible: same latent + steps -> same result
SIGMA_SPAN = 6  # the page's slider spans +-6 sigma of a direction (app.js's SIGMA_SPAN)
# Built-in phantom samples: name -> (subject seed, cardiomegaly). The seeds lie far from the
# training (1..) and demo test (900..) stores of `make_weights` / `demo`.
SAMPLES: dict[str, tuple[int, bool]] = {
    **{f"healthy-{i}": (50_000 + i, False) for i in range(1, 4)},
    **{f"cardiomegaly-{i}": (50_100 + i, True) for i in range(1, 4)},
}
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"))


class ApiError(Exception):
    """A request the engine refuses: an HTTP status and a one-line message for the user."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class _Cancelled(Exception):
    """Raised inside a projection's step callback when the engine shuts down."""


@dataclass
class Latent:
    """One latent the server knows (immutable once stored; a refinement is a new entry)."""

    w: torch.Tensor  # [1, w_dim] (W) or [1, num_ws, w_dim] (W+), on the engine's device
    target: torch.Tensor  # [1, 1, R, R] in [-1, 1]: the input image at the model's resolution
    recon: np.ndarray  # [R, R] in [0, 1]: G(w)
    ctr_input: float | None
    ctr_recon: float | None
    source: str  # "upload sha256:<12 hex>" or "phantom:<sample>"; never a user's file name
    steps: int = 0  # projection steps behind w (0 = encoder only)


@dataclass
class Job:
    """A projection running (or done) on the background worker."""

    latent_id: str
    steps: int
    status: str = "queued"  # queued, running, done, error
    step: int = 0
    loss: float | None = None
    result: dict | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)

    def public(self) -> dict:
        return {"status": self.status, "step": self.step, "steps": self.steps,
                "loss": self.loss, "result": self.result, "error": self.error}


class _LRU(OrderedDict):
    """A dict that forgets its least recently used entries beyond `cap` (not thread-safe)."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.cap:
            self.popitem(last=False)

    def use(self, key):
        value = self[key]
        self.move_to_end(key)
        return value


def png_bytes(arr: np.ndarray, provenance: dict[str, str] | None = None) -> bytes:
    """PNG file bytes of a grey [H,W] float image in [0,1] or an RGB uint8 [H,W,3] image,
    with `provenance` as text chunks (as `cxredit.data.io.write_png` writes them)."""
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(np.asarray(arr, np.float64) * 255), 0, 255).astype(np.uint8)
    info = PngInfo()
    for key, value in (provenance or {}).items():
        info.add_text(str(key), str(value))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def diff_map(edited: np.ndarray, base: np.ndarray, scale: float = DIFF_RANGE) -> np.ndarray:
    """Diverging colour map of edited - base ([R,R] in [0,1]) -> uint8 [R,R,3].

    White = unchanged, red = brighter in the edit (more attenuation), blue = darker; full
    colour at |difference| >= `scale`.
    """
    t = np.clip((edited - base) / scale, -1.0, 1.0)
    pos, neg = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    rgb = np.stack([1 - neg * 0.85, 1 - (pos + neg) * 0.8, 1 - pos * 0.85], axis=-1)
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def too_large(max_bytes: int) -> str:
    """The one message for an upload over the limit, whoever notices it (the engine, or the
    app's body-size guard before the form is parsed)."""
    return f"the upload is larger than the limit of {max_bytes / 2**20:g} MB"


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _positive(x) -> float | None:
    """A direction's sigma (std of training latents along it) if it is a usable unit."""
    v = _finite(x) if isinstance(x, (int, float)) else None
    return v if v is not None and v > 0 else None


class EditEngine:
    """Encode images, edit them along the bundle's directions, refine by projection.

    Args:
        bundle: a loaded `cxredit.bundle.Bundle` (G required; E, segmenter optional).
        max_alpha: largest |alpha| an edit may use; None: the larger of 10 and
            `SIGMA_SPAN` x the largest sigma of the directions, rounded up to 4 decimals (so
            that every direction can be swept over +-SIGMA_SPAN sigma; W+ directions have
            sigmas of several units).
        max_steps: largest number of projection steps one request may ask for.
        cache_size: latents kept in memory (least recently used forgotten first).
        max_upload_bytes: largest upload accepted.
        max_pixels: largest PNG/JPEG (width x height) decoded; a small file can declare a huge
            image ("decompression bomb"), so the header is checked before decoding.
    """

    def __init__(self, bundle, max_alpha: float | None = None, max_steps: int = 500,
                 cache_size: int = 64, max_upload_bytes: int = 20 * 2**20,
                 max_pixels: int = 64_000_000) -> None:
        from cxredit.train.encoder import mean_w

        self.bundle = bundle
        self.G, self.E, self.segmenter = bundle.G, bundle.E, bundle.segmenter
        self.resolution = bundle.resolution
        self.device = next(self.G.parameters()).device
        self.max_upload_bytes, self.max_pixels = int(max_upload_bytes), int(max_pixels)
        self.directions = {name: (torch.from_numpy(np.asarray(v, np.float32)).to(self.device),
                                  side) for name, (v, side) in bundle.directions.items()}
        if max_alpha is None:
            sigmas = [_positive(side.get("sigma")) for _, side in self.directions.values()]
            max_alpha = max([10.0] + [SIGMA_SPAN * s for s in sigmas if s is not None])
            # rounded up to 4 decimals, as the page writes alphas: s * sigma at the slider's
            # end, rounded so, must not land a hair beyond the limit (round() first absorbs
            # float noise such as 287999.99999999994)
            max_alpha = math.ceil(round(max_alpha * 1e4, 6)) / 1e4
        self.max_alpha, self.max_steps = float(max_alpha), int(max_steps)
        self._lock = threading.RLock()  # model calls
        self._state = threading.Lock()  # latents / jobs dicts
        self._latents = _LRU(cache_size)
        self._jobs = _LRU(4 * cache_size)
        self._tmp = tempfile.TemporaryDirectory(prefix="cxredit-serve-")
        self._stop = threading.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxredit-project")
        self._G_proj = None  # G's private copy for projection, made on first use
        with self._lock, torch.inference_mode():
            self._w_mean = mean_w(self.G).unsqueeze(0)  # start latent when there is no E

    # ---------------------------------------------------------------------------- info
    def info(self) -> dict:
        """What the page needs to build its controls."""
        from cxredit import __version__

        return {"status": "ok", "version": __version__, "resolution": self.resolution,
                "w_dim": int(self.G.w_dim), "num_ws": int(self.G.num_ws),
                "generator_sha256": self.bundle.generator_sha256,
                "encoder": self.E is not None, "segmenter": self.segmenter is not None,
                "directions": [{"name": n, "method": side.get("method"),
                                "sigma": _positive(side.get("sigma"))}
                               for n, (_, side) in self.directions.items()],
                "samples": [{"name": n, "cardiomegaly": c} for n, (_, c) in SAMPLES.items()],
                "max_alpha": self.max_alpha, "max_project_steps": self.max_steps,
                "max_upload_mb": round(self.max_upload_bytes / 2**20, 3)}

    # --------------------------------------------------------------------------- input
    def read_upload(self, data: bytes, filename: str | None = None) -> np.ndarray:
        """Uploaded file bytes -> float [H,W] in [0,1]; ApiError 400/413/415/422 otherwise.

        The type comes from the bytes (PNG/JPEG magic, DICOM's `DICM` at byte 128); only a
        DICOM without its preamble is recognised by a `.dcm`/`.dicom` name.
        """
        from cxredit.data.io import XrayReadError, read_xray

        if not data:
            raise ApiError(400, "the uploaded file is empty")
        if len(data) > self.max_upload_bytes:
            raise ApiError(413, too_large(self.max_upload_bytes))
        kind = next((k for magic, k in _MAGIC if data.startswith(magic)), None)
        if kind is None and (data[128:132] == b"DICM" or
                             (filename or "").lower().endswith((".dcm", ".dicom"))):
            kind = "dcm"
        if kind is None:
            raise ApiError(415, "unsupported file type: upload a PNG, JPEG or DICOM image")
        if kind != "dcm":
            self._check_pixels(data)
        path = Path(self._tmp.name) / f"upload-{secrets.token_hex(8)}.{kind}"
        try:
            path.write_bytes(data)
            return read_xray(path)
        except XrayReadError as e:
            name = {"png": "PNG", "jpg": "JPEG", "dcm": "DICOM"}[kind]
            raise ApiError(422, f"cannot read the uploaded {name} file: {e.reason}") from None
        finally:
            path.unlink(missing_ok=True)

    def _check_pixels(self, data: bytes) -> None:
        try:
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                w, h = img.size
        except Exception:
            return  # not decodable: read_xray says why
        if w * h > self.max_pixels:
            raise ApiError(413, f"the image is {w}x{h} pixels, more than the limit of "
                                f"{self.max_pixels} pixels")

    def sample_image(self, name: str) -> np.ndarray:
        """A built-in phantom rendered at the model's resolution, float [R,R] in [0,1]."""
        from cxredit.data.phantom import render, sample_case

        if name not in SAMPLES:
            raise ApiError(404, f"unknown sample {name!r}; known: {', '.join(SAMPLES)}")
        subject, h = sample_case(*SAMPLES[name])
        return render(subject, h, max(16, self.resolution)).image

    # ------------------------------------------------------------------------- models
    def _ctr(self, images: torch.Tensor) -> list[float | None]:
        """CTR of images [N,1,R,R] in [-1,1] by the segmenter (None where not measurable)."""
        if self.segmenter is None:
            return [None] * len(images)
        from cxredit.metrics.ctr import ctr
        from cxredit.train.segmenter import predict_masks

        r = self.segmenter.resolution
        if images.shape[-1] != r:
            images = F.interpolate(images, size=(r, r), mode="bilinear", align_corners=False)
        with self._lock, torch.inference_mode():
            masks = predict_masks(self.segmenter, images)
        return [_finite(c) for c in np.atleast_1d(ctr(masks)["ctr"])]

    def _synth(self, w: torch.Tensor) -> torch.Tensor:
        with self._lock, torch.inference_mode():
            return self.G.synthesis(w, noise_mode="const").clamp(-1, 1).float()

    @staticmethod
    def _unit(img: torch.Tensor) -> np.ndarray:
        """[1,1,R,R] in [-1,1] -> [R,R] float32 in [0,1] on the CPU."""
        return ((img[0, 0].detach().cpu().float().numpy() + 1) / 2).clip(0, 1)

    def _store(self, lat: Latent) -> str:
        key = secrets.token_hex(16)
        with self._state:
            self._latents.put(key, lat)
        return key

    def _get(self, latent_id: str) -> Latent:
        with self._state:
            try:
                return self._latents.use(latent_id)
            except KeyError:
                raise ApiError(404, "unknown latent id (expired or never created); encode "
                                    "the image again") from None

    def _describe(self, key: str, lat: Latent, input01: np.ndarray | None = None) -> dict:
        # The input echo is the user's own image (or a phantom), not G's output: no chunks.
        out = {"id": key, "source": lat.source, "steps": lat.steps,
               "resolution": self.resolution,
               "reconstruction": data_url(png_bytes(lat.recon,
                                                    self.recon_provenance(key, lat))),
               "ctr_input": lat.ctr_input, "ctr_reconstruction": lat.ctr_recon,
               "mse": float(np.mean((lat.recon - self._unit(lat.target)) ** 2))}
        if input01 is not None:
            out["input"] = data_url(png_bytes(input01))
        return out

    def encode(self, img: np.ndarray, source: str) -> dict:
        """Encode an image (float [H,W] in [0,1], any size) and remember its latent.

        Returns:
            {"id", "source", "steps", "resolution", "input" and "reconstruction" (PNG data
            URLs at the model's resolution; the reconstruction carries `recon_provenance`),
            "ctr_input", "ctr_reconstruction", "mse"}.
        """
        from cxredit.data.io import to_square

        img01 = to_square(np.asarray(img, np.float32), self.resolution).astype(np.float32) / 255
        x = torch.from_numpy(img01 * 2 - 1)[None, None].to(self.device)
        with self._lock, torch.inference_mode():
            w = self.E(x).float() if self.E is not None else self._w_mean.clone()
        recon = self._synth(w)
        c_in, c_rec = self._ctr(torch.cat([x, recon]))
        lat = Latent(w=w, target=x, recon=self._unit(recon), ctr_input=c_in, ctr_recon=c_rec,
                     source=source)
        return self._describe(self._store(lat), lat, img01)

    def encode_upload(self, data: bytes, filename: str | None = None) -> dict:
        digest = hashlib.sha256(data).hexdigest()[:12]
        return self.encode(self.read_upload(data, filename), f"upload sha256:{digest}")

    def encode_sample(self, name: str) -> dict:
        return self.encode(self.sample_image(name), f"phantom:{name}")

    def _edit(self, latent_id: str, direction: str, alpha: float) -> tuple[Latent, np.ndarray]:
        from cxredit.latent.edit import apply_direction

        if direction not in self.directions:
            raise ApiError(404, f"unknown direction {direction!r}; this bundle has "
                                f"{', '.join(self.directions) or 'none'}")
        if not math.isfinite(alpha) or abs(alpha) > self.max_alpha:
            # the bound in full (not :g's 6 digits, which may round it up past the value)
            raise ApiError(422, f"alpha must be a number in [-{self.max_alpha!r}, "
                                f"{self.max_alpha!r}], got {alpha!r}")
        lat = self._get(latent_id)
        v = self.directions[direction][0]
        w = apply_direction(lat.w, v, float(alpha), int(self.G.num_ws))
        return lat, self._synth(w)

    def edit(self, latent_id: str, direction: str, alpha: float) -> dict:
        """G(w + alpha v), its difference from G(w) and its CTR.

        Returns:
            {"id", "direction", "alpha", "image" (PNG data URL with provenance), "diff" (PNG
            data URL, see `diff_map`, with `diff_provenance`), "max_abs_diff", "ctr",
            "ctr_reconstruction"}.
        """
        lat, img = self._edit(latent_id, direction, alpha)
        edited = self._unit(img)
        meta = self.provenance(latent_id, lat, direction, alpha)
        return {"id": latent_id, "direction": direction, "alpha": float(alpha),
                "image": data_url(png_bytes(edited, meta)),
                "diff": data_url(png_bytes(diff_map(edited, lat.recon),
                                           self.diff_provenance(meta))),
                "max_abs_diff": float(np.abs(edited - lat.recon).max()),
                "ctr": self._ctr(img)[0], "ctr_reconstruction": lat.ctr_recon}

    def edit_png(self, latent_id: str, direction: str, alpha: float) -> bytes:
        """The edited image as PNG bytes carrying cxredit's provenance text chunks."""
        lat, img = self._edit(latent_id, direction, alpha)
        return png_bytes(self._unit(img), self.provenance(latent_id, lat, direction, alpha))

    def provenance(self, latent_id: str, lat: Latent, direction: str, alpha: float) -> dict:
        from cxredit.latent.edit import edit_provenance

        meta = edit_provenance(f"{lat.source} latent:{latent_id}", direction, float(alpha),
                               self.bundle.generator_sha256, self.directions[direction][1])
        meta["cxredit:projection-steps"] = str(lat.steps)
        return meta

    def recon_provenance(self, latent_id: str, lat: Latent) -> dict:
        """PNG text chunks of a reconstruction G(w): the keys and wording of `cxredit invert
        --recon-dir` / `project --recon-dir` (`cxredit.generate.provenance`), plus the source
        and projection steps that an edit's chunks carry (a reconstruction is alpha = 0)."""
        from cxredit.generate import provenance

        what = ("projection reconstruction" if lat.steps else
                "encoder reconstruction" if self.E is not None else
                "image of the mean latent; no encoder in the bundle")
        meta = provenance(self.bundle.generator_sha256, what)
        meta["cxredit:source-id"] = f"{lat.source} latent:{latent_id}"
        meta["cxredit:projection-steps"] = str(lat.steps)
        return meta

    @staticmethod
    def diff_provenance(edit_meta: dict) -> dict:
        """PNG text chunks of an edit's difference map: the edit's own chunks (it is computed
        from a synthetic edit) with what the colours mean."""
        return {**edit_meta, "cxredit:derived": "difference map: edited - reconstruction",
                "cxredit:diff-scale": f"{DIFF_RANGE:g}",
                "Description": "DIFFERENCE MAP of a SYNTHETIC EDIT made by cxredit (edited "
                               "minus reconstruction; red brighter, blue darker, full colour "
                               f"at {DIFF_RANGE:g}); not a radiograph, not for diagnosis"}

    # --------------------------------------------------------------------- projection
    def start_projection(self, latent_id: str, steps: int) -> str:
        """Queue `steps` projection steps from a latent; returns a job id to poll."""
        if not 1 <= int(steps) <= self.max_steps:
            raise ApiError(422, f"steps must be in [1, {self.max_steps}], got {steps}")
        self._get(latent_id)  # 404 now rather than in the job
        job_id = secrets.token_hex(16)
        job = Job(latent_id=latent_id, steps=int(steps))
        with self._state:
            self._jobs.put(job_id, job)
        self._worker.submit(self._run_projection, job)
        return job_id

    def job(self, job_id: str) -> dict:
        with self._state:
            job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, "unknown projection job id")
        return job.public()

    def _run_projection(self, job: Job) -> None:
        from cxredit.latent.project import project_images

        def step(i: int, loss: float) -> None:
            if self._stop.is_set():
                raise _Cancelled
            job.step, job.loss = i + 1, loss

        try:
            job.status = "running"
            lat = self._get(job.latent_id)
            if self._G_proj is None:
                with self._lock:
                    self._G_proj = copy.deepcopy(self.G).requires_grad_(False)
            space = "w+" if lat.w.ndim == 3 else "w"
            with torch.enable_grad():
                res = project_images(self._G_proj, lat.target, space=space, init=lat.w,
                                     steps=job.steps, seeds=[PROJECTION_SEED], callback=step)
            recon = res["images"].float()
            new = Latent(w=res["w"].float(), target=lat.target, recon=self._unit(recon),
                         ctr_input=lat.ctr_input, ctr_recon=self._ctr(recon)[0],
                         source=lat.source, steps=lat.steps + job.steps)
            job.result = self._describe(self._store(new), new)
            job.status = "done"
        except _Cancelled:
            job.status, job.error = "error", "the server is shutting down"
        except ApiError as e:
            job.status, job.error = "error", e.detail
        except Exception as e:  # a bug: keep the server up, log it, tell the page
            log.exception("projection failed")
            job.status, job.error = "error", f"projection failed ({type(e).__name__}: {e})"

    # ------------------------------------------------------------------------ cleanup
    def close(self) -> None:
        """Stop the projection worker and remove the temporary folder."""
        self._stop.set()
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._tmp.cleanup()
