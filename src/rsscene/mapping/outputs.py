"""What a map writes: the class raster (a cloud-optimised GeoTIFF with the scene's CRS, or
PNG), probabilities, an overlay with a legend, the cells as CSV or GeoJSON, and a summary with
area per class."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rsscene.data.bands import Preprocess
from rsscene.errors import UserError
from rsscene.mapping.scenes import Scene, as_rgb8
from rsscene.mapping.tiling import NODATA_CLASS, MapResult

PREVIEW_SIDE = 1200
# classes.tif and probabilities.tif are cloud-optimised GeoTIFFs (GDAL's COG driver: tiled,
# overviews inside, laid out for range reads). Their cells are windows, so a map is a few
# hundred cells a side: 256-cell blocks (GDAL's default is 512) keep a small map in one block
# and give one over 256 cells a side overviews, which the driver makes by halving until the
# smallest fits in a block (its default OVERVIEW_COUNT), so a GIS zoomed out reads those.
COG = {"driver": "COG", "blocksize": 256, "compress": "deflate", "overviews": "AUTO"}


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in dicts, lists and tuples) as None: JSON
    has no such numbers, and a reader of the map should see "unknown", not a parse error."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, value: Any, indent: int | None = 2) -> Path:
    """``value`` as strict JSON (no NaN or Infinity, which most parsers reject)."""
    path.write_text(json.dumps(finite(value), indent=indent, allow_nan=False) + "\n")
    return path


@contextmanager
def _gdal_writing(path: Path) -> Iterator[None]:
    """GDAL's write errors (disk full, a folder in the way) as one line naming the file."""
    import rasterio

    try:
        yield
    except (rasterio.errors.RasterioError, rasterio.errors.CPLE_BaseError) as e:
        raise UserError(f"{path}: cannot write it ({e})") from None


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct colours (matplotlib's tab20, tab20b, tab20c, then hues)."""
    from matplotlib import colormaps

    colours = [colormaps[name](i)[:3] for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
    if n > len(colours):
        colours += [colormaps["hsv"](i / n)[:3] for i in range(n - len(colours))]
    return [tuple(round(255 * v) for v in c) for c in colours[:n]]


def cell_transform(scene: Scene, stride: int) -> Any:
    """Map coordinates of cell (col, row) corners: the scene's transform at cell resolution."""
    from affine import Affine

    return scene.transform @ Affine.scale(stride)


def cell_bounds(scene: Scene, result: MapResult, row: int, col: int) -> tuple[float, ...]:
    """(left, bottom, right, top) of a cell in map coordinates, as rasterio's window bounds."""
    s = result.grid.stride
    xs, ys = zip(
        *(
            scene.transform @ (x, y)
            for x in (col * s, (col + 1) * s)
            for y in (row * s, (row + 1) * s)
        ),
        strict=True,
    )
    return min(xs), min(ys), max(xs), max(ys)


def write_class_raster(out: Path, scene: Scene, result: MapResult) -> Path:
    """``classes.tif`` (a georeferenced cloud-optimised GeoTIFF with mode overviews, a colour
    table and the class names in its tags) or ``classes.png``."""
    classes, class_map = result.classes, result.class_map
    colours = palette(len(classes))
    if not scene.georeferenced:
        img = Image.fromarray(class_map, "P")
        flat = [v for c in colours for v in c]
        img.putpalette(flat + [0] * (768 - len(flat)))
        img.info["transparency"] = NODATA_CLASS
        img.save(out / "classes.png", transparency=NODATA_CLASS)
        return out / "classes.png"
    import rasterio

    path = out / "classes.tif"
    profile = {
        "driver": "GTiff",
        "width": result.grid.cols,
        "height": result.grid.rows,
        "count": 1,
        "dtype": "uint8",
        "crs": scene.crs,
        "transform": cell_transform(scene, result.grid.stride),
        "nodata": NODATA_CLASS,
        **COG,
        # An overview cell takes the class most of its cells have (nodata left out); nearest
        # would take one corner's. No predictor: differencing class indices made maps larger.
        "overview_resampling": "MODE",
        "predictor": "NO",
    }
    with _gdal_writing(path), rasterio.open(path, "w", **profile) as dst:
        dst.write(class_map, 1)
        dst.write_colormap(1, {i: (*c, 255) for i, c in enumerate(colours)})
        dst.set_band_description(1, "class index (255: nodata)")
        dst.update_tags(class_names=json.dumps(classes))
    return path


def write_probabilities(out: Path, scene: Scene, result: MapResult) -> Path:
    """``probabilities.tif``: one float32 band per class (NaN where nothing was mapped), a
    cloud-optimised GeoTIFF with averaged overviews."""
    import rasterio

    probs = result.probabilities.transpose(2, 0, 1).copy()
    probs[:, result.hits == 0] = np.nan
    profile = {
        "driver": "GTiff",
        "width": result.grid.cols,
        "height": result.grid.rows,
        "count": len(result.classes),
        "dtype": "float32",
        "nodata": float("nan"),
        **COG,
        # The mean probability of the mapped cells beneath (NaN is nodata, left out); the
        # floating-point predictor makes the file smaller.
        "overview_resampling": "AVERAGE",
        "predictor": "FLOATING_POINT",
    }
    if scene.georeferenced:
        profile.update(crs=scene.crs, transform=cell_transform(scene, result.grid.stride))
    path = out / "probabilities.tif"
    with _gdal_writing(path), rasterio.open(path, "w", **profile) as dst:
        dst.write(probs)
        for i, name in enumerate(result.classes, start=1):
            dst.set_band_description(i, name)
    return path


def write_overlay(
    out: Path, scene: Scene, result: MapResult, title: str, pre: Preprocess | None = None
) -> Path:
    """``overlay.png``: the scene (its display bands for a multi-band model, contrast-stretched)
    with its cells coloured by class, and a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    pixels = scene.preview(PREVIEW_SIDE)
    pick = scene.pick(pre) if pre is not None else None
    if pick is not None:  # the display bands, wherever the scene holds them
        pixels = pixels[[pick.indexes[i] - 1 for i in pre.display_bands()]]
    preview = Image.fromarray(as_rgb8(_stretched(pixels)).transpose(1, 2, 0))
    w, h = preview.size
    class_map, grid = result.class_map, result.grid
    colours = np.array([*palette(len(result.classes)), (0, 0, 0)], dtype=np.uint8)
    cells = np.zeros((grid.rows, grid.cols, 4), dtype=np.uint8)
    cells[..., :3] = colours[np.minimum(class_map, len(result.classes))]
    cells[..., 3] = np.where(class_map == NODATA_CLASS, 0, 115)
    # The cells cover the scene but for an edge strip narrower than a stride.
    size = (
        min(w, max(1, round(grid.cols * grid.stride * w / scene.width))),
        min(h, max(1, round(grid.rows * grid.stride * h / scene.height))),
    )
    blended = preview.convert("RGBA")
    blended.alpha_composite(Image.fromarray(cells, "RGBA").resize(size, Image.Resampling.NEAREST))
    fig, ax = plt.subplots(figsize=(8, 8 * h / w + 0.6), dpi=120)
    ax.imshow(blended)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    handles = [
        Patch(color=np.array(c) / 255, label=name)
        for c, name in zip(palette(len(result.classes)), result.classes, strict=True)
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.savefig(out / "overlay.png", bbox_inches="tight")
    plt.close(fig)
    return out / "overlay.png"


def _stretched(pixels: np.ndarray) -> np.ndarray:
    """Each band scaled from its 2nd to 98th percentile onto 0..255, for display only."""
    out = np.empty(pixels.shape, dtype=np.uint8)
    for b, band in enumerate(pixels.astype(np.float32)):
        finite = band[np.isfinite(band)]
        lo, hi = np.percentile(finite, (2, 98)) if finite.size else (0.0, 1.0)
        out[b] = np.clip((np.nan_to_num(band) - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255)
    return out


def cell_rows(scene: Scene, result: MapResult) -> list[dict[str, Any]]:
    """One record per cell: grid position, pixel and map bounds, class and its probability."""
    probs, class_map, s = result.probabilities, result.class_map, result.grid.stride
    rows = []
    for r in range(result.grid.rows):
        for c in range(result.grid.cols):
            k = int(class_map[r, c])
            record: dict[str, Any] = {
                "row": r,
                "col": c,
                "x0": c * s,
                "y0": r * s,
                "x1": (c + 1) * s,
                "y1": (r + 1) * s,
                "class": "nodata" if k == NODATA_CLASS else result.classes[k],
                "probability": None if k == NODATA_CLASS else round(float(probs[r, c, k]), 6),
            }
            if scene.georeferenced:
                keys = ("left", "bottom", "right", "top")
                record.update(zip(keys, cell_bounds(scene, result, r, c), strict=True))
            rows.append(record)
    return rows


def write_cells(out: Path, scene: Scene, result: MapResult, fmt: str) -> Path:
    """``tiles.csv`` or ``tiles.geojson`` (polygons in the scene's CRS, or in pixels)."""
    rows = cell_rows(scene, result)
    if fmt == "csv":
        path = out / "tiles.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path
    features = []
    for rec in rows:
        if scene.georeferenced:
            s = result.grid.stride
            x0, y0, x1, y1 = (
                rec["col"] * s,
                rec["row"] * s,
                (rec["col"] + 1) * s,
                (rec["row"] + 1) * s,
            )
            ring = [scene.transform @ p for p in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]
        else:
            ring = [(rec["x0"], rec["y0"]), (rec["x1"], rec["y0"]), (rec["x1"], rec["y1"])]
            ring += [(rec["x0"], rec["y1"]), (rec["x0"], rec["y0"])]
        props = {k: rec[k] for k in ("row", "col", "class", "probability")}
        geometry = {"type": "Polygon", "coordinates": [[list(p) for p in ring]]}
        features.append({"type": "Feature", "properties": props, "geometry": geometry})
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if scene.georeferenced:
        # Coordinates are in the scene's CRS, not WGS84: say which (the pre-2016 member).
        collection["crs"] = {"type": "name", "properties": {"name": scene.crs.to_string()}}
    return write_json(out / "tiles.geojson", collection, indent=None)


def summarize(scene: Scene, result: MapResult) -> dict[str, Any]:
    """Cells and area per class, nodata cells, and what the grid left out at the edges."""
    class_map, grid = result.class_map, result.grid
    counts = np.bincount(class_map.ravel(), minlength=256)
    area, unit = float(grid.stride**2), "px²"
    if scene.georeferenced:
        t = scene.transform
        area = abs(t.a * t.e - t.b * t.d) * grid.stride**2
        metres = (scene.crs.linear_units or "").lower() in ("metre", "meter", "metres", "meters")
        area, unit = (area / 1e6, "km²") if metres else (area, f"{scene.crs.linear_units}²")
    mapped = int(counts[: len(result.classes)].sum())
    per_class = {
        name: {
            "cells": int(counts[i]),
            "share": int(counts[i]) / mapped if mapped else 0.0,
            "area": int(counts[i]) * area,
        }
        for i, name in enumerate(result.classes)
    }
    return {
        "scene": str(scene.path),
        "size": [scene.width, scene.height],
        "bands": scene.count,
        "dtype": scene.dtype,
        "crs": scene.crs.to_string() if scene.georeferenced else None,
        "tile": grid.tile,
        "stride": grid.stride,
        "grid": [grid.rows, grid.cols],
        "windows": result.windows,
        "windows_skipped_nodata": result.skipped,
        "nodata_cells": int(counts[NODATA_CLASS]),
        "unmapped_edge_px": [
            scene.width - grid.cols * grid.stride,
            scene.height - grid.rows * grid.stride,
        ],
        "area_unit": unit,
        "cell_area": area,
        "per_class": per_class,
    }
