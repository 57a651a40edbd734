"""Map a whole scene: windows over a large image → batched prediction → a land-use map.

:func:`map_scene` reads the scene window by window (:mod:`.scenes`), predicts the windows in
batches (:mod:`.tiling`) and writes, in its output folder (:mod:`.outputs`): ``classes.tif``
(class index per cell, with the scene's CRS and a transform that places every cell exactly;
``classes.png`` where the scene has no georeference), ``probabilities.tif`` on request,
``overlay.png``, ``tiles.csv`` or ``tiles.geojson``, and ``summary.json``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch

from rsscene.device import amp_dtype
from rsscene.errors import UserError
from rsscene.inference import Predictor
from rsscene.mapping import outputs
from rsscene.mapping.scenes import Scene, check_bands, open_scene
from rsscene.mapping.tiling import MapResult, make_grid, predict_scene

__all__ = [
    "MapResult",
    "Scene",
    "default_tile",
    "format_summary",
    "map_scene",
    "open_scene",
    "tile_accuracy",
]


def default_tile(predictor: Predictor, scene: Scene, tile_m: float | None = None) -> int:
    """The window in source pixels: ``tile_m`` metres on the ground, else the size of the
    images the model was trained on (as recorded in its checkpoint), else its input size."""
    if tile_m is None:
        return predictor.ckpt.preprocess.source_size or predictor.size
    if not scene.georeferenced:
        raise UserError(f"--tile-m needs a georeferenced scene; {scene.path} has no CRS")
    units = (scene.crs.linear_units or "").lower()
    if units not in ("metre", "meter", "metres", "meters"):
        raise UserError(f"--tile-m: {scene.path} is in {units or 'unknown'} units, not metres")
    return max(1, round(tile_m / abs(scene.transform.a)))


def tile_accuracy(result: MapResult, truth: str | Path) -> dict[str, Any]:
    """The share of cells whose class matches a CSV of ``row,col,class`` (e.g. a mosaic's)."""
    path = Path(truth)
    try:
        with path.open(newline="") as f:
            rows = [(int(r["row"]), int(r["col"]), r["class"]) for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"{path}: not a CSV of row,col,class ({e})") from None
    class_map, correct = result.class_map, 0
    for r, c, name in rows:
        if not (0 <= r < result.grid.rows and 0 <= c < result.grid.cols):
            raise UserError(
                f"{path}: cell ({r}, {c}) is outside the {result.grid.rows}x{result.grid.cols} map"
            )
        k = int(class_map[r, c])
        correct += k < len(result.classes) and result.classes[k] == name
    return {"file": str(path), "tiles": len(rows), "accuracy": correct / max(len(rows), 1)}


def map_scene(
    predictor: Predictor,
    scene_path: str | Path,
    out: str | Path,
    *,
    tile: int | None = None,
    tile_m: float | None = None,
    stride: int | None = None,
    batch_size: int = 64,
    tta: bool = False,
    tiles: str = "csv",
    probabilities: bool = False,
    truth: str | Path | None = None,
    progress: bool = False,
    max_pixels: int | None = None,
    max_windows: int | None = None,
    amp: str = "off",
) -> dict[str, Any]:
    """Map ``scene_path`` with ``predictor``'s model into ``out``; returns the summary.

    ``max_pixels`` and ``max_windows`` bound the work one call may ask for (the server's)."""
    if probabilities and importlib.util.find_spec("rasterio") is None:
        raise UserError('--probabilities writes a GeoTIFF: pip install "rsscene[geo]"')
    scene = open_scene(scene_path, max_pixels)
    try:
        check_bands(scene, predictor.pre)
        grid = make_grid(scene, tile or default_tile(predictor, scene, tile_m), stride)
        windows = grid.window_rows * grid.window_cols
        if max_windows is not None and windows > max_windows:
            raise UserError(
                f"{scene.path}: {windows:,} windows of {grid.tile} px every {grid.stride} px;"
                f" the limit is {max_windows:,} (use a larger tile or stride)"
            )
        dtype = amp_dtype(amp, predictor.device)
        started = time.perf_counter()
        result = predict_scene(predictor, scene, grid, batch_size, tta, progress, dtype)
        predicting = time.perf_counter() - started
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        summary = outputs.summarize(scene, result)
        summary["checkpoint"] = str(predictor.source)
        summary["precision"] = str(dtype or torch.float32).removeprefix("torch.")
        summary["predict_seconds"] = round(predicting, 3)
        if truth is not None:
            summary["truth"] = tile_accuracy(result, truth)
        files = [outputs.write_class_raster(out, scene, result)]
        if probabilities:
            files.append(outputs.write_probabilities(out, scene, result))
        files.append(outputs.write_cells(out, scene, result, tiles))
        title = f"{scene.path.name}: {predictor.arch}, {grid.tile} px tiles every {grid.stride} px"
        files.append(outputs.write_overlay(out, scene, result, title, predictor.pre))
        summary["files"] = [str(p) for p in files]
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        scene.close()


def format_summary(summary: dict[str, Any], out: str | Path) -> str:
    """:func:`map_scene`'s summary for a person: the scene and its grid of cells, each class's
    cells, share and area, the tile accuracy against a truth file, and the files in ``out``."""
    rows, cols = summary["grid"]
    where = summary["crs"] or "no georeference: pixel coordinates"
    lines = [
        f"{summary['scene']}: {summary['size'][0]}x{summary['size'][1]} px, {summary['bands']}"
        f" band(s), {where}; {summary['tile']} px tiles every {summary['stride']} px ->"
        f" {rows}x{cols} cells, {summary['windows']} windows predicted,"
        f" {summary['windows_skipped_nodata']} skipped as nodata"
    ]
    unit = summary["area_unit"]
    width = max(len(c) for c in summary["per_class"])
    lines += [
        f"  {name:<{width}}  {v['cells']:7d} cells  {v['share']:6.1%}  {v['area']:12.4f} {unit}"
        for name, v in summary["per_class"].items()
    ]
    if "truth" in summary:
        t = summary["truth"]
        lines.append(
            f"tile accuracy against {t['file']}: {t['accuracy']:.2%} of {t['tiles']} tiles"
        )
    files = ", ".join(Path(f).name for f in summary["files"])
    lines.append(f"wrote {files} and summary.json to {out}")
    return "\n".join(lines)
