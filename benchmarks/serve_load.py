"""Load test for ``rsscene serve``: many concurrent clients, then a mix with bad requests.

Starts the server as a subprocess on a free 127.0.0.1 port, sends ``--requests`` single-image
``POST /predict`` requests from ``--concurrency`` clients and prints errors, latency p50/p99
and requests/s; then sends as many again with ``--bad-share`` of them bad (corrupt bytes, a
non-image, an empty body) and checks that none got a 5xx and that the server is still healthy.
Exits 1 if any request got a 5xx or failed, if a good request was not answered 200 or a bad
one not 4xx, or if ``--timeout`` ran out.

    python benchmarks/serve_load.py                       # random-init ResNet-18, 128 px
    python benchmarks/serve_load.py --ckpt runs/x/best.pt --requests 2000 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
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
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for everything")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
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


def jobs(n: int, bad_share: float, pngs: list[bytes]) -> list[tuple[str, dict]]:
    """(kind, httpx keyword arguments) for ``n`` requests, ``bad_share`` of them bad, spread out."""
    bad = {
        "corrupt": {"files": {"file": ("corrupt.png", pngs[0][: len(pngs[0]) // 2])}},
        "not-image": {"files": {"file": ("notes.txt", b"this is not an image\n" * 20)}},
        "empty": {"content": b""},
    }
    n_bad = round(n * bad_share)
    bad_at = set(np.linspace(0, n - 1, n_bad).round().astype(int).tolist()) if n_bad else set()
    out = []
    for i in range(n):
        if i in bad_at:
            kind = list(bad)[len(out) % len(bad)]
            out.append((kind, bad[kind]))
        else:
            out.append(("good", {"files": {"file": (f"scene{i}.png", pngs[i % len(pngs)])}}))
    return out


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
                    status: int | None = (await client.post("/predict", **kwargs)).status_code
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
    bad_not_4xx = sum(not (status and 400 <= status < 500) for _, status, _ in bad)
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
        f"{name}: 5xx: {server_errors}; no answer: {no_answer}; bad requests answered 4xx:"
        f" {len(bad) - bad_not_4xx}/{len(bad)}"
    )
    return not (good_failed or bad_not_4xx or server_errors or no_answer)


async def benchmark(args: argparse.Namespace, url: str, pngs: list[bytes]) -> bool:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        results, wall = await send_all(url, jobs(args.requests, 0.0, pngs), args.concurrency)
        ok = report("run 1 (all good)", results, wall)
        mixed, wall = await send_all(
            url, jobs(args.requests, args.bad_share, pngs), args.concurrency
        )
        ok = report("run 2 (mixed)", mixed, wall) and ok
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
        print(f"serving {ckpt} at {url}; {args.concurrency} clients, {size} px PNG images")
        with log_path.open("w") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        try:
            wait_until_up(url, server, deadline)
            left = deadline - time.monotonic()
            ok = asyncio.run(asyncio.wait_for(benchmark(args, url, scene_pngs(size)), left))
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
