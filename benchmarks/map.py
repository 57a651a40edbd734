"""Tiles per second of ``rsscene map`` against a per-tile predict loop, and map's peak memory.

In one run, on one generated GeoTIFF scene (tiled, deflate-compressed, RGB uint8, built from
rsscene's built-in scenes) and one ResNet-18 checkpoint:

(a) a per-tile loop: each window read, converted and predicted on its own, in float32, as a
    script that calls ``Predictor.probabilities`` once per tile would; timed over
    ``--loop-tiles`` tiles;
(b) ``rsscene map --amp off`` on the whole scene: batched windows in float32, reading
    overlapped with the model;
(c) ``rsscene map`` as it runs by default: the same in bf16 and channels_last where the
    CPU or GPU has bf16.

Tiles per second are given over the prediction (reading, converting, the model) and over
the whole command (also loading the model, the overview and the output files).

Each runs in its own process, so each has its own peak resident memory::

    python benchmarks/map.py --size 20000 --tile 256 --img-size 128

With ``--scenes N``, a region instead: N scenes of ``--size`` px (default 5,000), generated
once into ``--workdir``, mapped by ``rsscene map`` in 1 process and in 2 (torchrun, Gloo on
the CPU, one thread each), side by side; the seconds, the scaling ratio and each process's
peak resident memory (the goal: under 1.5 GiB)::

    python benchmarks/map.py --scenes 16 --tile 256 --img-size 128 --workdir /tmp/region

The model's weights are random: speed and memory do not depend on what it learned.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rsscene import checkpoint
from rsscene.checkpoint import Checkpoint, Preprocess
from rsscene.data.synthetic import CLASSES, generate_mosaic
from rsscene.models import create_model

BLOCK = 1024
# The region case's goal for each process's peak resident memory.
PEAK_GOAL_MIB = 1.5 * 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--size", type=int, help="scene side in pixels (default 20,000; with --scenes 5,000)"
    )
    p.add_argument("--scenes", type=int, help="map a region of this many scenes instead")
    p.add_argument(
        "--workdir", type=Path, help="keep the region's scenes here between runs (default: temp)"
    )
    p.add_argument("--tile", type=int, default=256, help="window side in pixels")
    p.add_argument("--img-size", type=int, default=128, help="the model's input size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loop-tiles", type=int, default=200, help="tiles the per-tile loop times")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    # Set for the child processes, each of which reports its own peak memory.
    p.add_argument("--loop", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--map", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--region-map", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.size is None:
        args.size = 5000 if args.scenes else 20000
    return args


def write_scene(path: Path, size: int, work: Path, x0: float = 500000.0) -> None:
    """A ``size`` x ``size`` GeoTIFF of built-in scenes, written block by block, with its
    top-left corner at (``x0``, 4,500,000)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    generate_mosaic(work, BLOCK // 128, BLOCK // 128, size=128, seed=0)
    from PIL import Image

    block = np.asarray(Image.open(work / "mosaic.png")).transpose(2, 0, 1)
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": from_origin(x0, 4500000.0, 0.5, 0.5),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    with rasterio.open(path, "w", **profile) as dst:
        for y in range(0, size, BLOCK):
            for x in range(0, size, BLOCK):
                h, w = min(BLOCK, size - y), min(BLOCK, size - x)
                k = (x // BLOCK + y // BLOCK) % 4
                dst.write(
                    np.rot90(block, k, axes=(1, 2))[:, :h, :w].copy(), window=Window(x, y, w, h)
                )


def per_tile_loop(scene_path: str, ckpt: str, tile: int, tiles: int) -> dict:
    """Read, convert and predict one window at a time."""
    from torchvision.transforms.v2 import functional as TF

    from rsscene.inference import Predictor
    from rsscene.mapping.scenes import as_rgb8, open_scene

    predictor, scene = Predictor(ckpt), open_scene(scene_path)
    per_row = scene.width // tile
    start = time.perf_counter()
    for n in range(tiles):
        pixels, _ = scene.read((n % per_row) * tile, (n // per_row) * tile, tile, tile)
        x = TF.resize(
            torch.from_numpy(as_rgb8(pixels).copy()), [predictor.size] * 2, antialias=True
        )
        predictor.probabilities([x])
    seconds = time.perf_counter() - start
    scene.close()
    return {"tiles": tiles, "seconds": seconds, "predict": seconds}


def run_map(scene: str, ckpt: str, out: str, amp: str, batch_size: int) -> dict:
    from rsscene.cli import main as rsscene

    start = time.perf_counter()
    rsscene(["map", ckpt, scene, "--out", out, "--batch-size", str(batch_size), "--amp", amp])
    seconds = time.perf_counter() - start
    summary = json.loads((Path(out) / "summary.json").read_text())
    return {"tiles": summary["windows"], "seconds": seconds, "predict": summary["predict_seconds"]}


def map_region(scenes: str, ckpt: str, out: str, amp: str, batch_size: int) -> dict:
    """``rsscene map`` of a folder of scenes (a region), in this process or this rank."""
    from rsscene.cli import main as rsscene

    argv = ["map", ckpt, scenes, "--out", out, "--batch-size", str(batch_size), "--amp", amp]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # this process's JSON line is the output
        code = rsscene(argv)
    return {
        "rank": int(os.environ.get("RANK", 0)),
        "code": code,
        "seconds": time.perf_counter() - start,
    }


def child(args: argparse.Namespace) -> dict:
    """The per-tile loop or a map, in this process, with this process's peak memory."""
    if args.loop:
        result = per_tile_loop(*args.loop, args.tile, args.loop_tiles)
    elif args.region_map:
        result = map_region(*args.region_map, args.batch_size)
    else:
        result = run_map(*args.map, args.batch_size)
    return {**result, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def save_checkpoint(path: Path, args: argparse.Namespace) -> Path:
    """A random-weight ResNet-18 that reads ``--tile`` px windows at ``--img-size``."""
    model = create_model("resnet18", num_classes=len(CLASSES))
    pre = Preprocess(args.img_size, source_size=args.tile)
    checkpoint.save(Checkpoint(model.state_dict(), "resnet18", list(CLASSES), preprocess=pre), path)
    return path


def region_scenes(folder: Path, count: int, size: int) -> float:
    """``count`` scenes side by side in ``folder`` (kept from an earlier run with the same
    count and size); the seconds spent writing them."""
    started = time.perf_counter()
    done = folder / f"{count}x{size}.done"
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for old in [*folder.glob("*.tif"), *folder.glob("*.done")]:  # another count or size
            old.unlink()
        for n in range(count):
            write_scene(
                folder / f"scene{n:02d}.tif",
                size,
                folder.parent / "blocks",
                500000.0 + n * size / 2,
            )
        done.write_text("")
    return time.perf_counter() - started


def region_case(args: argparse.Namespace, work: Path) -> int:
    """A region mapped in 1 process and in 2 (torchrun), side by side."""
    ckpt = save_checkpoint(work / "model.pt", args)
    scenes = work / "scenes"
    written = region_scenes(scenes, args.scenes, args.size)
    me = [sys.executable, __file__, "--tile", str(args.tile), "--batch-size", str(args.batch_size)]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two += me[1:]
    runs = {}
    for name, cmd in [("1 process", me), ("2 processes (torchrun)", two)]:
        out = work / name.split()[0]
        shutil.rmtree(out, ignore_errors=True)  # an earlier run's map would be skipped
        started = time.perf_counter()
        done = subprocess.run(
            [*cmd, "--region-map", str(scenes), str(ckpt), str(out), "auto"],
            check=True,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - started
        ranks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        assert all(r["code"] == 0 for r in ranks), done.stderr[-2000:]
        region = json.loads((out / "region.json").read_text())
        runs[name] = {"seconds": seconds, "windows": region["windows"], "ranks": ranks}
        # The slowest rank, from the start of `rsscene map` in it (loading the model, joining
        # the process group) to its end: the region's time without starting Python and torch.
        runs[name]["map_seconds"] = max(r["seconds"] for r in ranks)
    print_region(args, written, runs, torch.get_num_threads())
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        Path(args.json).write_text(json.dumps({"settings": settings, "runs": runs}, indent=2))
    return 0


def print_region(args: argparse.Namespace, written: float, runs: dict, threads: int) -> None:
    print(
        f"region: {args.scenes} scenes of {args.size}x{args.size} px RGB GeoTIFF"
        f" ({args.scenes * args.size**2 / 1e6:,.0f} megapixels; written in {written:.0f} s),"
        f" tiles of {args.tile} px, model input {args.img_size} px, ResNet-18, --amp auto;"
        f" 1 process with {threads} torch threads, 2 processes with 1 each"
    )
    print(
        "| run | tiles | seconds, whole command | seconds in map | tiles/s in map"
        " | peak RSS MiB per process | under 1.5 GiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, r in runs.items():
        peaks = [p["peak_rss_mib"] for p in sorted(r["ranks"], key=lambda p: p["rank"])]
        under = "yes" if max(peaks) < PEAK_GOAL_MIB else "**no**"
        print(
            f"| {name} | {r['windows']} | {r['seconds']:.1f} | {r['map_seconds']:.1f}"
            f" | {r['windows'] / r['map_seconds']:.1f} | {', '.join(f'{p:.0f}' for p in peaks)}"
            f" | {under} |"
        )
    one, two = runs.values()
    print(
        f"scaling, 2 processes over 1: {one['map_seconds'] / two['map_seconds']:.2f}x in map,"
        f" {one['seconds'] / two['seconds']:.2f}x over the whole commands"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.loop or args.map or args.region_map:
        # One write of under PIPE_BUF bytes is atomic, so two torchrun ranks sharing a pipe
        # cannot interleave their lines (print's separate writes of text and newline can).
        sys.stdout.flush()
        os.write(sys.stdout.fileno(), (json.dumps(child(args)) + "\n").encode())
        return 0
    if args.scenes:
        if args.workdir:
            return region_case(args, args.workdir)
        with tempfile.TemporaryDirectory(prefix="rsscene-region-") as tmp:
            return region_case(args, Path(tmp))
    with tempfile.TemporaryDirectory(prefix="rsscene-map-") as tmp:
        work = Path(tmp)
        ckpt = save_checkpoint(work / "model.pt", args)
        scene = work / "scene.tif"
        started = time.perf_counter()
        write_scene(scene, args.size, work / "blocks")
        written = time.perf_counter() - started

        base = [sys.executable, __file__, "--tile", str(args.tile), "--batch-size"]
        base += [str(args.batch_size), "--loop-tiles", str(args.loop_tiles)]
        runs = {}
        for name, extra in [
            ("(a) per-tile loop", ["--loop", str(scene), str(ckpt)]),
            ("(b) rsscene map --amp off", ["--map", str(scene), str(ckpt), str(work / "b"), "off"]),
            ("(c) rsscene map", ["--map", str(scene), str(ckpt), str(work / "c"), "auto"]),
        ]:
            done = subprocess.run([*base, *extra], check=True, capture_output=True, text=True)
            runs[name] = json.loads(done.stdout.strip().splitlines()[-1])

    base = runs["(a) per-tile loop"]["tiles"] / runs["(a) per-tile loop"]["predict"]
    print(
        f"scene {args.size}x{args.size} px RGB GeoTIFF (written in {written:.0f} s), tiles of"
        f" {args.tile} px, model input {args.img_size} px, ResNet-18, torch threads"
        f" {torch.get_num_threads()}"
    )
    print("| run | tiles | tiles/s predicting | x(a) | tiles/s, whole command | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in runs.items():
        rate = r["tiles"] / r["predict"]
        print(
            f"| {name} | {r['tiles']} | {rate:.1f} | {rate / base:.2f}"
            f" | {r['tiles'] / r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
