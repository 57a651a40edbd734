"""Map a multispectral region delivered as a STAC item, one COG per band at its native resolution.

    python benchmarks/eurosat_region.py --data ../shared/data/eurosat-ms --workdir eurosat-region \\
        --figure docs/eurosat-region.png

Splits the EuroSAT patches (``--test-ratio 0.25 --seed 0``, as ``benchmarks/bands.py``) and
trains a 13-band ResNet-18 on the training part. The test patches, which the model never saw,
are laid side by side into a region of known classes (6 x 9 patches of 64 px at 10 m, in the
first patch's UTM CRS; cells without a patch are nodata), and the region is written twice:

- ``10m/``: a STAC item of 13 COGs at 10 m, the patches' own pixels;
- ``native/``: the same as Sentinel-2 delivers it, each band at its native resolution
  (B02, B03, B04, B08 at 10 m; B05, B06, B07, B8A, B11, B12 at 20 m; B01, B09, B10 at 60 m:
  the mean of each 2 x 2 or 6 x 6 block), stacked back onto the 10 m grid by ``rsscene map``
  (bilinear).

Each is mapped with ``rsscene.mapping.map_scene`` (a 64 px window per patch) and its
per-patch accuracy printed beside the model's test accuracy on the same patches read as files,
with the share of patches whose class the map and the file agree on.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pystac
import rasterio
from affine import Affine
from rasterio.warp import transform_bounds

from rsscene.config import build
from rsscene.data.prepare import prepare
from rsscene.engine.train import Trainer
from rsscene.inference import Predictor
from rsscene.mapping import map_scene
from rsscene.mapping.stack import read_stac

# EuroSAT's band order (TorchGeo's names), and each band's native resolution in metres.
BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
NATIVE = {"B01": 60, "B09": 60, "B10": 60, "B05": 20, "B06": 20, "B07": 20, "B8A": 20}
NATIVE |= {"B11": 20, "B12": 20}
PATCH, PIXEL = 64, 10
# 6 x 9 patches: both sides are whole 60 m pixels (3 patches are 1,920 m), as in a real tile.
ROWS, COLS = 6, 9


def patches(split: Path) -> list[tuple[Path, str]]:
    """The split's test patches with their classes, class by class."""
    files = sorted((split / "test").glob("*/*.tif"))
    return [(f, f.parent.name) for f in files]


def mosaic(cells: list[tuple[Path, str]]) -> tuple[np.ndarray, dict]:
    """The patches laid row by row into one 13-band array (0 where no patch), and the first
    patch's georeference moved to the region's top-left corner."""
    if len(cells) > ROWS * COLS:
        raise SystemExit(f"{len(cells)} test patches do not fit a {ROWS}x{COLS} region")
    region = np.zeros((len(BANDS), ROWS * PATCH, COLS * PATCH), dtype=np.uint16)
    for k, (path, _) in enumerate(cells):
        r, c = divmod(k, COLS)
        with rasterio.open(path) as src:
            region[:, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = src.read()
    with rasterio.open(cells[0][0]) as first:
        crs, t = first.crs, first.transform
    origin = Affine(PIXEL, 0, round(t.c, -3), 0, -PIXEL, round(t.f, -3))
    return region, {"crs": crs, "transform": origin}


def block_mean(band: np.ndarray, f: int) -> np.ndarray:
    """``band`` at ``f`` times coarser pixels: each block's mean over its non-nodata pixels."""
    h, w = band.shape[0] // f, band.shape[1] // f
    blocks = band.reshape(h, f, w, f).astype(np.float64)
    valid = (blocks > 0).sum((1, 3))
    return np.where(valid > 0, blocks.sum((1, 3)) / np.maximum(valid, 1), 0).round()


def write_item(region: np.ndarray, geo: dict, folder: Path, native: bool) -> Path:
    """One COG per band (at its native resolution when ``native``) and a STAC item for them."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = rasterio.transform.array_bounds(region.shape[1], region.shape[2], geo["transform"])
    lon_lat = transform_bounds(geo["crs"], "EPSG:4326", *bounds)
    item = pystac.Item(
        id=f"eurosat-region-{'native' if native else '10m'}",
        geometry={"type": "Polygon", "coordinates": [_ring(lon_lat)]},
        bbox=list(lon_lat),
        datetime=datetime(2017, 6, 1),
        properties={"proj:code": geo["crs"].to_string()},
    )
    for b, name in enumerate(BANDS):
        f = NATIVE.get(name, PIXEL) // PIXEL if native else 1
        band = block_mean(region[b], f).astype(np.uint16) if f > 1 else region[b]
        path = folder / f"{name}.tif"
        profile = {
            "driver": "COG",
            "width": band.shape[1],
            "height": band.shape[0],
            "count": 1,
            "dtype": "uint16",
            "crs": geo["crs"],
            "transform": geo["transform"] * Affine.scale(f),
            "nodata": 0,
            "compress": "deflate",
        }
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(band, 1)
        item.add_asset(
            name,
            pystac.Asset(
                href=path.name,
                media_type=pystac.MediaType.COG,
                roles=["data"],
                extra_fields={"eo:bands": [{"name": name}], "gsd": PIXEL * f},
            ),
        )
    path = folder / "item.json"
    path.write_text(json.dumps(item.to_dict(include_self_link=False, transform_hrefs=False)))
    return path


def _ring(b: tuple[float, ...]) -> list[list[float]]:
    return [[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]], [b[0], b[1]]]


def write_truth(cells: list[tuple[Path, str]], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "col", "class"])
        for k, (_, name) in enumerate(cells):
            w.writerow([*divmod(k, COLS), name])
    return path


def file_classes(predictor: Predictor, cells: list[tuple[Path, str]]) -> list[str]:
    """Each patch's class read as a file, as ``rsscene predict`` reads it."""
    probs = predictor.probabilities([predictor.load(p) for p, _ in cells])
    return [predictor.classes[int(i)] for i in probs.argmax(1)]


def map_classes(predictor: Predictor, item: Path, out: Path, truth: Path) -> tuple[list, dict]:
    """The region's map: each patch cell's class, and the map's summary."""
    (stack,) = read_stac(item, assets=BANDS)
    summary = map_scene(predictor, stack, out, truth=truth, force=True, amp="off")
    with rasterio.open(out / "classes.tif") as src:
        classes = src.read(1)
    return classes, summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="EuroSAT-MS class folders")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--workdir", type=Path, help="keep the split, run and region here")
    p.add_argument("--figure", type=Path, help="copy the native region's overlay here")
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        split = work / "split"
        prepare(args.data, split, test_ratio=0.25, seed=0, mode="symlink", force=True)
        run = work / "run"
        settings = {"epochs": args.epochs, "img_size": args.img_size, "batch_size": 32}
        cfg = build({"data": str(split), "bands": "all", "out": str(run), **settings})
        report = Trainer.from_config(cfg, log=lambda *_: None, force=True).fit()
        predictor = Predictor(run / "last.pt")
        # The overlay in true colour: B04, B03, B02 (the model's first three are B01-B03).
        predictor.pre = predictor.pre.shown_as([4, 3, 2])
        cells = patches(split)
        truth = write_truth(cells, work / "truth.csv")
        as_files = file_classes(predictor, cells)
        region, geo = mosaic(cells)
        rows = {"files": _scored(as_files, as_files, cells)}
        for kind in ("10m", "native"):
            item = write_item(region, geo, work / kind, native=kind == "native")
            classes, summary = map_classes(predictor, item, work / f"map-{kind}", truth)
            mapped = [predictor.classes[classes[divmod(k, COLS)]] for k in range(len(cells))]
            rows[kind] = _scored(mapped, as_files, cells) | {"summary": summary["truth"]}
        if args.figure:
            shutil.copyfile(work / "map-native" / "overlay.png", args.figure)
    _print(report, rows, len(cells))
    if args.json:
        args.json.write_text(json.dumps({"test": report["test_accuracy"], "rows": rows}, indent=2))
    return 0


def _scored(classes: list[str], as_files: list[str], cells: list[tuple[Path, str]]) -> dict:
    n = len(cells)
    return {
        "accuracy": sum(c == name for c, (_, name) in zip(classes, cells, strict=True)) / n,
        "agrees_with_files": sum(a == b for a, b in zip(classes, as_files, strict=True)) / n,
    }


def _print(report: dict, rows: dict, n: int) -> None:
    print(f"13-band model: test accuracy {report['test_accuracy']:.1%} on {n} patches\n")
    print("| read as | per-patch accuracy | same class as the file |")
    print("|---|---:|---:|")
    names = {
        "files": "each patch file (rsscene predict)",
        "10m": "STAC item, 13 COGs at 10 m (rsscene map)",
        "native": "STAC item, 13 COGs at 10/20/60 m, stacked bilinear (rsscene map)",
    }
    for kind, r in rows.items():
        print(f"| {names[kind]} | {r['accuracy']:.1%} | {r['agrees_with_files']:.1%} |")


if __name__ == "__main__":
    sys.exit(main())
