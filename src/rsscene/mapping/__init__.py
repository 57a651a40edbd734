"""Map a whole scene: windows over a large image → batched prediction → a land-use map.

:func:`map_scene` reads the scene window by window (:mod:`.scenes`), predicts the windows in
batches (:mod:`.tiling`) and writes, in its output folder (:mod:`.outputs`): ``classes.tif``
(class index per cell, a cloud-optimised GeoTIFF with the scene's CRS and a transform that
places every cell exactly; ``classes.png`` where the scene has no georeference),
``probabilities.tif`` on request, ``overlay.png``, ``tiles.csv`` or ``tiles.geojson``, and
``summary.json`` (with each file's checksum). The folder gets one complete map or none,
never mixed with other files nor written over the scene (:mod:`.folder`).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rsscene.device import Dist, amp_dtype
from rsscene.errors import UserError
from rsscene.inference import Predictor
from rsscene.mapping import outputs
from rsscene.mapping.folder import (
    CHECKSUMS,
    RECORD,
    Target,
    check_target,
    checksum,
    scene_record,
    staged,
)
from rsscene.mapping.ranks import agree, exchange
from rsscene.mapping.scenes import Scene, check_bands, open_scene
from rsscene.mapping.tiling import (
    MIN_TILE,
    PROGRESS_EVERY,
    Grid,
    MapResult,
    check_capacity,
    make_grid,
    predict_scene,
)

__all__ = [
    "MapResult",
    "Scene",
    "default_tile",
    "format_summary",
    "map_scene",
    "open_scene",
    "plan_map",
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
    pixel = math.hypot(scene.transform.a, scene.transform.d)  # a pixel's width on the ground
    if round(tile_m / pixel) < MIN_TILE:
        size = "less than one pixel" if tile_m < pixel else f"{tile_m / pixel:.3g} px"
        raise UserError(
            f"--tile-m {tile_m:g}: a window of {size} of {scene.path}'s {pixel:g} m pixels; a"
            f" window needs at least {MIN_TILE} px, so --tile-m {MIN_TILE * pixel:g} or more"
        )
    return round(tile_m / pixel)


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
    force: bool = False,
    progress_every: float = PROGRESS_EVERY,
    dist: Dist | None = None,
    beat: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Map ``scene_path`` with ``predictor``'s model into the folder ``out``; the summary.

    ``out`` gets one complete map or none (:mod:`.folder`): it must be new, empty, or an
    earlier map of the same scene file and settings, which is replaced whole; ``force``
    replaces any earlier map. ``progress`` shows a bar on a terminal, else a line on stderr
    every ``progress_every`` seconds. ``max_pixels`` and ``max_windows`` bound the work one
    call may ask for (the server's). ``beat`` is called after each batch.

    Under torchrun (``dist``, every rank calling this alike), the ranks share the windows
    (:func:`~.tiling.predict_scene`), rank 0 writes the map, and every rank returns its
    summary; a refusal is raised on every rank before a window is predicted."""
    _check_probabilities(probabilities)
    dist = dist or Dist()
    options = {"tile": tile, "tile_m": tile_m, "stride": stride, "tta": tta, "amp": amp}
    options |= {"tiles": tiles, "probabilities": probabilities, "truth": truth}
    scene = open_scene(scene_path, max_pixels)
    try:
        # Checked before the windows are predicted: a refusal costs nothing.
        grid, target = agree(
            dist, partial(_plan, predictor, scene, out, options, max_windows, force)
        )
        dtype = amp_dtype(amp, predictor.device)
        started = time.perf_counter()
        how = (batch_size, tta, progress and dist.main, dtype, progress_every, dist, beat)
        result = predict_scene(predictor, scene, grid, *how)

        def write() -> dict[str, Any] | None:
            if result is None:  # another rank's: rank 0 writes the map
                return None
            summary = _summary(predictor, scene, result, dtype, started)
            if truth is not None:
                summary["truth"] = tile_accuracy(result, truth)
            return _write_map(target, scene, result, predictor, summary)

        return exchange(dist, write)[0]
    finally:
        scene.close()


def _summary(
    predictor: Predictor,
    scene: Scene,
    result: MapResult,
    dtype: torch.dtype | None,
    started: float,
) -> dict[str, Any]:
    """The map's summary, with the checkpoint, the precision and the seconds since ``started``."""
    summary = outputs.summarize(scene, result)
    summary["checkpoint"] = str(predictor.source)
    summary["precision"] = str(dtype or torch.float32).removeprefix("torch.")
    summary["predict_seconds"] = round(time.perf_counter() - started, 3)
    return summary


def plan_map(
    predictor: Predictor,
    scene_path: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    max_pixels: int | None = None,
    max_windows: int | None = None,
    **options: Any,
) -> tuple[Grid, Target]:
    """Every check :func:`map_scene` makes before it predicts a window, and no more: the grid
    of windows, and the output folder as a :class:`~.folder.Target`, whose record says what
    the map is made from. ``options`` are map_scene's (tile, tile_m, stride, tta, amp, tiles,
    probabilities, truth)."""
    _check_probabilities(options.get("probabilities", False))
    defaults = {"tile": None, "tile_m": None, "stride": None, "tta": False, "amp": "off"}
    defaults |= {"tiles": "csv", "probabilities": False, "truth": None}
    scene = open_scene(scene_path, max_pixels)
    try:
        return _plan(predictor, scene, out, defaults | options, max_windows, force)
    finally:
        scene.close()


def _check_probabilities(probabilities: bool) -> None:
    if probabilities and importlib.util.find_spec("rasterio") is None:
        raise UserError('--probabilities writes a GeoTIFF: pip install "rsscene[geo]"')


def _plan(
    predictor: Predictor,
    scene: Scene,
    out: str | Path,
    options: dict[str, Any],
    max_windows: int | None,
    force: bool,
) -> tuple[Grid, Target]:
    """The grid of windows over ``scene`` and the output folder, both checked."""
    check_bands(scene, predictor.pre)
    tile = options["tile"] or default_tile(predictor, scene, options["tile_m"])
    grid = make_grid(scene, tile, options["stride"])
    _check_windows(scene, grid, max_windows)
    check_capacity(scene, grid, len(predictor.classes))
    truth = options["truth"]
    settings = {
        "checkpoint": str(Path(predictor.source).resolve()),
        "tile": grid.tile,
        "stride": grid.stride,
        "tta": options["tta"],
        "amp": options["amp"],
        "tiles": options["tiles"],
        "probabilities": options["probabilities"],
        "truth": None if truth is None else str(Path(truth).resolve()),
    }
    if scene.stack is not None:  # other band files, bands or resampling make another map
        settings["bands"] = scene.stack.record()
    record = scene_record(scene.path, settings, _checkpoint_file(predictor))
    return grid, check_target(out, scene.path, record, force)


def _checkpoint_file(predictor: Predictor) -> Path | None:
    """The file the model was read from (a run folder's last.pt), if it is still there."""
    from rsscene.checkpoint import resolve_path

    try:
        return resolve_path(predictor.source)
    except (OSError, UserError):  # gone since it was read: the map records its path only
        return None


def _write_map(
    target: Target, scene: Scene, result: MapResult, predictor: Predictor, summary: dict
) -> dict[str, Any]:
    """Every file of the map, written in a folder that is put in place whole once they all
    are; the summary as written (its record of the scene and settings and the files'
    checksums aside)."""
    settings = target.record["settings"]
    with staged(target) as folder:
        files = [outputs.write_class_raster(folder, scene, result)]
        if settings["probabilities"]:
            files.append(outputs.write_probabilities(folder, scene, result))
        files.append(outputs.write_cells(folder, scene, result, settings["tiles"]))
        grid = result.grid
        title = f"{scene.path.name}: {predictor.arch}, {grid.tile} px tiles every {grid.stride} px"
        files.append(outputs.write_overlay(folder, scene, result, title, predictor.pre))
        summary["files"] = [str(target.out / p.name) for p in files]
        summary = outputs.finite(summary)
        checksums = {p.name: checksum(p) for p in files}
        aside = {CHECKSUMS: checksums, RECORD: target.record}
        outputs.write_json(folder / "summary.json", {**summary, **aside})
    return summary


def _check_windows(scene: Scene, grid: Grid, max_windows: int | None) -> None:
    windows = grid.window_rows * grid.window_cols
    if max_windows is not None and windows > max_windows:
        raise UserError(
            f"{scene.path}: {windows:,} windows of {grid.tile} px every {grid.stride} px;"
            f" the limit is {max_windows:,} (use a larger tile or stride)"
        )


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
