"""The HTTP API and web page of ``rsscene serve``: :func:`create_app` builds a FastAPI app.

``POST /predict``  images as multipart (field ``file`` or ``files``, one or several) or JSON
                   ``{"images": [base64, ...]}`` / ``{"image": base64}``; answers
                   ``{"predictions": [{"file": name, "top": [{"class", "probability"}]}]}``
``POST /cam``      one image, the same ways; a Grad-CAM overlay PNG (``?format=json``: base64
                   in JSON, with the image as drawn under the overlay; ``?class=NAME``:
                   explain that class instead of the predicted one; ``?show=R,G,B``: a
                   multi-band model's bands drawn as red, green, blue)
``POST /map``      one scene, the same ways, mapped tile by tile (``rsscene map``): the summary
                   and the overlay PNG as base64 in JSON (``?format=png``: the PNG alone;
                   ``?tile=PX&stride=PX`` as the command's), in a queue of its own
``GET /classes``, ``GET /health``, ``GET /metrics``, and ``GET /``: the one-page web UI.

The routes are module-level functions that get one :class:`ServeState` (the predictor, the
model's worker, the limits, the decoding pool, the metrics) as a FastAPI dependency;
:func:`create_app` builds that state and registers the middleware, error handlers and routes.

The checkpoint is loaded once. Predictions are micro-batched: each request's decoded images
join a queue; one task gathers what arrives within ``batch_wait_ms`` (up to ``max_batch``
images) and makes one model call. Every model call, prediction or Grad-CAM, runs in one
dedicated thread, so the event loop never waits on the model and the model never runs twice
at once (Grad-CAM's hook would otherwise see another request's forward pass).

Maps take seconds to minutes, so they have a :class:`MapWorker` of their own: one thread with
its own copy of the model, at most ``map_queue`` requests admitted (the one mapping and those
waiting; more get 503 with Retry-After), each within ``map_windows`` windows (checked from the
scene's header before it queues). A map therefore never holds up ``/predict`` or ``/cam``.

Images are decoded in a pool of ``decode_workers`` threads, and a request whose images would
decode to more than ``max_pixels`` pixels in all is refused from their headers, before any is
decoded: together these bound the memory that decoding can take, whatever is sent.

Bad input is answered with a 4xx and ``{"error": "..."}``: 400 for an empty body, malformed
or too deeply nested JSON, malformed base64, or a Host header the server was not started
for (DNS rebinding); 408 for a body not received within ``body_timeout`` seconds; 413 for a
body over ``max_bytes``, more than ``max_files`` images or more than ``max_pixels`` pixels;
415 for another content type; 422 for what is not a usable image (not an image, corrupt,
too small, a decompression bomb), naming the file and the reason, for a ``?show`` the model
cannot draw, and for a scene over the window budget; 503 while the map queue is full.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import dataclasses
import json
import logging
import math
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import Tensor

from rsscene.data.bands import Preprocess, parse_display, render_rgb
from rsscene.data.images import ImageError, image_size
from rsscene.errors import UserError
from rsscene.explain import class_index, explain, image_png, overlay_png
from rsscene.inference import Prediction, Predictor
from rsscene.mapping import map_scene
from rsscene.mapping.scenes import Scene
from rsscene.mapping.tiling import make_grid

DEFAULT_MAX_BYTES = 10_000_000
# A request is {"images": [...]}: two levels. Far deeper is an attack on the parser.
MAX_JSON_DEPTH = 64
DEFAULT_MAX_FILES = 16
DEFAULT_TOPK = 5
DEFAULT_BATCH_WAIT_MS = 5.0
DEFAULT_MAX_BATCH = 32
# Decoding takes up to about 20 bytes a pixel at its peak (RGBA, composited, then resized), so
# 40 megapixels a request and 2 decoding threads keep decoding under about 1.6 GB in all.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_DECODE_WORKERS = 2
DEFAULT_BODY_TIMEOUT = 60.0
# /map's budget a request, in windows: bounds how long one map holds the map thread (about a
# minute of a CPU for a ResNet-18 at 224 px), and so how long the ones queued behind it wait.
DEFAULT_MAP_WINDOWS = 4096
# Map requests admitted at once, the one being mapped included: each waiting one holds its body
# (up to max_bytes); more are answered 503 with Retry-After.
DEFAULT_MAP_QUEUE = 4
PAGE = Path(__file__).with_name("static") / "index.html"
log = logging.getLogger("rsscene.serve")


class ApiError(Exception):
    """A bad request, answered with ``status``, ``{"error": message}`` and ``headers``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413, by its Content-Length before
    anything is read, or as soon as the bytes read pass the limit (chunked uploads); a body
    still incomplete ``timeout`` seconds after the request began gets 408, so that clients
    sending slowly cannot hold connections and buffers for ever."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body over the limit of {self.max_bytes:,} bytes"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _error(413, message)(scope, receive, send)
            return
        seen = 0
        complete = False
        deadline = time.monotonic() + self.timeout

        async def limited() -> Message:
            nonlocal seen, complete
            if complete:  # after the body only a disconnect can come, whenever it comes
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                raise ApiError(
                    408, f"request body not received within {self.timeout:g} s"
                ) from None
            complete = not msg.get("more_body", False)
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, message)  # answered by the app's ApiError handler
            return msg

        await self.app(scope, limited, send)


class HostCheck:
    """ASGI middleware: a request whose Host header names another host gets 400.

    A page elsewhere can point a name of its own at 127.0.0.1 (DNS rebinding) and then read
    this server's answers as same-origin; its requests still carry that name as Host.
    """

    def __init__(self, app: ASGIApp, allowed: Sequence[str]) -> None:
        self.app = app
        self.allowed = {h.lower().strip("[]") for h in allowed}

    @staticmethod
    def host_name(header: str) -> str:
        """``name`` from ``name``, ``name:port``, ``[v6]`` or ``[v6]:port``."""
        if header.startswith("["):
            return header[1:].partition("]")[0]
        return header.rpartition(":")[0] if ":" in header else header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if self.host_name(header).lower() not in self.allowed:
            names = ", ".join(sorted(self.allowed))
            message = f"host {header!r} is not served here (serving {names}; see --allow-host)"
            await _error(400, message)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class Metrics:
    """Request counts by status, recent latencies, images and model calls."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.status: Counter[int] = Counter()
        self.latencies: deque[float] = deque(maxlen=10_000)
        self.images = 0
        self.model_calls = 0

    def record(self, status: int, seconds: float) -> None:
        self.status[status] += 1
        self.latencies.append(seconds * 1000)

    def as_dict(self) -> dict[str, Any]:
        p50, p90, p99 = (
            np.percentile(self.latencies, [50, 90, 99]).round(2).tolist()
            if self.latencies
            else (None, None, None)
        )
        return {
            "requests": sum(self.status.values()),
            "errors": sum(n for s, n in self.status.items() if s >= 400),
            "status": {str(s): n for s, n in sorted(self.status.items())},
            "latency_ms": {"p50": p50, "p90": p90, "p99": p99, "window": len(self.latencies)},
            "images_predicted": self.images,
            "model_calls": self.model_calls,
            "uptime_s": round(time.monotonic() - self.started, 1),
        }


class MetricsMiddleware:
    """ASGI middleware timing every request and counting its response status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def capture(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, capture)
        finally:
            self.metrics.record(status, time.perf_counter() - start)


class ModelWorker:
    """The one thread that runs the model for ``/predict`` and ``/cam``, and the micro-batcher
    that feeds it (``/map`` has a :class:`MapWorker` of its own)."""

    def __init__(
        self, predictor: Predictor, max_batch: int, wait_s: float, metrics: Metrics
    ) -> None:
        self.predictor = predictor
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.metrics = metrics

    async def start(self) -> None:
        # Created here, inside the running loop, so the app can be started more than once.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsscene-model")
        self.queue: asyncio.Queue[tuple[list[Tensor], asyncio.Future]] = asyncio.Queue()
        self.task = asyncio.create_task(self._batch_loop())

    async def stop(self) -> None:
        self.task.cancel()
        with suppress(asyncio.CancelledError):
            await self.task
        self.executor.shutdown(wait=True)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def probabilities(self, images: list[Tensor]) -> Tensor:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, future))
        return await future

    async def _batch_loop(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            await asyncio.sleep(self.wait_s)  # let concurrent requests join this batch
            count = len(jobs[0][0])
            while count < self.max_batch and not self.queue.empty():
                jobs.append(self.queue.get_nowait())
                count += len(jobs[-1][0])
            images = [image for batch, _ in jobs for image in batch]
            try:
                probs = await self.call(self.predictor.probabilities, images)
            except Exception as e:  # a failed model call fails its requests, not the loop
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.metrics.model_calls += 1
            self.metrics.images += len(images)
            start = 0
            for batch, future in jobs:
                if not future.done():  # its client may have gone away
                    future.set_result(probs[start : start + len(batch)])
                start += len(batch)


async def read_images(request: Request, max_files: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image in a multipart or JSON request, or an :class:`ApiError`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    usage = "send images as multipart (field 'file' or 'files') or JSON {\"images\": [base64]}"
    items: list[tuple[str, bytes]] = []
    if content_type == "multipart/form-data":
        form = await request.form()
        uploads = form.getlist("file") + form.getlist("files")
        if len(uploads) > max_files:
            raise ApiError(413, f"{len(uploads)} images in one request; the limit is {max_files}")
        for i, upload in enumerate(uploads):
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "fields 'file' and 'files' must be file uploads, not text")
            items.append((upload.filename or f"image{i}", await upload.read()))
    elif content_type == "application/json":
        body = await request.body()
        if json_depth(body) > MAX_JSON_DEPTH:
            raise ApiError(400, f"JSON body nested too deeply; {usage}")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, f"malformed JSON body; {usage}") from None
        except RecursionError:
            raise ApiError(400, f"JSON body nested too deeply; {usage}") from None
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            encoded = data["images"]
        elif isinstance(data, dict) and "image" in data:
            encoded = [data["image"]]
        else:
            raise ApiError(400, f"unexpected JSON; {usage}")
        if len(encoded) > max_files:
            raise ApiError(413, f"{len(encoded)} images in one request; the limit is {max_files}")
        for i, text in enumerate(encoded):
            try:
                # Whitespace is allowed: ``base64`` wraps its output at 76 columns.
                items.append((f"image{i}", base64.b64decode("".join(text.split()), validate=True)))
            except (AttributeError, binascii.Error, ValueError):
                raise ApiError(400, f"image {i}: not valid base64") from None
    elif not await request.body():
        raise ApiError(400, f"empty request; {usage}")
    else:
        raise ApiError(415, f"unsupported content type {content_type or 'none'!r}; {usage}")
    if not items:
        raise ApiError(400, f"no image in the request; {usage}")
    return items


def json_depth(body: bytes) -> int:
    """The deepest nesting of ``[`` and ``{`` in a JSON body (brackets inside strings count
    too: an over-estimate, and a request's base64 strings hold none). Checked before parsing,
    because json.loads recurses once a level: how deep it goes before failing depends on the
    process's recursion limit, which libraries raise, and past the C stack it would crash."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return 0
    chars = np.frombuffer(body, dtype=np.uint8)
    step = np.isin(chars, (0x5B, 0x7B)).astype(np.int64) - np.isin(chars, (0x5D, 0x7D))
    return int(np.cumsum(step).max())


def shown_as(pre: Preprocess, show: str | None) -> Preprocess:
    """The checkpoint's preprocessing with ``show`` (``R,G,B``, 1-based) as the bands drawn, or
    a :class:`UserError` when they are not three of the model's bands."""
    if not show:
        return pre
    try:
        display = parse_display(show)
    except ValueError as e:
        raise UserError(f"show={show}: {e}") from None
    return pre.shown_as(display)


def _answer_errors(app: FastAPI) -> None:
    """Every failure as ``{"error": ...}`` with its status: bad input as a 4xx naming what is
    wrong, a bug as a 500 that is logged with its traceback."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.headers)

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError) -> JSONResponse:
        # Raised by the work itself (an image the model cannot take, a map's settings): what
        # was sent is the cause, never a bug. ImageError names the file.
        return _error(422, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        return _error(422, where)

    @app.exception_handler(ClientDisconnect)
    async def disconnected(request: Request, e: ClientDisconnect) -> JSONResponse:
        # Nobody reads this answer; it is counted as the client's doing, not a server error.
        return _error(400, "the client went away before sending the whole body")

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        # A bug, never bad input: those are all answered above.
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal server error")


def _map_upload(
    predictor: Predictor,
    name: str,
    data: bytes,
    tile: int | None,
    stride: int | None,
    max_pixels: int,
    max_windows: int = DEFAULT_MAP_WINDOWS,
) -> tuple[dict[str, Any], bytes]:
    """``rsscene map`` on an uploaded scene: its summary (without local paths) and overlay PNG."""
    with tempfile.TemporaryDirectory(prefix="rsscene-map-") as tmp:
        # rasterio reads TIFFs by window; other formats are decoded by their content.
        suffix = ".tif" if data[:4] in (b"II*\x00", b"MM\x00*") else ".upload"
        scene = Path(tmp) / f"scene{suffix}"
        scene.write_bytes(data)
        try:
            summary = map_scene(
                predictor,
                scene,
                Path(tmp),
                tile=tile,
                stride=stride,
                max_pixels=max_pixels,
                max_windows=max_windows,
            )
        except UserError as e:
            raise ApiError(422, str(e).replace(str(scene), name)) from None
        png = (Path(tmp) / "overlay.png").read_bytes()
    for key in ("files", "checkpoint"):
        summary.pop(key)
    return {**summary, "scene": name}, png


class MapWorker:
    """``/map``'s own thread, model and bounded queue, so that a scene that takes a minute to
    map never holds up ``/predict`` or ``/cam``: they keep the model's thread to themselves."""

    def __init__(
        self, predictor: Predictor, capacity: int, max_windows: int, max_pixels: int
    ) -> None:
        # A copy of the model: Grad-CAM's hook on the model's thread must never see a map's
        # forward pass, and a map may convert its model to channels_last.
        self.predictor = copy.copy(predictor)
        self.predictor.model = copy.deepcopy(predictor.model)
        self.capacity = capacity
        self.max_windows = max_windows
        self.max_pixels = max_pixels
        self.admitted = 0  # mapping or waiting; changed on the event loop only
        self.seconds: deque[float] = deque(maxlen=8)  # recent maps' durations, for Retry-After

    async def start(self) -> None:
        # Created here, like the model's thread, so the app can be started more than once.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsscene-map")
        self.admitted = 0

    async def stop(self) -> None:
        # The map in progress ends; those still waiting are cancelled rather than made.
        self.executor.shutdown(wait=True, cancel_futures=True)

    def check_windows(self, name: str, data: bytes, tile: int | None, stride: int | None) -> None:
        """A 422 naming the budget, from the scene's header, before the request queues: a
        scene over ``max_windows`` windows (map_scene checks again once it has the scene)."""
        try:
            width, height = image_size(data, max_pixels=self.max_pixels, name=name)
        except ImageError:
            return  # map_scene says what is wrong, by its own rules (rasterio reads more)
        pre = self.predictor.pre
        try:
            grid = make_grid(
                Scene(Path(name), width, height, 0, ""), tile or pre.source_size or pre.size, stride
            )
        except UserError as e:
            raise ApiError(422, str(e)) from None
        windows = grid.window_rows * grid.window_cols
        if windows > self.max_windows:
            raise ApiError(
                422,
                f"{name}: {windows:,} windows of {grid.tile} px every {grid.stride} px; the limit"
                f" is {self.max_windows:,} windows a request (use a larger tile or stride)",
            )

    def retry_after(self) -> str:
        """Seconds until a place is likely free: about one map's time."""
        recent = tuple(self.seconds)  # one step under the GIL: the map thread appends to it
        return str(max(1, math.ceil(np.median(recent)))) if recent else "10"

    def _map(self, *args: Any) -> tuple[dict[str, Any], bytes]:
        started = time.monotonic()
        try:
            return _map_upload(self.predictor, *args, self.max_pixels, self.max_windows)
        finally:
            self.seconds.append(time.monotonic() - started)

    async def map(
        self, name: str, data: bytes, tile: int | None, stride: int | None
    ) -> tuple[dict[str, Any], bytes]:
        """The scene mapped in the map thread, or an :class:`ApiError`: 422 over the window
        budget, 503 (with Retry-After) when ``capacity`` maps are mapping or waiting."""
        self.check_windows(name, data, tile, stride)
        if self.admitted >= self.capacity:
            raise ApiError(
                503,
                f"{self.admitted} maps are being made or waiting, the most this server queues;"
                " try again later",
                {"Retry-After": self.retry_after()},
            )
        self.admitted += 1
        loop = asyncio.get_running_loop()
        job = self.executor.submit(self._map, name, data, tile, stride)
        # Released when the work ends, even if the client has gone away meanwhile.
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return await asyncio.wrap_future(job)

    def _release(self) -> None:
        self.admitted -= 1


@dataclasses.dataclass
class ServeState:
    """What every route shares: the checkpoint's predictor, the model's worker, the map's
    worker, the limits, the decoding pool and the metrics. It needs no app, so its logic can
    be driven alone."""

    predictor: Predictor
    worker: ModelWorker
    mapper: MapWorker
    metrics: Metrics
    page: str
    max_files: int
    topk: int
    max_pixels: int
    decode_workers: int
    decoders: ThreadPoolExecutor = dataclasses.field(init=False, repr=False)

    @classmethod
    def load(
        cls,
        ckpt_path: str | Path,
        *,
        device: str = "cpu",
        max_files: int = DEFAULT_MAX_FILES,
        topk: int = DEFAULT_TOPK,
        batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        decode_workers: int = DEFAULT_DECODE_WORKERS,
        map_queue: int = DEFAULT_MAP_QUEUE,
        map_windows: int = DEFAULT_MAP_WINDOWS,
    ) -> ServeState:
        """The state for one checkpoint, loaded now (a bad checkpoint fails here, not per
        request); :meth:`start` it inside the running loop before use."""
        predictor = Predictor(ckpt_path, device=device)
        metrics = Metrics()
        worker = ModelWorker(predictor, max_batch, batch_wait_ms / 1000, metrics)
        mapper = MapWorker(predictor, map_queue, map_windows, max_pixels)
        page = PAGE.read_text(encoding="utf-8")
        return cls(
            predictor, worker, mapper, metrics, page, max_files, topk, max_pixels, decode_workers
        )

    async def start(self) -> None:
        """Start the decoding pool, the model's thread and batcher, and the map's thread."""
        # Created here, like the model's thread, so the app can be started more than once.
        self.decoders = ThreadPoolExecutor(self.decode_workers, thread_name_prefix="rsscene-decode")
        await self.worker.start()
        await self.mapper.start()

    async def stop(self) -> None:
        """Stop what :meth:`start` started, waiting for the work in progress."""
        await self.worker.stop()
        await self.mapper.stop()
        self.decoders.shutdown(wait=True)

    def load_images(self, items: list[tuple[str, bytes]]) -> list[Tensor]:
        """The images decoded, or an :class:`ApiError`: 413 from their headers alone when they
        would take more than ``max_pixels`` in all, 422 for one that is not a usable image.
        It blocks: :meth:`decode` runs it in the decoding pool."""
        try:
            sizes = [image_size(data, name=name) for name, data in items]
            pixels = sum(w * h for w, h in sizes)
            if pixels > self.max_pixels:
                raise ApiError(
                    413,
                    f"the images of this request would decode to {pixels:,} pixels;"
                    f" the limit is {self.max_pixels:,} a request",
                )
            return [self.predictor.load(data, name=name) for name, data in items]
        except ImageError as e:
            raise ApiError(422, str(e)) from None

    async def decode(self, items: list[tuple[str, bytes]]) -> list[Tensor]:
        """:meth:`load_images` in the decoding pool, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.decoders, self.load_images, items)

    async def predict(self, items: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        """Each image's top ``topk`` classes, from a micro-batched model call."""
        probs = await self.worker.probabilities(await self.decode(items))
        tops = self.predictor.top(probs, self.topk)
        return [Prediction(name, top).as_dict() for (name, _), top in zip(items, tops, strict=True)]


def _cam_pngs(
    predictor: Predictor, image: Tensor, class_idx: int | None, pre: Preprocess
) -> tuple[bytes, bytes, int, float]:
    """Grad-CAM of ``image``: the overlay PNG, the image as drawn under it, the class explained
    and its probability."""
    heat, idx, probs = explain(predictor, image, class_idx)
    shown = render_rgb(image, pre)
    return overlay_png(shown, heat), image_png(shown), idx, float(probs[idx])


def serve_state(request: Request) -> ServeState:
    """The app's :class:`ServeState`: the dependency through which every route gets it."""
    return request.app.state.serve


State = Annotated[ServeState, Depends(serve_state)]
routes = APIRouter()


@routes.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index(state: State) -> HTMLResponse:
    return HTMLResponse(state.page)


@routes.get("/health")
async def health(state: State) -> dict[str, Any]:
    predictor = state.predictor
    pre = predictor.pre
    return {
        "status": "ok",
        "arch": predictor.arch,
        "classes": len(predictor.classes),
        "input_size": predictor.size,
        # Multi-band models only: an RGB model's answer stays as it was.
        **({"bands": pre.bands, "band_names": pre.band_names} if pre.bands else {}),
    }


@routes.get("/classes")
async def classes(state: State) -> dict[str, Any]:
    return {"classes": state.predictor.classes}


@routes.get("/metrics")
async def get_metrics(state: State) -> dict[str, Any]:
    return state.metrics.as_dict()


@routes.post("/predict")
async def predict(request: Request, state: State) -> dict[str, Any]:
    items = await read_images(request, state.max_files)
    return {"predictions": await state.predict(items)}


@routes.post("/cam", response_model=None)
async def cam(
    request: Request,
    state: State,
    class_name: str | None = Query(None, alias="class"),
    format: Literal["png", "json"] = "png",
    show: str | None = None,
) -> Response | dict[str, Any]:
    predictor = state.predictor
    try:
        class_idx = class_index(predictor.classes, class_name)
        pre = shown_as(predictor.pre, show)
    except UserError as e:
        raise ApiError(422, str(e)) from None
    items = await read_images(request, 1)
    (image,) = await state.decode(items)
    png, shown, idx, prob = await state.worker.call(_cam_pngs, predictor, image, class_idx, pre)
    if format == "json":
        return {
            "file": items[0][0],
            "class": predictor.classes[idx],
            "probability": round(prob, 6),
            "png": base64.b64encode(png).decode(),
            "image": base64.b64encode(shown).decode(),
        }
    return Response(png, media_type="image/png")


@routes.post("/map", response_model=None)
async def map_upload(
    request: Request,
    state: State,
    tile: int | None = Query(None, ge=8),
    stride: int | None = Query(None, ge=1),
    format: Literal["json", "png"] = "json",
) -> Response | dict[str, Any]:
    ((name, data),) = await read_images(request, 1)
    summary, png = await state.mapper.map(name, data, tile, stride)
    if format == "png":
        return Response(png, media_type="image/png")
    return {"summary": summary, "overlay": base64.b64encode(png).decode()}


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServeState = app.state.serve
    await state.start()
    yield
    await state.stop()


def create_app(
    ckpt_path: str | Path,
    *,
    device: str = "cpu",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    topk: int = DEFAULT_TOPK,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode_workers: int = DEFAULT_DECODE_WORKERS,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    allowed_hosts: Sequence[str] | None = None,
    map_queue: int = DEFAULT_MAP_QUEUE,
    map_windows: int = DEFAULT_MAP_WINDOWS,
) -> FastAPI:
    """The app for one checkpoint, loaded now (a bad checkpoint fails here, not per request).

    ``allowed_hosts``: the names a request's Host header may give (None: any, for a server
    bound to every interface or a test client). ``map_queue``: ``/map`` requests admitted at
    once; ``map_windows``: the windows one may ask for.
    """
    state = ServeState.load(
        ckpt_path,
        device=device,
        max_files=max_files,
        topk=topk,
        batch_wait_ms=batch_wait_ms,
        max_batch=max_batch,
        max_pixels=max_pixels,
        decode_workers=decode_workers,
        map_queue=map_queue,
        map_windows=map_windows,
    )
    app = FastAPI(title="rsscene", lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    app.state.predictor = state.predictor
    app.state.metrics = state.metrics
    # Added last = outermost: metrics also count what BodyLimit and HostCheck refuse.
    app.add_middleware(BodyLimit, max_bytes=max_bytes, timeout=body_timeout)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    _answer_errors(app)
    app.include_router(routes)
    return app
