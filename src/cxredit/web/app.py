"""`cxredit serve`: the FastAPI app of the editing page and its JSON API.

    GET  /                      the page (static HTML/JS/CSS shipped in the package)
    GET  /api/health            models, directions, samples and limits of this server
    POST /api/encode            multipart `file` (PNG/JPEG/DICOM) or `sample` -> latent id
    POST /api/edit              {id, direction, alpha} -> edited image, difference map, CTR
    GET  /api/edit.png          the edited image as a PNG with provenance text chunks
    POST /api/project           {id, steps} -> projection job id (runs in the background)
    GET  /api/project/{job}     progress of a job; its result is a new latent id
    GET  /docs, /openapi.json   offline API documentation and the OpenAPI schema
    GET  /favicon.ico           the page's icon (a small PNG drawn at import)

Everything the page loads comes from this server (no CDN, no web font); a Content-Security-
Policy header says so to the browser as well. FastAPI's own /docs page would fetch Swagger UI
from a CDN, so /docs is a small page rendered here from the same OpenAPI schema.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from cxredit.web.engine import SAMPLES, ApiError, EditEngine, png_bytes, too_large

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
FORM_SLACK = 64 * 1024  # multipart headers and boundaries on top of the file itself
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'self'")


class ErrorBody(BaseModel):
    detail: str = Field(description="what was wrong, in one line")


def _errors(**codes: str) -> dict:
    """OpenAPI `responses` for error statuses given as e(404="unknown id")."""
    return {int(k[1:]): {"model": ErrorBody, "description": v} for k, v in codes.items()}


class EditRequest(BaseModel):
    id: str = Field(description="latent id from /api/encode or a finished /api/project job")
    direction: str = Field(description="direction name, one of /api/health's directions")
    # strict: JSON numbers only (lax mode would read `true` as 1.0 and "2" as 2.0)
    alpha: float = Field(strict=True,
                         description="edit strength; |alpha| <= the server's max_alpha")


class ProjectRequest(BaseModel):
    id: str = Field(description="latent id to start from")
    steps: int = Field(100, strict=True, description="projection steps, 1..max_project_steps")


class _LimitedBody:
    """ASGI middleware: 413 for request bodies over `max_bytes` (by Content-Length, or counted
    while streaming), and security headers on every response.

    `max_bytes` is the upload limit plus `FORM_SLACK`; the 413 message names the upload limit
    (`limit_bytes`) in MB, in the engine's words, whichever of the two refuses a file.
    """

    def __init__(self, app, max_bytes: int, limit_bytes: int) -> None:
        self.app, self.max_bytes, self.limit_bytes = app, max_bytes, limit_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = HTTPException(413, too_large(self.limit_bytes))
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse({"detail": too_big.detail}, 413)(scope, receive, send)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise too_big  # FastAPI passes HTTPExceptions raised here through
            return msg

        async def send_with_headers(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                headers = list(msg.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()),
                            (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer")]
                if scope["path"].startswith("/api/"):
                    headers.append((b"cache-control", b"no-store"))
                msg = {**msg, "headers": headers}
            await send(msg)

        try:
            await self.app(scope, counted_receive, send_with_headers)
        except HTTPException as e:
            if started or e.status_code != 413:
                raise
            await JSONResponse({"detail": e.detail}, 413)(scope, receive, send_with_headers)


_LOCATIONS = {"query": "query parameter ", "path": "path parameter ", "header": "header ",
              "cookie": "cookie "}


def validation_detail(errors: Sequence[dict]) -> str:
    """One line for FastAPI's request-validation errors (the API's `ErrorBody.detail`), e.g.
    "invalid request: alpha: Input should be a valid number (got 'abc')"."""
    parts = []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ())]
        where = loc.pop(0) if loc and loc[0] in ("body", *_LOCATIONS) else "body"
        msg = " ".join(str(err.get("msg", "invalid")).split())
        if err.get("type") == "json_invalid":
            why = (err.get("ctx") or {}).get("error")
            parts.append("the body is not valid JSON" + (f" ({why})" if why else ""))
            continue
        if not loc:
            parts.append(f"request {where}: {msg}")
            continue
        value = err.get("input")
        if err.get("type") != "missing" and (value is None or
                                             isinstance(value, (bool, int, float, str))):
            got = repr(value)
            msg += f" (got {got[:40] + '...' if len(got) > 40 else got})"
        parts.append(f"{_LOCATIONS.get(where, '')}{'.'.join(loc)}: {msg}")
    return "invalid request: " + ("; ".join(parts) or "malformed")


async def _read_form(request: Request, max_bytes: int) -> tuple[bytes | None, str | None, str]:
    """(file bytes, file name, sample) of a multipart request, kept in memory.

    Starlette's parser spools files over 1 MB to the system temp folder; here the spool is as
    large as the upload limit, so an upload never touches the disk outside the engine's
    own temporary folder.
    """
    parser = MultiPartParser(request.headers, request.stream(), max_files=1, max_fields=4,
                             max_part_size=4096)
    parser.spool_max_size = max_bytes + FORM_SLACK
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise ApiError(400, f"malformed multipart form: {e.message}") from None
    try:
        up, sample = form.get("file"), form.get("sample") or ""
        if isinstance(up, UploadFile):
            data = await up.read(max_bytes + 1)
            return data, up.filename, str(sample)
        return None, None, str(sample)
    finally:
        await form.close()


def create_app(weights, device: str | torch.device | None = "cpu", max_upload_mb: float = 20.0,
               max_alpha: float | None = None, max_project_steps: int = 500,
               cache_size: int = 64) -> FastAPI:
    """The editing app for a weights bundle.

    Args:
        weights: bundle folder (e.g. "weights/demo") or a loaded `Bundle`.
        device: where the models run (None: cuda when available).
        max_upload_mb: largest upload; bigger requests get 413.
        max_alpha: largest |alpha| of an edit, beyond it 422 (None: `EditEngine`'s default,
            enough for +-6 sigma of every direction).
        max_project_steps: largest number of projection steps per request.
        cache_size: latents kept in memory (least recently used forgotten first).
    """
    from cxredit.bundle import Bundle, load_bundle

    if (max_upload_mb <= 0 or (max_alpha is not None and max_alpha <= 0)
            or max_project_steps < 1 or cache_size < 1):
        raise ValueError("max_upload_mb and max_alpha must be > 0, max_project_steps and "
                         "cache_size >= 1")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    bundle = weights if isinstance(weights, Bundle) else load_bundle(weights, dev)
    max_bytes = int(max_upload_mb * 2**20)
    engine = EditEngine(bundle, max_alpha, max_project_steps, cache_size, max_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="cxredit editing API", version=engine.info()["version"],
                  description="Disease-aware editing of chest X-rays with StyleGAN2. Every "
                              "edited image is synthetic and not for diagnosis.",
                  docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(_LimitedBody, max_bytes=max_bytes + FORM_SLACK, limit_bytes=max_bytes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse({"detail": exc.detail}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError):
        # FastAPI's default body is a list of objects; the API documents ErrorBody (one line).
        return JSONResponse({"detail": validation_detail(exc.errors())}, 422)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        # browsers ask for it on every page; a 404 would be the console's only message
        return Response(FAVICON, media_type="image/png",
                        headers={"Cache-Control": "max-age=86400"})

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs():
        return HTMLResponse(render_docs(app.openapi()))

    @app.get("/api/health", summary="Server status, models, directions, samples and limits")
    def health() -> dict:
        return engine.info()

    @app.post("/api/encode", summary="Encode an uploaded X-ray or a built-in phantom sample",
              description="multipart/form-data with either `file` (PNG, JPEG or DICOM, at most "
                          "max_upload_mb) or `sample` (a name from /api/health). Answers with a "
                          "latent id, the input at the model's resolution, E's reconstruction "
                          "and both CTRs. Errors: 400 empty or malformed, 404 unknown sample, "
                          "413 too large, 415 not an image, 422 unreadable image.",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "file": {"type": "string", "format": "binary"},
                      "sample": {"type": "string", "enum": list(SAMPLES)}}}}}}},
              responses=_errors(e400="empty upload or malformed form",
                                e404="unknown sample", e413="upload over the size limit",
                                e415="not a PNG, JPEG or DICOM file",
                                e422="unreadable image, or neither file nor sample"))
    async def encode(request: Request) -> dict:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            data, name, sample = await _read_form(request, max_bytes)
        elif ctype.startswith("application/x-www-form-urlencoded"):  # a sample, no file
            data, name, sample = None, None, str((await request.form()).get("sample") or "")
        else:
            raise ApiError(415, "send multipart/form-data with a 'file' or a 'sample' field")
        if data is not None:
            return await run_in_threadpool(engine.encode_upload, data, name)
        if sample:
            return await run_in_threadpool(engine.encode_sample, sample)
        raise ApiError(422, "give a 'file' to upload or the name of a 'sample'")

    @app.post("/api/edit", summary="Edit a latent along a direction",
              description="G(w + alpha v) as a PNG data URL (with provenance text chunks), a "
                          "difference map against the reconstruction and the segmenter's CTR "
                          "(null where it cannot be measured). 404: unknown id or direction; "
                          "422: alpha out of range.",
              responses=_errors(e404="unknown latent id or direction",
                                e422="alpha out of range or malformed request"))
    def edit(req: EditRequest) -> dict:
        return engine.edit(req.id, req.direction, req.alpha)

    @app.get("/api/edit.png", summary="Download an edited image (PNG with provenance)",
             response_class=Response,
             responses={200: {"content": {"image/png": {}}},
                        **_errors(e404="unknown latent id or direction",
                                  e422="alpha out of range or malformed request")})
    def edit_png(id: str = Query(description="latent id"),
                 direction: str = Query(description="direction name"),
                 alpha: float = Query(description="edit strength")):
        png = engine.edit_png(id, direction, alpha)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"cxredit-edit-{direction}-a{alpha:g}.png")
        return Response(png, media_type="image/png",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.post("/api/project", status_code=202, summary="Refine a latent by projection",
              description="Starts `steps` optimisation steps from the latent (in the "
                          "background, one job at a time). Poll /api/project/{job}; when done, "
                          "its result holds a new latent id.",
              responses=_errors(e404="unknown latent id",
                                e422="steps out of range or malformed request"))
    def project(req: ProjectRequest) -> dict:
        return {"job": engine.start_projection(req.id, req.steps), "steps": req.steps}

    @app.get("/api/project/{job}", summary="Progress and result of a projection job",
             responses=_errors(e404="unknown job id", e422="malformed request"))
    def project_status(job: str) -> dict:
        return engine.job(job)

    return app


def _favicon() -> bytes:
    """A 32x32 PNG icon drawn here (no binary file to ship): two lungs and a heart on the
    page header's navy."""
    yy, xx = np.mgrid[0:32, 0:32] + 0.5
    img = np.empty((32, 32, 3), np.uint8)
    img[:] = (15, 27, 45)
    for cx in (10.5, 21.5):  # lungs
        img[((xx - cx) / 5.5) ** 2 + ((yy - 16) / 11) ** 2 <= 1] = (207, 224, 255)
    img[((xx - 17.5) / 6) ** 2 + ((yy - 21) / 5) ** 2 <= 1] = (180, 35, 24)  # heart
    return png_bytes(img)


FAVICON = _favicon()


def render_docs(schema: dict) -> str:
    """A self-contained HTML page listing the endpoints of an OpenAPI schema."""
    esc = html.escape
    comps = schema.get("components", {}).get("schemas", {})

    def fields(s: dict) -> str:
        s = comps.get(s.get("$ref", "").rsplit("/", 1)[-1], s)
        rows = "".join(f"<li><code>{esc(k)}</code> <span class=type>{esc(v.get('type', ''))}"
                       f"</span> {esc(v.get('description', ''))}</li>"
                       for k, v in s.get("properties", {}).items())
        return f"<ul>{rows}</ul>" if rows else ""

    ops = []
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            params = "".join(
                f"<li><code>{esc(p['name'])}</code> <span class=type>{esc(p['in'])}"
                f"{', required' if p.get('required') else ''}</span> "
                f"{esc(p.get('description', ''))}</li>" for p in op.get("parameters", []))
            body = ""
            for ctype, c in op.get("requestBody", {}).get("content", {}).items():
                body += f"<p>Body <code>{esc(ctype)}</code></p>{fields(c.get('schema', {}))}"
            codes = "; ".join(f"{esc(str(k))} {esc(r.get('description', ''))}"
                              for k, r in op.get("responses", {}).items())
            ops.append(
                f"<section class='card endpoint'><h2><span class='method {esc(method)}'>"
                f"{esc(method.upper())}</span> <code>{esc(path)}</code></h2>"
                f"<p><strong>{esc(op.get('summary', ''))}</strong></p>"
                f"<p>{esc(op.get('description', ''))}</p>"
                + (f"<p>Parameters</p><ul>{params}</ul>" if params else "") + body
                + f"<p class=muted>Responses: {codes}</p></section>")
    info = schema.get("info", {})
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>{esc(info.get('title', 'API'))}</title>"
            "<meta name=viewport content='width=device-width, initial-scale=1'>"
            "<link rel=icon type=image/png href='/favicon.ico'>"
            "<link rel=stylesheet href='/static/style.css'></head><body class=docs>"
            f"<header class=top><div class=brand><h1>{esc(info.get('title', 'API'))}</h1>"
            f"<span>version {esc(str(info.get('version', '')))}</span></div>"
            "<nav><a href='/'>Editor</a> <a href='/openapi.json'>openapi.json</a></nav></header>"
            f"<main class=doclist><p>{esc(info.get('description', ''))}</p>{''.join(ops)}"
            "</main></body></html>")


def serve(weights: str | Path = "weights/demo", host: str = "127.0.0.1", port: int = 7860,
          device: str | None = None, **limits) -> None:
    """Run the editing page with uvicorn until interrupted (see `create_app` for `limits`).

    Args:
        port: TCP port, 1..65535, or 0 for a free port chosen by the system (uvicorn's
            "running on" line names it).
    """
    import uvicorn

    check_port(port)
    app = create_app(weights, device=device, **limits)
    if host not in LOCAL_HOSTS:
        log.warning("serving on %s: anyone who can reach this machine can use the page", host)
    log.info("cxredit editing page on http://%s:%s/ (API docs at /docs)",
             f"[{host}]" if ":" in host else host, port or "<free port>")
    uvicorn.run(app, host=host, port=port, log_level="info")


def check_port(port: int) -> None:
    """ValueError unless `port` is a TCP port to bind: 1..65535, or 0 (a free one)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535 (or 0 for a free port), got {port}")
