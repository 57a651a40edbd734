"""Load test for ``rsscene serve``: many concurrent clients, then a mix with bad requests.

Starts the server as a subprocess on a free 127.0.0.1 port, sends ``--requests`` single-image
``POST /predict`` requests from ``--concurrency`` clients and prints errors, latency p50/p99
and requests/s; then sends as many again with ``--bad-share`` of them bad (corrupt bytes, a
non-image, an empty body) and checks that none got a 5xx and that the server is still healthy.
Exits 1 if any request got a 5xx or failed, if a good request was not answered 200 or a bad
one not 4xx, or if ``--timeout`` ran out.

``--hostile`` adds to the bad share what an attacker would send: JSON nested 100,000 deep,
zero-filled PNGs that decode to 100 megapixels (alone, 16 in one request, and 16-bit), RGBA
and 16-bit zero-filled PNGs just under the server's pixel limit (valid images, answered 200,
that make it decode as much as it allows), and bodies sent halfway, then left to stall. It
watches the server meanwhile: ``/health`` every 0.2 s (every answer must be a 200) and its
resident memory from /proc (Linux), whose peak must stay under ``--max-rss-mib``.

``--map-load`` adds a third case: ``/predict`` latency while ``--maps`` large scenes
(``--map-size`` px a side) are mapped through ``POST /map`` at once, against ``/predict`` alone
just before, as a table of p50/p99 and their ratios. Every map must be answered 200 and every
prediction 200.

    python benchmarks/serve_load.py                       # random-init ResNet-18, 128 px
    python benchmarks/serve_load.py --ckpt runs/x/best.pt --requests 2000 --concurrency 32
    python benchmarks/serve_load.py --hostile
    python benchmarks/serve_load.py --map-load            # 4 maps of 2048 px scenes
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx
import numpy as np

from rsscene import checkpoint
from rsscene.checkpoint import Checkpoint, Preprocess
from rsscene.data.synthetic import CLASSES, image_rng, render_scene
from rsscene.models import create_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="checkpoint to serve (default: a random-init ResNet-18)")
    p.add_argument(
        "--img-size",
        type=int,
        help="side of the images sent (default: the model's input size; 128 for the built one)",
    )
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--bad-share", type=float, default=0.1, help="share of bad requests, run 2")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for everything")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--hostile", action="store_true", help="add hostile requests to run 2")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=40_000_000,
        help="the server's --max-pixels (default: its default)",
    )
    p.add_argument(
        "--body-timeout", type=float, default=3.0, help="the server's --body-timeout, seconds"
    )
    p.add_argument(
        "--max-rss-mib",
        type=float,
        default=3072,
        help="with --hostile: the bound on the server's peak resident memory (default: 0.8 GiB"
        " at rest, and 2 decoding threads at about 20 bytes a pixel of 40 MP each, and room)",
    )
    p.add_argument("--map-load", action="store_true", help="add /predict during /map requests")
    p.add_argument("--maps", type=int, default=4, help="with --map-load: /map requests at once")
    p.add_argument(
        "--map-size", type=int, default=2048, help="with --map-load: the scenes' side, px"
    )
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_checkpoint(path: Path, size: int) -> Path:
    """A random-init ResNet-18 over the built-in classes: what a trained one costs to serve."""
    model = create_model("resnet18", num_classes=len(CLASSES))
    record = Checkpoint(model.state_dict(), "resnet18", list(CLASSES), preprocess=Preprocess(size))
    return checkpoint.save(record, path)


def scene_pngs(size: int, n: int = 10) -> list[bytes]:
    out = []
    for i in range(n):
        img, _ = render_scene(CLASSES[i % len(CLASSES)], size, image_rng(1, i % len(CLASSES), i))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def zeros_png(width: int, height: int, kind: str = "rgb") -> bytes:
    """A PNG of black pixels (``rgb``, ``rgba`` or ``grey16``), compressed row by row so that
    a 100-megapixel one (300 KB) never exists decoded here."""
    color_type, depth, channels = {"rgb": (2, 8, 3), "rgba": (6, 8, 4), "grey16": (0, 16, 2)}[kind]

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    packer = zlib.compressobj(9)
    row = bytes(1 + width * channels)  # filter byte 0, then the row's zeros
    rows_per_step = max(1, 4_000_000 // len(row))
    idat = [
        packer.compress(row * min(rows_per_step, height - y))
        for y in range(0, height, rows_per_step)
    ]
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(idat) + packer.flush())
        + chunk(b"IEND", b"")
    )


# What each kind of request must get. Slow bodies are sent by hand, halfway, then stall.
EXPECTED = {
    "good": 200,
    "corrupt": 422,
    "not-image": 422,
    "empty": 400,
    "nested-json": 400,
    "png-bomb": 413,
    "16-png-bombs": 413,
    "16-bit-bomb": 413,
    "rgba-under-limit": 200,
    "16-bit-under-limit": 200,
    "slow-body": 408,
}
SLOW = "slow-body"


def hostile_requests(max_pixels: int) -> dict[str, dict]:
    """httpx keyword arguments for each hostile kind (the slow body: its JSON, sent by hand)."""
    bomb = zeros_png(10_000, 10_000)  # 100 megapixels, 300 MB decoded, about 300 KB
    side = int(max_pixels**0.5)  # a square just under the limit
    json_type = {"content-type": "application/json"}
    return {
        "nested-json": {"content": b"[" * 100_000 + b"]" * 100_000, "headers": json_type},
        "png-bomb": {"files": {"file": ("bomb.png", bomb)}},
        "16-png-bombs": {"files": [("files", (f"bomb{i}.png", bomb)) for i in range(16)]},
        "16-bit-bomb": {"files": {"file": ("bomb16.png", zeros_png(10_000, 10_000, "grey16"))}},
        "rgba-under-limit": {"files": {"file": ("rgba.png", zeros_png(side, side, "rgba"))}},
        "16-bit-under-limit": {"files": {"file": ("g16.png", zeros_png(side, side, "grey16"))}},
        SLOW: {"content": json.dumps({"image": "A" * 4000}).encode(), "headers": json_type},
    }


def jobs(
    n: int, bad_share: float, pngs: list[bytes], hostile: dict[str, dict] | None = None
) -> list[tuple[str, dict]]:
    """(kind, httpx keyword arguments) for ``n`` requests, ``bad_share`` of them bad, spread out."""
    bad = {
        "corrupt": {"files": {"file": ("corrupt.png", pngs[0][: len(pngs[0]) // 2])}},
        "not-image": {"files": {"file": ("notes.txt", b"this is not an image\n" * 20)}},
        "empty": {"content": b""},
        **(hostile or {}),
    }
    n_bad = round(n * bad_share)
    bad_at = set(np.linspace(0, n - 1, n_bad).round().astype(int).tolist()) if n_bad else set()
    out = []
    for i in range(n):
        if i in bad_at:
            kind = list(bad)[sum(k != "good" for k, _ in out) % len(bad)]  # each kind in turn
            out.append((kind, bad[kind]))
        else:
            out.append(("good", {"files": {"file": (f"scene{i}.png", pngs[i % len(pngs)])}}))
    return out


def scene_jpeg(pngs: list[bytes], side: int) -> bytes:
    """A ``side`` x ``side`` scene tiled with the benchmark's images, as JPEG (a few MB at
    most, within the server's default body limit)."""
    from PIL import Image

    tiles = [Image.open(io.BytesIO(data)).convert("RGB") for data in pngs]
    step = tiles[0].size[0]
    scene = Image.new("RGB", (side, side))
    for i, y in enumerate(range(0, side, step)):
        for j, x in enumerate(range(0, side, step)):
            scene.paste(tiles[(i * 7 + j) % len(tiles)], (x, y))
    buf = io.BytesIO()
    scene.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


async def stall_halfway(url: str, body: bytes, headers: dict[str, str]) -> int | None:
    """Send the headers and half of ``body``, then nothing more; the status the server answers
    (None if it never does)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = f"POST /predict HTTP/1.1\r\nHost: {host}\r\ncontent-length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(head.encode() + b"\r\n" + body[: len(body) // 2])
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 60)
        return int(status_line.split()[1]) if status_line else None
    except (OSError, IndexError, ValueError, asyncio.TimeoutError):
        return None
    finally:
        writer.close()


async def send_all(
    url: str, work: list[tuple[str, dict]], concurrency: int
) -> tuple[list[tuple[str, int | None, float]], float]:
    """Send ``work`` from ``concurrency`` clients; returns ([(kind, status, seconds)], wall s)."""
    results: list[tuple[str, int | None, float]] = []
    pending = iter(work)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def client_loop() -> None:
            for kind, kwargs in pending:  # one iterator shared by all clients
                start = time.perf_counter()
                try:
                    if kind == SLOW:
                        status = await stall_halfway(url, kwargs["content"], kwargs["headers"])
                    else:
                        status = (await client.post("/predict", **kwargs)).status_code
                except httpx.HTTPError:
                    status = None  # no answer at all: counts as a failure
                results.append((kind, status, time.perf_counter() - start))

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results, time.perf_counter() - started


def report(name: str, results: list[tuple[str, int | None, float]], wall: float) -> bool:
    """Print one run's figures; True when every answer was as expected."""
    good = [r for r in results if r[0] == "good"]
    bad = [r for r in results if r[0] != "good"]
    good_failed = sum(status != 200 for _, status, _ in good)
    bad_unexpected = sum(status != EXPECTED[kind] for kind, status, _ in bad)
    server_errors = sum(bool(status and status >= 500) for _, status, _ in results)
    no_answer = sum(status is None for _, status, _ in results)
    ms = np.array([s for _, status, s in good if status == 200]) * 1000
    p50, p99 = np.percentile(ms, [50, 99]) if len(ms) else (float("nan"),) * 2
    print(
        f"{name}: {len(results)} requests ({len(bad)} bad) in {wall:.1f} s ="
        f" {len(results) / wall:.1f} req/s; good answered 200: {len(good) - good_failed}/"
        f"{len(good)}; latency of good requests p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )
    print(
        f"{name}: 5xx: {server_errors}; no answer: {no_answer}; bad requests answered as"
        f" expected: {len(bad) - bad_unexpected}/{len(bad)}"
    )
    kinds = sorted({kind for kind, _, _ in bad})
    if len(kinds) > 3:  # the hostile run: what each kind got
        for kind in kinds:
            got = sorted({str(status) for k, status, _ in bad if k == kind})
            count = sum(k == kind for k, _, _ in bad)
            print(f"  {kind:<19} {count:>3} x  expected {EXPECTED[kind]}, got {', '.join(got)}")
    return not (good_failed or bad_unexpected or server_errors or no_answer)


async def predict_latencies(
    url: str, pngs: list[bytes], concurrency: int, count: int, until: asyncio.Event | None = None
) -> list[tuple[int | None, float]]:
    """(status, seconds) of single-image ``/predict`` requests from ``concurrency`` clients:
    ``count`` of them, or with ``until`` as many as each client sends before it is set."""
    results: list[tuple[int | None, float]] = []
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def client_loop() -> None:
            nonlocal sent
            while until is not None or sent < count:
                i, sent = sent, sent + 1
                files = {"file": (f"scene{i}.png", pngs[i % len(pngs)])}
                start = time.perf_counter()
                try:
                    status: int | None = (await client.post("/predict", files=files)).status_code
                except httpx.HTTPError:
                    status = None
                results.append((status, time.perf_counter() - start))
                if until is not None and until.is_set():
                    return

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results


async def send_maps(
    url: str, scene: bytes, n: int, timeout: float, done: asyncio.Event
) -> list[tuple[int | None, float, int]]:
    """``n`` ``POST /map`` of ``scene`` at once; (status, seconds to its answer, windows) each,
    in the order they finished. Sets ``done`` when the last one is answered."""
    finished: list[tuple[int | None, float, int]] = []
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:

        async def one(i: int) -> None:
            try:
                r = await client.post("/map", files={"file": (f"scene{i}.jpg", scene)})
                windows = r.json()["summary"]["windows"] if r.status_code == 200 else 0
                finished.append((r.status_code, time.perf_counter() - started, windows))
            except httpx.HTTPError:
                finished.append((None, time.perf_counter() - started, 0))

        try:
            await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            done.set()
    return finished


async def map_load(args: argparse.Namespace, url: str, pngs: list[bytes]) -> bool:
    """``/predict`` alone, then during ``--maps`` maps at once: a table of p50/p99 and their
    ratios; True when every map and every prediction was answered 200."""
    scene = scene_jpeg(pngs, args.map_size)
    alone = await predict_latencies(url, pngs, args.concurrency, args.requests)
    done = asyncio.Event()
    maps, during = await asyncio.gather(
        send_maps(url, scene, args.maps, args.timeout, done),
        predict_latencies(url, pngs, args.concurrency, 0, done),
    )
    rows = {"alone": alone, f"during {args.maps} /map": during}
    base = np.percentile([s for _, s in alone], [50, 99]) * 1000
    print(
        f"\n/predict while {args.maps} scenes of {args.map_size} px ({len(scene):,} bytes"
        f" JPEG) are mapped; {args.concurrency} clients"
    )
    print("| /predict | requests | p50 | p99 | p50 ratio | p99 ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, results in rows.items():
        p50, p99 = np.percentile([s for _, s in results], [50, 99]) * 1000
        print(
            f"| {name} | {len(results)} | {p50:,.0f} ms | {p99:,.0f} ms |"
            f" {p50 / base[0]:.2f} | {p99 / base[1]:.2f} |"
        )
    print(
        f"/map: statuses {', '.join(str(s) for s, _, _ in maps)}; {max(w for _, _, w in maps):,} windows each;"
        f" answered at {', '.join(f'{t:.1f}' for _, t, _ in maps)} s"
    )
    statuses = [s for s, _, _ in maps] + [s for _, results in rows.items() for s, _ in results]
    ok = all(s == 200 for s in statuses)
    print(f"map load: 5xx: {sum(bool(s and s >= 500) for s in statuses)}; all answered 200: {ok}")
    return ok


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """The server's resident memory (VmRSS) or its peak so far (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


async def watch(url: str, pid: int, stop: asyncio.Event) -> dict[str, float]:
    """Poll /health every 0.2 s and the server's memory every 0.1 s until ``stop``."""
    health: list[tuple[int | None, float]] = []
    rss: list[float] = []

    async def poll_health() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    status: int | None = (await client.get("/health")).status_code
                except httpx.HTTPError:
                    status = None
                health.append((status, time.perf_counter() - start))
                await asyncio.sleep(0.2)

    async def poll_rss() -> None:
        while not stop.is_set():
            rss.append(rss_mib(pid))
            await asyncio.sleep(0.1)

    await asyncio.gather(poll_health(), poll_rss())
    ms = np.array([s for _, s in health]) * 1000
    return {
        "health_checks": len(health),
        "health_not_200": sum(status != 200 for status, _ in health),
        "health_p50_ms": float(np.percentile(ms, 50)),
        "health_p99_ms": float(np.percentile(ms, 99)),
        "health_max_ms": float(ms.max()),
        "rss_sampled_max_mib": max(rss),
    }


async def benchmark(
    args: argparse.Namespace, url: str, pngs: list[bytes], server: subprocess.Popen
) -> bool:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        results, wall = await send_all(url, jobs(args.requests, 0.0, pngs), args.concurrency)
        ok = report("run 1 (all good)", results, wall)
        hostile = hostile_requests(args.max_pixels) if args.hostile else None
        rss_before = rss_mib(server.pid)
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(url, server.pid, stop))
        mixed, wall = await send_all(
            url, jobs(args.requests, args.bad_share, pngs, hostile), args.concurrency
        )
        stop.set()
        seen = await watcher
        ok = report("run 2 (mixed, hostile)" if hostile else "run 2 (mixed)", mixed, wall) and ok
        peak = rss_mib(server.pid, "VmHWM")
        print(
            f"during run 2: /health answered {seen['health_checks'] - seen['health_not_200']}/"
            f"{seen['health_checks']} polls with 200, p50 {seen['health_p50_ms']:.1f} ms,"
            f" p99 {seen['health_p99_ms']:.1f} ms, max {seen['health_max_ms']:.1f} ms;"
            f" server RSS {rss_before:.0f} MiB before, peak {peak:.0f} MiB"
            + (f" (bound {args.max_rss_mib:.0f} MiB)" if args.hostile else "")
        )
        ok = ok and seen["health_not_200"] == 0
        if args.hostile and peak > args.max_rss_mib:
            print(f"FAIL: peak RSS {peak:.0f} MiB is over the bound of {args.max_rss_mib:.0f}")
            ok = False
        if args.map_load:
            ok = await map_load(args, url, pngs) and ok
        health = await client.get("/health")
        metrics = (await client.get("/metrics")).json()
    print(
        f"server after both runs: /health {health.status_code}; {metrics['model_calls']} model"
        f" calls for {metrics['images_predicted']} images"
        f" (mean batch {metrics['images_predicted'] / max(metrics['model_calls'], 1):.1f});"
        f" status counts {metrics['status']}"
    )
    return ok and health.status_code == 200


def wait_until_up(url: str, server: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError("the server did not come up in time")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory(prefix="rsscene-load-") as tmp:
        if args.ckpt:
            ckpt = Path(args.ckpt)
            size = args.img_size or int(checkpoint.load(ckpt).preprocess.size)
        else:
            size = args.img_size or 128
            ckpt = random_checkpoint(Path(tmp) / "resnet18.pt", size)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = Path(tmp) / "server.log"
        command = [sys.executable, "-m", "rsscene", "serve", str(ckpt), "--port", str(port)]
        command += ["--batch-wait-ms", str(args.batch_wait_ms)]
        command += ["--max-pixels", str(args.max_pixels), "--body-timeout", str(args.body_timeout)]
        print(f"serving {ckpt} at {url}; {args.concurrency} clients, {size} px PNG images")
        with log_path.open("w") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        try:
            wait_until_up(url, server, deadline)
            left = deadline - time.monotonic()
            run = benchmark(args, url, scene_pngs(size), server)
            ok = asyncio.run(asyncio.wait_for(run, left))
        except (TimeoutError, asyncio.TimeoutError, RuntimeError) as e:
            print(f"FAILED: {e or 'timed out'}; server log:\n{log_path.read_text()[-3000:]}")
            return 1
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
    print("PASS" if ok else "FAIL: see the counts above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
