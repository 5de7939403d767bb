"""`cxredit serve`: the JSON API (ASGI test client) and the page in a real browser (Playwright
driving Debian's chromium)."""

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cxredit.bundle import load_bundle
from cxredit.cli import build_parser, main
from cxredit.data.io import write_dicom, write_png
from cxredit.data.phantom import render, sample_case
from cxredit.web.app import STATIC, create_app
from cxredit.web.engine import ApiError, EditEngine, too_large

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "demo"
CHROMIUM = "/usr/bin/chromium"
LIMIT_MB = 0.25


def _phantom(resolution: int = 96, seed: int = 123) -> np.ndarray:
    subject, h = sample_case(seed, False)
    return render(subject, h, resolution).image


def _file_bytes(kind: str, tmp_path: Path) -> bytes:
    img = _phantom()
    if kind == "dcm":
        return write_dicom(tmp_path / "x.dcm", img).read_bytes()
    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8)).save(
        buf, format={"png": "PNG", "jpg": "JPEG"}[kind])
    return buf.getvalue()


def _decode(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def _png_text(url: str) -> dict:
    """The PNG text chunks of a data URL."""
    assert url.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    img.load()
    return img.text


def _assert_reconstruction_marked(body: dict, gen_sha: str, what: str) -> None:
    text = _png_text(body["reconstruction"])
    assert text["cxredit:synthetic"] == "true" and text["cxredit:generator-sha256"] == gen_sha
    assert f"SYNTHETIC image ({what})" in text["Description"]
    assert body["id"] in text["cxredit:source-id"] and body["source"] in text["cxredit:source-id"]
    assert text["cxredit:projection-steps"] == str(body["steps"])
    assert "cxredit:direction" not in text  # a reconstruction is no edit (alpha 0)


@pytest.fixture(scope="module")
def client(tiny_bundle):
    app = create_app(tiny_bundle, max_upload_mb=LIMIT_MB, max_project_steps=50)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def latent(client) -> dict:
    r = client.post("/api/encode", files={"sample": (None, "healthy-1")})
    assert r.status_code == 200, r.text
    return r.json()


def test_health_lists_models_directions_and_limits(client, tiny_bundle):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["resolution"] == 16
    assert {d["name"] for d in h["directions"]} >= {"pair", "lda"}
    # each direction's sigma (the page's slider unit) is the bundle's record of it
    recorded = load_bundle(tiny_bundle, components=()).directions
    for d in h["directions"]:
        assert d["sigma"] == pytest.approx(recorded[d["name"]][1]["sigma"]) and d["sigma"] > 0
    widest = max(d["sigma"] for d in h["directions"])
    assert h["max_alpha"] == pytest.approx(max(10, 6 * widest), abs=1e-4)
    assert h["max_alpha"] >= 6 * widest and h["max_upload_mb"] == LIMIT_MB
    assert h["encoder"] and h["segmenter"] and len(h["samples"]) == 6


def test_default_max_alpha_covers_six_sigma_of_every_direction(tiny_bundle):
    b = load_bundle(tiny_bundle, components=())
    b.directions["pair"][1]["sigma"] = 4.8  # e.g. a W+ direction
    for kw, want in (({}, 6 * 4.8), ({"max_alpha": 4}, 4)):
        engine = EditEngine(b, **kw)
        try:
            assert engine.max_alpha == pytest.approx(want)
        finally:
            engine.close()


def test_alpha_at_the_slider_end_is_accepted_and_the_bound_is_stated_exactly(tiny_bundle):
    # 6 sigma = 29.714858292700647: the page sends s * sigma rounded to 4 decimals, 29.7149;
    # the limit is 6 sigma rounded *up* to 4 decimals, so that value is inside it, and a
    # refusal states the bound the check used (once: "[-29.7149, 29.7149], got 29.71487")
    b = load_bundle(tiny_bundle)
    sigma = 29.714858292700647 / 6
    b.directions["pair"][1]["sigma"] = sigma
    engine = EditEngine(b)
    try:
        assert engine.max_alpha == 29.7149
        lat = engine.encode_sample("healthy-1")["id"]
        for alpha in (round(6 * sigma, 4), -round(6 * sigma, 4), 6 * sigma, engine.max_alpha):
            assert engine.edit(lat, "pair", alpha)["alpha"] == alpha
        with pytest.raises(ApiError) as e:
            engine.edit(lat, "pair", 29.71495)
        assert e.value.status == 422
        assert e.value.detail == "alpha must be a number in [-29.7149, 29.7149], got 29.71495"
    finally:
        engine.close()


def test_sample_encodes_and_alpha_zero_is_the_reconstruction(client, latent):
    assert latent["source"] == "phantom:healthy-1" and len(latent["id"]) == 32
    assert _decode(latent["input"]).shape == (16, 16)
    rec = _decode(latent["reconstruction"])
    e0 = client.post("/api/edit", json={"id": latent["id"], "direction": "pair", "alpha": 0})
    assert e0.status_code == 200
    assert np.array_equal(_decode(e0.json()["image"]), rec)
    assert e0.json()["max_abs_diff"] == 0
    e5 = client.post("/api/edit", json={"id": latent["id"], "direction": "pair", "alpha": 5}).json()
    assert e5["max_abs_diff"] > 0 and _decode(e5["diff"]).shape == (16, 16, 3)
    assert _png_text(e5["diff"])["cxredit:synthetic"] == "true"
    for key in ("ctr", "ctr_reconstruction"):
        assert e5[key] is None or 0 < e5[key] < 5


@pytest.mark.parametrize("kind", ["png", "jpg", "dcm"])
def test_upload_png_jpeg_dicom(client, tmp_path, kind):
    # A hostile file name is never used as a path; the type comes from the bytes.
    data = _file_bytes(kind, tmp_path)
    r = client.post("/api/encode", files={"file": ("../../etc/passwd", data)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"].startswith("upload sha256:") and "passwd" not in body["source"]
    assert _decode(body["input"]).shape == (16, 16)


def test_dicom_without_preamble_is_recognised_by_its_name(client, tmp_path):
    data = _file_bytes("dcm", tmp_path)[128 + 4:]  # no preamble, no DICM magic
    r = client.post("/api/encode", files={"file": ("image.dcm", data)})
    assert r.status_code in (200, 422), r.text  # parsed, or refused with a clear message
    if r.status_code == 422:
        assert "DICOM" in r.json()["detail"]


@pytest.mark.parametrize("name, data, status, words", [
    ("empty.png", b"", 400, "empty"),
    ("notes.txt", b"hello, not an image" * 10, 415, "PNG, JPEG or DICOM"),
    ("fake.png", b"GIF89a" + bytes(200), 415, "unsupported file type"),
    ("broken.png", b"\x89PNG\r\n\x1a\n" + bytes(300), 422, "cannot read the uploaded PNG"),
    ("broken.dcm", bytes(128) + b"DICM" + b"\x02\x00garbage" * 20, 422,
     "cannot read the uploaded DICOM"),
    ("huge.png", b"\x89PNG\r\n\x1a\n" + bytes(int(LIMIT_MB * 2**20) + 10), 413, "limit"),
])
def test_bad_uploads_get_4xx_with_a_message(client, name, data, status, words):
    r = client.post("/api/encode", files={"file": (name, data)})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


@pytest.mark.parametrize("chunked", [False, True])
def test_request_far_over_the_limit_is_refused_before_parsing(client, chunked):
    # by Content-Length, or counted while streaming: either way the message names the limit
    # in MB, as the engine's own check does for a file just over it
    body = bytes(2**20)
    content = iter([body[:2**19], body[2**19:]]) if chunked else body
    r = client.post("/api/encode", content=content,
                    headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413
    assert r.json()["detail"] == too_large(int(LIMIT_MB * 2**20)) == \
        "the upload is larger than the limit of 0.25 MB"


def test_favicon_is_served(client):
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)


@pytest.mark.parametrize("kwargs, status", [
    ({"files": {"other": (None, "x")}}, 422),  # neither file nor sample
    ({"files": {"sample": (None, "no-such-sample")}}, 404),
    ({"json": {"sample": "healthy-1"}}, 415),
    ({"data": {"sample": "healthy-2"}}, 200),  # url-encoded form works for samples
])
def test_encode_request_forms(client, kwargs, status):
    assert client.post("/api/encode", **kwargs).status_code == status


@pytest.mark.parametrize("body, status", [
    ({"direction": "pair", "alpha": 10.5}, 422),
    ({"direction": "pair", "alpha": -10}, 200),
    ({"direction": "pair", "alpha": -11}, 422),
    ({"direction": "pair", "alpha": 10}, 200),
    ({"direction": "pair"}, 422),
    ({"direction": "pair", "alpha": "a lot"}, 422),
    ({"direction": "pair", "alpha": True}, 422),  # not read as 1.0
    ({"direction": "pair", "alpha": None}, 422),
    ({"direction": "no-such-direction", "alpha": 1}, 404),
    ({"direction": "pair", "alpha": 1, "id": "0" * 32}, 404),
])
def test_edit_validation(client, latent, body, status):
    r = client.post("/api/edit", json={"id": latent["id"], **body})
    assert r.status_code == status, r.text
    if status != 200:  # every error has the documented ErrorBody: one line of text
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail and "\n" not in detail


@pytest.mark.parametrize("path, kwargs, words", [
    ("/api/edit", {"json": {"direction": "pair", "alpha": "abc"}},
     ["alpha: Input should be a valid number", "'abc'"]),
    ("/api/edit", {"json": {"direction": "pair"}}, ["alpha: Field required"]),
    ("/api/edit", {"json": {"direction": "pair", "alpha": True}},
     ["alpha: Input should be a valid number", "True"]),
    ("/api/edit", {"json": {}}, ["id: Field required", "direction: Field required",
                                 "alpha: Field required"]),
    ("/api/edit", {"json": [1, 2]}, ["request body: Input should be a valid dictionary"]),
    ("/api/edit", {"content": b'{"id": ', "headers": {"content-type": "application/json"}},
     ["the body is not valid JSON"]),
    ("/api/project", {"json": {"id": "x", "steps": True}},
     ["steps: Input should be a valid integer"]),
    ("/api/project", {"json": {"id": "x", "steps": 2.5}},
     ["steps: Input should be a valid integer", "2.5"]),
])
def test_malformed_requests_get_one_line_422(client, path, kwargs, words):
    r = client.post(path, **kwargs)
    assert r.status_code == 422, r.text
    assert set(r.json()) == {"detail"}
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    assert detail.startswith("invalid request: ")
    for w in words:
        assert w in detail, detail


def test_malformed_query_gets_one_line_422(client, latent):
    r = client.get("/api/edit.png", params={"id": latent["id"], "alpha": "x" * 200})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "query parameter direction: Field required" in detail
    assert "query parameter alpha: Input should be a valid number" in detail
    assert len(detail) < 300  # a long bad value is cut short


def test_reconstruction_and_difference_map_carry_provenance(client, latent, tiny_bundle):
    # Every image the API makes from G says it is synthetic, not only the edited one.
    sha = load_bundle(tiny_bundle, components=()).generator_sha256
    _assert_reconstruction_marked(latent, sha, "encoder reconstruction")
    # the input echo is the user's (here a phantom's) image, not G's output: not marked
    assert "cxredit:synthetic" not in _png_text(latent["input"])
    e = client.post("/api/edit", json={"id": latent["id"], "direction": "lda",
                                       "alpha": -3}).json()
    image, diff = _png_text(e["image"]), _png_text(e["diff"])
    assert diff["cxredit:synthetic"] == "true" and diff["cxredit:edit"] == "true"
    assert "DIFFERENCE MAP of a SYNTHETIC EDIT" in diff["Description"]
    assert "not for diagnosis" in diff["Description"]
    assert diff["cxredit:derived"].startswith("difference map")
    for key in ("cxredit:source-id", "cxredit:direction", "cxredit:alpha",
                "cxredit:generator-sha256", "cxredit:projection-steps"):
        assert diff[key] == image[key], key
    assert diff["cxredit:direction"] == "lda" and diff["cxredit:alpha"] == "-3"


def test_download_carries_provenance(client, latent, tiny_bundle):
    r = client.get("/api/edit.png", params={"id": latent["id"], "direction": "pair",
                                            "alpha": 2.5})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["content-disposition"] == \
        'attachment; filename="cxredit-edit-pair-a2.5.png"'
    img = Image.open(io.BytesIO(r.content))
    img.load()
    assert img.size == (16, 16)
    text = img.text
    assert text["cxredit:synthetic"] == "true" and text["cxredit:alpha"] == "2.5"
    assert text["cxredit:direction"] == "pair" and text["cxredit:direction-method"] == "pair"
    assert text["cxredit:generator-sha256"] == load_bundle(tiny_bundle).generator_sha256
    assert latent["id"] in text["cxredit:source-id"] and "not for diagnosis" in \
        text["Description"]
    bad = client.get("/api/edit.png", params={"id": "nope", "direction": "pair", "alpha": 1})
    assert bad.status_code == 404


def test_projection_job_gives_a_new_latent(client, latent, tiny_bundle):
    r = client.post("/api/project", json={"id": latent["id"], "steps": 5})
    assert r.status_code == 202
    job = r.json()["job"]
    deadline = time.time() + 60
    while (s := client.get(f"/api/project/{job}").json())["status"] not in ("done", "error"):
        assert time.time() < deadline
        time.sleep(0.05)
    assert s["status"] == "done" and s["step"] == s["steps"] == 5, s
    new = s["result"]
    assert new["id"] != latent["id"] and new["steps"] == 5
    _assert_reconstruction_marked(new, load_bundle(tiny_bundle, components=()).generator_sha256,
                                  "projection reconstruction")
    assert client.post("/api/edit", json={"id": new["id"], "direction": "lda",
                                          "alpha": 1}).status_code == 200
    assert client.get("/api/project/unknown").status_code == 404
    for body, status in [({"id": latent["id"], "steps": 0}, 422),
                         ({"id": latent["id"], "steps": 51}, 422),
                         ({"id": "unknown", "steps": 5}, 404)]:
        assert client.post("/api/project", json=body).status_code == status


def test_docs_and_openapi_work_offline(client):
    schema = client.get("/openapi.json").json()
    assert {"/api/encode", "/api/edit", "/api/project", "/api/health"} <= set(schema["paths"])
    # every documented error body is ErrorBody (one line), FastAPI's list-of-objects is gone
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for item in schema["paths"].values():
        for op in item.values():
            for code, resp in op["responses"].items():
                if code.startswith("4"):
                    assert resp["content"]["application/json"]["schema"]["$ref"].endswith(
                        "/ErrorBody"), (code, op["summary"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    for path in ("/api/encode", "/api/edit", "/api/project", "/api/health", "/openapi.json"):
        assert path in docs.text
    page = client.get("/")
    assert page.status_code == 200 and "SYNTHETIC EDIT" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    # Nothing the page or the docs load may come from another host.
    for text in [docs.text, *(f.read_text() for f in STATIC.iterdir())]:
        assert "http://" not in text and "https://" not in text and "@import" not in text


def test_lru_forgets_old_latents_and_temp_folder_is_cleaned(tiny_bundle, tmp_path):
    engine = EditEngine(load_bundle(tiny_bundle), cache_size=2)
    tmp = Path(engine._tmp.name)
    try:
        first = engine.encode_upload(_file_bytes("png", tmp_path))["id"]
        assert tmp.is_dir() and not any(tmp.iterdir())  # the upload was deleted at once
        engine.encode_sample("healthy-2")
        engine.encode_sample("healthy-3")
        with pytest.raises(ApiError) as e:
            engine.edit(first, "pair", 1.0)
        assert e.value.status == 404
    finally:
        engine.close()
    assert not tmp.exists()


def test_image_with_too_many_pixels_is_refused_before_decoding(tiny_bundle):
    engine = EditEngine(load_bundle(tiny_bundle), max_pixels=1000)
    try:
        buf = io.BytesIO()
        Image.new("L", (40, 40)).save(buf, format="PNG")
        with pytest.raises(ApiError) as e:
            engine.encode_upload(buf.getvalue())
        assert e.value.status == 413 and "40x40 pixels" in e.value.detail
    finally:
        engine.close()


def test_concurrent_edits_equal_serial_ones(tiny_bundle):
    engine = EditEngine(load_bundle(tiny_bundle))
    try:
        ids = [engine.encode_sample(n)["id"] for n in ("healthy-1", "cardiomegaly-1")]
        jobs = [(i, d, a) for i in ids for d in ("pair", "lda") for a in (-3.0, 0.0, 2.0, 6.0)]
        serial = [engine.edit(*j)["image"] for j in jobs]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda j: engine.edit(*j)["image"], jobs))
        assert parallel == serial
    finally:
        engine.close()


def test_cli_serve_defaults_and_call(monkeypatch, tiny_bundle):
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.max_upload_mb, args.max_alpha, args.weights) == \
        ("127.0.0.1", 7860, 20.0, None, "weights/demo")
    seen = {}
    monkeypatch.setattr("cxredit.web.app.serve", lambda *a, **k: seen.update(a=a, k=k))
    assert main(["serve", "--weights", str(tiny_bundle), "--port", "9999",
                 "--max-alpha", "4"]) == 0
    assert seen["a"][:3] == (str(tiny_bundle), "127.0.0.1", 9999)
    assert seen["k"]["max_alpha"] == 4


@pytest.mark.parametrize("port", ["70000", "-1", "65536"])
def test_cli_serve_refuses_a_bad_port_in_one_line(monkeypatch, tiny_bundle, capsys, port):
    monkeypatch.setattr("cxredit.web.app.create_app",
                        lambda *a, **k: pytest.fail("the bundle was loaded"))
    assert main(["serve", "--weights", str(tiny_bundle), "--port", port]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"cxredit serve: error: --port must be in 1..65535 (or 0 for a " \
                          f"free port), got {port}"
    assert "Traceback" not in err


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_cli_serve_accepts_ports_at_the_ends_of_the_range(monkeypatch, tiny_bundle, port):
    seen = {}
    monkeypatch.setattr("cxredit.web.app.serve", lambda *a, **k: seen.update(a=a))
    assert main(["serve", "--weights", str(tiny_bundle), "--port", str(port)]) == 0
    assert seen["a"][2] == port


def test_cli_serve_without_web_extra(monkeypatch, capsys):
    monkeypatch.setattr("cxredit.web.web_available", lambda: False)
    assert main(["serve"]) == 2
    assert "cxredit serve needs the web extra: pip install 'cxredit[web]'" in \
        capsys.readouterr().err


def test_missing_bundle_is_a_one_line_error(tmp_path, capsys):
    assert main(["serve", "--weights", str(tmp_path / "nothing")]) == 2
    assert "not a cxredit weights bundle" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the browser
def _start_server(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes the socket
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def _held(page, pred):
    """Route requests whose URL matches `pred` into a list, unanswered until the test answers
    them (route.continue_() or .fulfill()): a slow server on demand."""
    held = []
    page.route(pred, lambda route: held.append(route))
    return held


def _wait_held(page, held, n=1):
    deadline = time.time() + 20
    while len(held) < n:
        assert time.time() < deadline, "the page sent no request"
        page.wait_for_timeout(20)


def _check_steps_box(page):
    """Steps are read with Number(): "1e2" is 100, "2.5" and "" are refused with a message and
    sent nowhere; a failed refinement hides the progress bar."""
    posts = []

    def fail(route):
        posts.append(json.loads(route.request.post_data))
        route.fulfill(status=503, content_type="application/json",
                      body='{"detail": "busy (test)"}')

    page.route(lambda url: url.endswith("/api/project"), fail)
    for text in ("2.5", "", "0", "100000"):
        page.fill("#steps", text)
        page.click("#refine")
        page.wait_for_selector("#refine-status.error:has-text('Enter a whole number of steps "
                               "from 1 to')")
        assert not posts
    page.fill("#steps", "1e2")
    page.click("#refine")
    page.wait_for_selector("#status:has-text('busy (test) (HTTP 503)')")
    assert posts == [{"id": posts[0]["id"], "steps": 100}]
    assert page.is_hidden("#progress") and page.is_enabled("#refine")
    page.unroute_all()


def _check_refine_race(page):
    """A refinement's result arriving after another image was loaded is dropped, and while
    that image encodes, nothing else can be loaded."""
    polls = _held(page, lambda url: "/api/project/" in url)
    encodes = _held(page, lambda url: url.endswith("/api/encode"))
    page.fill("#steps", "5")
    page.click("#refine")
    _wait_held(page, polls)
    page.select_option("#sample", "healthy-2")
    page.click("#load-sample")
    _wait_held(page, encodes)
    assert page.is_disabled("#load-sample") and page.is_disabled("#file")
    encodes[0].continue_()
    page.wait_for_selector("#source:has-text('phantom:healthy-2')")
    page.wait_for_selector("#load-sample:enabled")
    assert page.is_enabled("#file")
    # the old job "finishes" with another latent: the page must not show it
    stale = {"id": "0" * 32, "source": "phantom:STALE", "steps": 5, "resolution": 16,
             "reconstruction": "data:,", "ctr_input": None, "ctr_reconstruction": None,
             "mse": 0.0}
    polls[0].fulfill(status=200, content_type="application/json",
                     body=json.dumps({"status": "done", "step": 5, "steps": 5, "loss": 0.1,
                                      "result": stale, "error": None}))
    page.wait_for_timeout(700)  # more than two poll intervals
    assert len(polls) == 1, "the page kept polling the old job"
    assert "healthy-2" in page.text_content("#source")
    assert page.text_content("#recon-note") == "encoder"
    assert page.is_hidden("#progress") and page.text_content("#refine-status") == ""
    page.unroute_all()


def _check_narrow_layout(page):
    """At phone width the synthetic banner sits below the edited image, not over it, and the
    difference key's swatches keep their size; the upload box shows keyboard focus."""
    page.set_viewport_size({"width": 375, "height": 800})
    frame = page.locator(".panel.edited .frame").bounding_box()
    banner = page.locator(".synthetic").bounding_box()
    assert banner["y"] >= frame["y"] + frame["height"] - 0.5 and banner["height"] > 0
    for box in (page.locator(".swatch").nth(i).bounding_box() for i in range(3)):
        assert box["width"] == pytest.approx(14, abs=0.5), box
    panel = page.locator(".legend").locator("xpath=..").bounding_box()
    for i in range(3):  # every key (swatch and word) inside its panel: they wrap, not overflow
        key = page.locator(".legend .key").nth(i).bounding_box()
        assert key["x"] + key["width"] <= panel["x"] + panel["width"], (i, key, panel)
    page.focus("#file")
    assert page.eval_on_selector("#drop", "e => getComputedStyle(e).outlineStyle") == "solid"


def test_browser_upload_slide_and_download(tiny_bundle, tmp_path):
    """Upload a phantom, move the slider: the edited image and the CTR readout change.

    With the shipped bundle (weights/demo) the CTR must rise for a positive alpha of "pair",
    and the screenshot becomes docs/web.png; with the tiny test bundle it must only change.
    """
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: the browser test drives Debian's chromium; "
                    "install it with `apt-get install chromium` (.ci/run does)")
    from playwright.sync_api import sync_playwright

    real = (DEMO / "bundle.json").exists()
    png = write_png(tmp_path / "phantom.png", _phantom(128))
    server, thread, base = _start_server(create_app(DEMO if real else tiny_bundle))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, headless=True,
                args=["--no-sandbox", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run",
                      "--disable-default-apps", "--disable-dev-shm-usage", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                errors, foreign, encodes = [], [], []
                page.on("pageerror", lambda e: errors.append(str(e)))
                # a console error is e.g. a 404 (the favicon was one); the 503 is faked below
                page.on("console", lambda m: errors.append(m.text) if m.type == "error"
                        and "status of 503" not in m.text else None)
                page.on("request", lambda r: encodes.append(r) if r.url.endswith(
                    "/api/encode") else None)
                page.on("request", lambda r: None if r.url.startswith((base, "data:"))
                        else foreign.append(r.url))
                page.goto(base + "/")
                # (no wait_for_function: the page's CSP forbids evaluating strings)
                page.wait_for_selector("#direction option", state="attached")
                page.select_option("#direction", "pair")
                page.set_input_files("#file", str(png))
                page.wait_for_selector("#img-edit[data-alpha='0']", timeout=20_000)
                # the same file chosen again uploads again (the input is cleared after each)
                page.wait_for_selector("#load-sample:enabled")
                page.set_input_files("#file", str(png))
                page.wait_for_selector("#load-sample:enabled")
                assert len(encodes) == 2 and page.input_value("#file") == ""
                src0 = page.get_attribute("#img-edit", "src")
                ctr0 = page.text_content("#ctr-edit")

                def slide(alpha: float) -> tuple[str, str]:
                    page.fill("#alpha", f"{alpha:g}")
                    page.wait_for_selector(f"#img-edit[data-alpha='{alpha:g}']", timeout=20_000)
                    return page.get_attribute("#img-edit", "src"), page.text_content("#ctr-edit")

                # the slider counts in sigma of "pair": its range is the smaller of 6 sigma
                # and the server's raw limit, and the request carries alpha = s * sigma
                health = httpx.get(base + "/api/health").json()
                sigma = next(d["sigma"] for d in health["directions"] if d["name"] == "pair")
                span = float(page.get_attribute("#alpha", "max"))
                assert span == pytest.approx(min(6.0, health["max_alpha"] / sigma), abs=0.1)
                src, ctr = slide(min(4.0, span))
                assert src != src0, "the edited image did not change with alpha"
                raw = float(page.get_attribute("#img-edit", "data-alpha-raw"))
                assert raw == pytest.approx(min(4.0, span) * sigma, abs=1e-3)
                assert "σ" in page.text_content("#alpha-value")
                if real:
                    assert float(ctr) > float(ctr0), f"CTR did not rise: {ctr0} -> {ctr}"
                else:
                    for alpha in (span, -span, round(-span / 2, 1), round(0.8 * span, 1)):
                        if ctr != ctr0:
                            break
                        src, ctr = slide(alpha)
                    assert ctr != ctr0, f"the CTR readout never changed ({ctr0})"
                assert page.get_attribute("#download", "href").startswith("/api/edit.png?")
                page.fill("#steps", "5")
                page.click("#refine")
                page.wait_for_selector("#refine-status:has-text('Refined by 5 steps')",
                                       timeout=30_000)
                page.wait_for_selector("#img-edit[data-alpha]")
                assert "5 projection steps" in page.text_content("#recon-note")
                assert "SYNTHETIC EDIT" in page.text_content(".panel.edited")
                shot = ROOT / "docs" / "web.png" if real else tmp_path / "web.png"
                page.screenshot(path=str(shot), full_page=True)
                _check_steps_box(page)
                _check_refine_race(page)
                _check_narrow_layout(page)
                assert not errors and not foreign, (errors, foreign)
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
