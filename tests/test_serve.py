"""``rsscene serve``: the API in-process, bad input as 4xx, a real process, a browser, load."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from rsscene import checkpoint
from rsscene.checkpoint import Checkpoint, Preprocess
from rsscene.cli import LOOPBACK, main, served_host_names
from rsscene.data.synthetic import CLASSES, generate_mosaic, image_rng, render_scene
from rsscene.models import create_model

fastapi = pytest.importorskip("fastapi", reason="serving needs the serve extra (rsscene[serve])")
from fastapi.testclient import TestClient  # noqa: E402 - after the skip

from rsscene.serve.app import ApiError, ServeState, create_app  # noqa: E402

ROOT = Path(__file__).parents[1]
SIZE = 64
MAX_BYTES = 300_000
MAX_FILES = 4
MAX_PIXELS = 200_000
DECODE_WORKERS = 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A random-init ResNet-18 at 64 px: serving does not care what the weights learned."""
    torch.manual_seed(0)
    weights = create_model("resnet18", num_classes=len(CLASSES)).state_dict()
    record = Checkpoint(weights, "resnet18", list(CLASSES), preprocess=Preprocess(SIZE))
    return checkpoint.save(record, tmp_path_factory.mktemp("serve") / "model.pt")


@pytest.fixture(scope="module")
def client(ckpt):
    app = create_app(
        ckpt,
        max_bytes=MAX_BYTES,
        max_files=MAX_FILES,
        batch_wait_ms=20,
        max_pixels=MAX_PIXELS,
        decode_workers=DECODE_WORKERS,
    )
    # As a context manager so the lifespan (the model thread and batcher) runs; a 500 raises.
    with TestClient(app) as c:
        yield c


def _png(seed: int = 0, size: int = SIZE) -> bytes:
    img, _ = render_scene(CLASSES[seed % len(CLASSES)], max(size, 32), image_rng(2, 0, seed))
    buf = io.BytesIO()
    img.resize((size, size)).save(buf, format="PNG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height``: a decompression bomb's signature."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _zeros_png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A black image: a few hundred bytes that decode to ``width`` x ``height`` pixels."""
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _check_predictions(body: dict, names: list[str]) -> None:
    assert [p["file"] for p in body["predictions"]] == names
    for p in body["predictions"]:
        probs = [t["probability"] for t in p["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1, abs=1e-4)
        assert {t["class"] for t in p["top"]} == set(CLASSES)


def test_predict_multipart_and_json(client):
    r = client.post("/predict", files={"file": ("a.png", _png(0))})
    assert r.status_code == 200
    _check_predictions(r.json(), ["a.png"])

    files = [("files", (f"{i}.png", _png(i))) for i in range(3)]
    r = client.post("/predict", files=files)
    assert r.status_code == 200
    _check_predictions(r.json(), ["0.png", "1.png", "2.png"])
    # The same image alone and in a batch gets the same answer.
    alone = client.post("/predict", files={"file": ("1.png", _png(1))}).json()
    assert alone["predictions"][0] == r.json()["predictions"][1]

    encoded = [base64.b64encode(_png(i)).decode() for i in range(2)]
    r = client.post("/predict", json={"images": encoded})
    assert r.status_code == 200
    _check_predictions(r.json(), ["image0", "image1"])
    r = client.post("/predict", json={"image": base64.encodebytes(_png(0)).decode()})  # wrapped
    assert r.status_code == 200
    _check_predictions(r.json(), ["image0"])


def test_classes_health_page_and_metrics(client):
    assert client.get("/classes").json() == {"classes": list(CLASSES)}
    health = client.get("/health").json()
    assert health == {"status": "ok", "arch": "resnet18", "classes": 5, "input_size": SIZE}
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external assets

    before = client.get("/metrics").json()
    client.post("/predict", files=[("files", (f"{i}.png", _png(i))) for i in range(2)])
    client.post("/predict", content=b"")
    after = client.get("/metrics").json()
    assert after["requests"] == before["requests"] + 3  # two posts and the first /metrics
    assert after["images_predicted"] == before["images_predicted"] + 2
    assert after["errors"] == before["errors"] + 1
    assert after["status"]["400"] == before["status"].get("400", 0) + 1
    assert after["model_calls"] >= 1 and after["latency_ms"]["p99"] >= after["latency_ms"]["p50"]


def test_concurrent_requests_share_model_calls(client):
    before = client.get("/metrics").json()
    data = _png(3)
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(
                lambda i: client.post("/predict", files={"file": (f"{i}.png", data)}), range(8)
            )
        )
    assert all(r.status_code == 200 for r in responses)
    after = client.get("/metrics").json()
    assert after["images_predicted"] - before["images_predicted"] == 8
    assert after["model_calls"] - before["model_calls"] < 8


def _chunks():
    for _ in range(8):
        yield b"x" * 50_000


BAD_REQUESTS = {
    "not an image": (422, {"files": {"file": ("notes.txt", b"hello, world " * 10)}}),
    "corrupt image": (422, {"files": {"file": ("cut.png", _png(0)[:300])}}),
    "empty file": (422, {"files": {"file": ("empty.png", b"")}}),
    "empty body": (400, {"content": b""}),
    "too large": (413, {"files": {"file": ("big.bin", b"\x00" * (MAX_BYTES + 1))}}),
    "too large, chunked": (413, {"content": _chunks(), "headers": {"content-type": "image/png"}}),
    "decompression bomb": (422, {"files": {"file": ("bomb.png", _png_header(20_000, 20_000))}}),
    "too many files": (413, {"files": [("files", (f"{i}.png", b"x")) for i in range(5)]}),
    "malformed JSON": (
        400,
        {"content": b"{'images': [", "headers": {"content-type": "application/json"}},
    ),
    # json.loads recurses once a level: past Python's recursion limit it raises RecursionError.
    "JSON nested 1,100 deep": (
        400,
        {"content": b"[" * 1_100 + b"]" * 1_100, "headers": {"content-type": "application/json"}},
    ),
    "JSON nested 100,000 deep in images": (
        400,
        {
            "content": b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "headers": {"content-type": "application/json"},
        },
    ),
    "zero-filled PNG over the pixel limit": (
        413,
        {"files": {"file": ("zeros.png", _zeros_png(500, 500))}},
    ),
    "16-bit PNG over the pixel limit": (
        413,
        {"files": {"file": ("zeros16.png", _zeros_png(500, 500, "I;16"))}},
    ),
    "files together over the pixel limit": (
        413,
        {"files": [("files", (f"{i}.png", _zeros_png(250, 250))) for i in range(4)]},
    ),
    "bad base64": (400, {"json": {"images": ["not base64!"]}}),
    "wrong JSON": (400, {"json": {"pictures": []}}),
    "no images": (400, {"json": {"images": []}}),
    "text field": (400, {"data": {"file": "a.png"}, "files": {"other": ("x", b"x")}}),
    "other content type": (415, {"content": b"abc", "headers": {"content-type": "text/plain"}}),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_4xx_json(client, case):
    status, kwargs = BAD_REQUESTS[case]
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    if case == "decompression bomb":
        assert "decompression bomb" in r.json()["error"]
    if "pixel limit" in case:
        assert f"the limit is {MAX_PIXELS:,} a request" in r.json()["error"]
    if "nested" in case:
        assert "nested too deeply" in r.json()["error"]
    assert client.get("/health").status_code == 200


def test_pixel_limit_is_checked_before_anything_is_decoded(client, monkeypatch):
    predictor = client.app.state.predictor
    decoded = []
    load = predictor.load
    monkeypatch.setattr(
        predictor, "load", lambda data, name: decoded.append(name) or load(data, name)
    )
    # 16 bytes short of the limit in all: every image decoded, and answered.
    files = [("files", (f"{i}.png", _zeros_png(200, 250))) for i in range(4)]
    r = client.post("/predict", files=files)
    assert r.status_code == 200 and decoded == ["0.png", "1.png", "2.png", "3.png"]
    # One pixel more in the last image: refused from the headers, none of them decoded.
    decoded.clear()
    files[-1] = ("files", ("3.png", _zeros_png(200, 251)))
    r = client.post("/predict", files=files)
    assert r.status_code == 413 and "200,200 pixels" in r.json()["error"] and decoded == []


def test_decoding_runs_in_a_bounded_pool(client, monkeypatch):
    predictor = client.app.state.predictor
    load = predictor.load
    lock = threading.Lock()
    running, most = 0, 0

    def slow_load(data: bytes, name: str):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return load(data, name)

    monkeypatch.setattr(predictor, "load", slow_load)
    data = _png(2)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(
                lambda i: client.post("/predict", files={"file": (f"{i}.png", data)}).status_code,
                range(8),
            )
        )
    assert statuses == [200] * 8
    assert most == DECODE_WORKERS  # 8 requests at once, never more than the pool's threads


def test_serve_state_predicts_and_refuses_alone(ckpt):
    """The routes' logic through the state alone: no app, no HTTP client, no middleware."""
    state = ServeState.load(ckpt, topk=3, batch_wait_ms=1, max_pixels=MAX_PIXELS)

    async def use() -> tuple[list[dict], ApiError]:
        await state.start()
        try:
            answers = await state.predict([("a.png", _png(0)), ("b.png", _png(1))])
            with pytest.raises(ApiError) as refused:
                await state.predict([("zeros.png", _zeros_png(500, 500))])
            return answers, refused.value
        finally:
            await state.stop()

    answers, refused = asyncio.run(use())
    predictor = state.predictor
    direct = predictor.top(predictor.probabilities([predictor.load(_png(1), name="b")]), 3)
    assert [p["file"] for p in answers] == ["a.png", "b.png"]
    assert [t["class"] for t in answers[1]["top"]] == [c for c, _ in direct[0]]
    assert [t["probability"] for t in answers[1]["top"]] == pytest.approx(
        [p for _, p in direct[0]], abs=1e-4
    )
    assert refused.status == 413 and f"the limit is {MAX_PIXELS:,} a request" in refused.message
    # One model call for the two images; the refused image never reached the model.
    assert (state.metrics.model_calls, state.metrics.images) == (1, 2)


@pytest.mark.parametrize(
    "host, allowed",
    [
        ("127.0.0.1", ["127.0.0.1", "localhost", "::1"]),
        ("localhost", ["127.0.0.1", "localhost", "::1"]),
        ("192.0.2.7", ["192.0.2.7"]),
        ("0.0.0.0", None),
    ],
)
def test_served_host_names(host, allowed):
    assert served_host_names(host, []) == allowed
    extra = ["scenes.example.org"]
    assert served_host_names(host, extra) == [*(allowed or LOOPBACK), *extra]


@pytest.mark.parametrize(
    "flag",
    ["--max-bytes inf", "--max-bytes 1e999", "--port 70000", "--body-timeout 0", "--max-pixels 0"],
)
def test_serve_flag_mistakes_give_one_line(ckpt, flag, capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", str(ckpt), *flag.split()])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("rsscene serve: error: argument") and "Traceback" not in err


def test_cam_endpoint(client):
    r = client.post("/cam", files={"file": ("a.png", _png(0))})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (SIZE, SIZE)
    r = client.post("/cam?format=json&class=ship", files={"file": ("a.png", _png(0))})
    body = r.json()
    assert r.status_code == 200 and body["class"] == "ship" and 0 <= body["probability"] <= 1
    assert base64.b64decode(body["png"]).startswith(b"\x89PNG")
    assert client.post("/cam?class=forest", files={"file": ("a.png", _png(0))}).status_code == 422
    two = [("files", (f"{i}.png", _png(i))) for i in range(2)]
    assert client.post("/cam", files=two).status_code == 413
    assert client.post("/cam", files={"file": ("x.txt", b"text")}).status_code == 422


def _band_ckpt(path: Path, bands: int) -> Path:
    """A random-init ResNet-18 reading ``bands``-band uint16 files."""
    torch.manual_seed(0)
    weights = create_model("resnet18", num_classes=len(CLASSES), in_channels=bands).state_dict()
    pre = Preprocess(
        SIZE, [0.3] * bands, [0.2] * bands, list(range(1, bands + 1)), bands, dtype="uint16"
    )
    return checkpoint.save(Checkpoint(weights, "resnet18", list(CLASSES), preprocess=pre), path)


def _uint16_tiff(bands: int) -> bytes:
    import numpy as np
    import tifffile

    pixels = np.random.default_rng(bands).integers(0, 60_000, (bands, SIZE, SIZE), np.uint16)
    buf = io.BytesIO()
    if bands == 1:
        tifffile.imwrite(buf, pixels[0], photometric="minisblack")
    else:
        tifffile.imwrite(buf, pixels, photometric="minisblack", planarconfig="separate")
    return buf.getvalue()


@pytest.mark.parametrize("bands", [1, 2])
def test_cam_draws_one_and_two_band_models_in_grey(bands, tmp_path, capsys):
    ckpt = _band_ckpt(tmp_path / "model.pt", bands)
    data = _uint16_tiff(bands)
    with TestClient(create_app(ckpt, batch_wait_ms=1)) as client:
        r = client.post("/cam", files={"file": ("grey.tif", data)})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        r = client.post("/cam?format=json", files={"file": ("grey.tif", data)})
        assert r.status_code == 200, r.text
        shown = Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))).convert("RGB")
        red, green, blue = shown.split()
        assert red.tobytes() == green.tobytes() == blue.tobytes()  # the first band, in grey
        assert len(set(red.tobytes())) > 100  # stretched, not flat
        r = client.post("/cam?show=1,2,3", files={"file": ("grey.tif", data)})
        assert r.status_code == 422 and f"({','.join(map(str, range(1, bands + 1)))})" in r.text
    # The command draws it in grey as well, without --show-bands.
    (tmp_path / "grey.tif").write_bytes(data)
    assert main(["cam", str(ckpt), str(tmp_path / "grey.tif"), "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "grey_cam.png").is_file()


def test_cam_show_names_the_rgb_models_bands(client, ckpt, tmp_path, capsys):
    r = client.post("/cam?show=4,3,2", files={"file": ("a.png", _png(0))})
    assert r.status_code == 422 and "(1,2,3; it reads 8-bit RGB)" in r.json()["error"]
    plain = client.post("/cam?format=json", files={"file": ("a.png", _png(0))}).json()
    same = client.post("/cam?format=json&show=1,2,3", files={"file": ("a.png", _png(0))}).json()
    assert same["image"] == plain["image"]
    swapped = client.post("/cam?format=json&show=3,2,1", files={"file": ("a.png", _png(0))})
    assert swapped.status_code == 200 and swapped.json()["image"] != plain["image"]
    (tmp_path / "a.png").write_bytes(_png(0))
    argv = ["cam", str(ckpt), str(tmp_path / "a.png"), "--out", str(tmp_path / "c")]
    assert main([*argv, "--show-bands", "4,3,2"]) == 2
    assert "give three of the model's bands (1,2,3" in capsys.readouterr().err


def test_map_has_a_bounded_queue_of_its_own(ckpt, tmp_path):
    """A map in progress holds up no /predict; two at once fill the queue (503, Retry-After);
    a scene over the window budget is refused from its header, before it queues."""
    generate_mosaic(tmp_path, 2, 3, size=SIZE, seed=0)
    scene = (tmp_path / "mosaic.png").read_bytes()
    app = create_app(ckpt, batch_wait_ms=1, map_queue=2, map_windows=10)
    mapper = app.state.serve.mapper
    gate, mapping = threading.Event(), threading.Event()
    real = mapper._map

    def held(*args):
        mapping.set()
        assert gate.wait(60)
        return real(*args)

    mapper._map = held
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        post = lambda query="": client.post(f"/map{query}", files={"file": ("m.png", scene)})  # noqa: E731
        maps = [pool.submit(post) for _ in range(2)]
        assert mapping.wait(60)
        deadline = time.monotonic() + 30
        while mapper.admitted < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        r = client.post("/predict", files={"file": ("a.png", _png(0))})
        assert r.status_code == 200 and time.monotonic() - started < 20
        full = post()
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
        assert "the most this server queues" in full.json()["error"]
        # 24 windows of 32 px against a budget of 10: refused even while the queue is full.
        over = post("?tile=32")
        assert over.status_code == 422, over.text
        assert "m.png: 24 windows of 32 px" in over.json()["error"]
        assert "the limit is 10 windows a request" in over.json()["error"]
        assert not any(m.done() for m in maps)  # all of this while both maps were held
        gate.set()
        answers = [m.result(60) for m in maps]
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].json()["summary"]["grid"] == [2, 3]
        assert mapper.admitted == 0 and post().status_code == 200


def test_serve_without_its_dependencies(ckpt, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    assert main(["serve", str(ckpt)]) == 2
    assert 'pip install "rsscene[serve]"' in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BODY_TIMEOUT = 2


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """``python -m rsscene serve`` as a real process; yields its base URL."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w+")
    argv = ["serve", str(ckpt), "--port", str(port), "--body-timeout", str(BODY_TIMEOUT)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rsscene", *argv],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"server exited: {log.seek(0) or log.read()}"
            assert time.monotonic() < deadline, "server did not come up in 90 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_real_server_process(server):
    r = httpx.post(f"{server}/predict", files={"file": ("a.png", _png(0))}, timeout=30)
    assert r.status_code == 200
    _check_predictions(r.json(), ["a.png"])


def test_real_server_answers_only_to_its_own_host_names(server):
    port = server.rsplit(":", 1)[1]
    for name in ("127.0.0.1", "localhost", f"localhost:{port}", f"127.0.0.1:{port}"):
        assert httpx.get(f"{server}/health", headers={"host": name}).status_code == 200, name
    # What a page at rebound.example sends once its name points at 127.0.0.1 (DNS rebinding).
    for name in (f"rebound.example:{port}", "rebound.example", "127.0.0.1.rebound.example", ""):
        r = httpx.get(f"{server}/classes", headers={"host": name})
        assert r.status_code == 400 and "is not served here" in r.json()["error"], name
        r = httpx.post(
            f"{server}/predict", files={"file": ("a.png", _png(0))}, headers={"host": name}
        )
        assert r.status_code == 400, name


def _raw_request(url: str, head: str, body: bytes) -> socket.socket:
    """A connection that has sent ``head`` and then only ``body``, and keeps waiting."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


def test_a_slow_or_abandoned_body_gets_408_not_a_500(server):
    png = _png(0)
    head = (
        "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(png) * 2}\r\n"
    )
    before = httpx.get(f"{server}/metrics").json()["status"]
    slow = [_raw_request(server, head, b'{"images": ["') for _ in range(3)]
    started = time.monotonic()
    assert httpx.get(f"{server}/health", timeout=5).status_code == 200  # not held up meanwhile
    for sock in slow:
        with sock, sock.makefile("rb") as answer:
            status = answer.readline()
            assert status.startswith(b"HTTP/1.1 408"), status
    assert BODY_TIMEOUT <= time.monotonic() - started < BODY_TIMEOUT + 10
    # A client that goes away mid-body: nobody to answer, and no server error either.
    _raw_request(server, head, b'{"images": ["').close()
    time.sleep(0.5)
    after = httpx.get(f"{server}/metrics").json()["status"]
    assert after.get("408", 0) - before.get("408", 0) == 3
    assert not any(int(code) >= 500 for code in after), after


BROWSER_NEEDS = (
    "the browser test needs Chromium and ChromeDriver (apt-get install -y chromium"
    " chromium-driver) and selenium (pip install selenium)"
)


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """(browser, driver) paths; where they are missing, a skip, or in CI (CI set) a failure:
    CI must not stay green without having looked at the page."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        browser = None
    if browser and driver:
        return browser, driver
    missing = f"{BROWSER_NEEDS}; found chromium={browser}, chromedriver={driver}"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the browser test, and cannot: {missing}", pytrace=False)
    pytest.skip(missing)


def test_web_page_in_headless_chromium(chromium, server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,640",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    image = tmp_path / "scene.png"
    image.write_bytes(_png(4))
    expected = httpx.post(f"{server}/predict", files={"file": ("scene.png", _png(4))}).json()
    best = expected["predictions"][0]["top"][0]["class"]

    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    try:
        driver.get(server + "/")
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "best").text == best)
        rows = driver.find_elements(By.CSS_SELECTOR, "#top .row")
        assert len(rows) == 5 and rows[0].find_element(By.CLASS_NAME, "name").text == best
        # The heat map arrives after the prediction; until then the image has no src.
        wait.until(
            lambda d: (d.find_element(By.ID, "cam").get_attribute("src") or "").startswith("blob:")
        )
        assert driver.find_element(By.ID, "error").text == ""
        # Set RSSCENE_SCREENSHOT=docs/serve.png to refresh the README's picture.
        if os.environ.get("RSSCENE_SCREENSHOT"):
            wait.until(lambda d: d.execute_script("return document.getElementById('cam').complete"))
            driver.save_screenshot(os.environ["RSSCENE_SCREENSHOT"])
        # A whole scene: the map section shows its overlay and a row per class.
        generate_mosaic(tmp_path / "mosaic", 2, 3, size=SIZE, seed=0)
        driver.find_element(By.ID, "scene").send_keys(str(tmp_path / "mosaic" / "mosaic.png"))
        wait.until(lambda d: d.find_element(By.ID, "overlay").get_attribute("src") or "")
        assert (
            driver.find_element(By.ID, "overlay").get_attribute("src").startswith("data:image/png")
        )
        assert len(driver.find_elements(By.CSS_SELECTOR, "#maprows tr")) == len(CLASSES)
        assert driver.find_element(By.ID, "maperror").text == ""
    finally:
        driver.quit()


@pytest.mark.parametrize("ci", ["true", ""])
def test_the_browser_test_fails_in_ci_without_chromium(ci, tmp_path):
    # Only python on the PATH: no chromium, no chromedriver.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": str(bin_dir), "CI": ci}
    test = f"{Path(__file__)}::test_web_page_in_headless_chromium"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", test, "-p", "no:cacheprovider", "-q", "-rfs"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    if ci:
        assert done.returncode == 1 and "1 error" in done.stdout, done.stdout[-2000:]
        assert "CI must run the browser test, and cannot" in done.stdout
    else:
        assert done.returncode == 0 and "1 skipped" in done.stdout, done.stdout[-2000:]
        assert "the browser test needs Chromium" in done.stdout


def _serve_load(*argv: str, timeout: int) -> str:
    script = ROOT / "benchmarks" / "serve_load.py"
    result = subprocess.run(
        [sys.executable, str(script), *argv], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5xx: 0" in result.stdout and "PASS" in result.stdout
    return result.stdout


def test_load_benchmark_smoke():
    _serve_load("--requests", "20", "--concurrency", "4", "--img-size", "64", timeout=180)


def test_map_load_benchmark_smoke():
    out = _serve_load(
        *("--map-load", "--requests", "20", "--concurrency", "2", "--img-size", "64"),
        *("--map-size", "512"),
        timeout=300,
    )
    assert "| during 4 /map |" in out and "/map: statuses 200, 200, 200, 200" in out
    assert "map load: 5xx: 0; all answered 200: True" in out


def test_hostile_load_benchmark_smoke():
    # 20 bad requests: each of the 10 kinds twice, the bombs at a 1-megapixel limit.
    out = _serve_load(
        *("--hostile", "--requests", "100", "--bad-share", "0.2", "--concurrency", "4"),
        *("--img-size", "64", "--max-pixels", "1000000", "--body-timeout", "1"),
        timeout=300,
    )
    assert "bad requests answered as expected: 20/20" in out
    for kind in ("nested-json", "16-png-bombs", "16-bit-bomb", "rgba-under-limit", "slow-body"):
        assert f"  {kind} " in out
    assert "/health answered" in out and "polls with 200" in out


@pytest.mark.slow
def test_hostile_load_benchmark_at_the_readmes_scale():
    """The README's figures: 500 requests, 16 clients, 50 bad of 10 kinds, 40 MP limit."""
    out = _serve_load("--hostile", timeout=900)
    assert "bad requests answered as expected: 50/50" in out


def test_map_of_a_tiff_truncated_outside_its_windows_is_a_4xx(client, tmp_path: Path) -> None:
    import numpy as np
    import tifffile

    path = tmp_path / "s.tif"  # 72 rows in strips of 8: 64 px windows read rows 0-63 only
    pixels = np.random.default_rng(0).integers(0, 255, (72, 64, 3), dtype=np.uint8)
    tifffile.imwrite(path, pixels, photometric="rgb", rowsperstrip=8)
    with tifffile.TiffFile(path) as tif:
        last = tif.pages.first.dataoffsets[-1]
    r = client.post("/map", files={"file": ("s.tif", path.read_bytes()[: last + 100])})
    assert r.status_code in (400, 422) and "corrupt or truncated" in r.json()["error"]
    assert client.get("/health").status_code == 200


def test_deep_json_is_refused_whatever_the_recursion_limit(client) -> None:
    import sys

    body = b"[" * 1_100 + b"]" * 1_100
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(5_000)  # as mkdocstrings (2,000) or jedi (3,000) set it in-process
    try:
        r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    finally:
        sys.setrecursionlimit(before)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
