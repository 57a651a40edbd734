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

The model's weights are random: speed and memory do not depend on what it learned.
"""

from __future__ import annotations

import argparse
import json
import resource
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=20000, help="scene side in pixels")
    p.add_argument("--tile", type=int, default=256, help="window side in pixels")
    p.add_argument("--img-size", type=int, default=128, help="the model's input size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loop-tiles", type=int, default=200, help="tiles the per-tile loop times")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    # Set for the child processes, each of which reports its own peak memory.
    p.add_argument("--loop", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--map", nargs=4, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_scene(path: Path, size: int, work: Path) -> None:
    """A ``size`` x ``size`` GeoTIFF of built-in scenes, written block by block."""
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
        "transform": from_origin(500000.0, 4500000.0, 0.5, 0.5),
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


def child(args: argparse.Namespace) -> dict:
    """The per-tile loop or the map, in this process, with this process's peak memory."""
    if args.loop:
        result = per_tile_loop(*args.loop, args.tile, args.loop_tiles)
    else:
        result = run_map(*args.map, args.batch_size)
    return {**result, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.loop or args.map:
        print(json.dumps(child(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="rsscene-map-") as tmp:
        work = Path(tmp)
        ckpt = work / "model.pt"
        model = create_model("resnet18", num_classes=len(CLASSES))
        pre = Preprocess(args.img_size, source_size=args.tile)
        checkpoint.save(
            Checkpoint(model.state_dict(), "resnet18", list(CLASSES), preprocess=pre), ckpt
        )
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
