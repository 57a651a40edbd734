"""Map a region: many scenes in one command, each into a folder of its own, and what they
make together.

:func:`collect_scenes` turns the command's SCENE arguments (files, folders, glob patterns)
into scene files, refusing what matches nothing and a file given twice. :func:`map_region`
checks every scene and folder before it predicts a window, maps each scene into
``OUT/<stem>/`` with :func:`~rsscene.mapping.map_scene` (a folder that already holds the
scene's complete map, made from the same file by the same checkpoint and settings, is kept:
an interrupted region continues with the same command), then writes in ``OUT``:
``region.json`` (cells, share and area per class over all scenes; each scene's folder, CRS
and windows), one cell table for the region and ``classes.vrt``, a mosaic of the class
GeoTIFFs where they share one CRS. Those are written under hidden names and renamed into
place after every scene, region.json last, so that a region.json always describes the maps
beside it. Under torchrun the ranks share the scenes, and rank 0 writes those files.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import json
import os
import secrets
import shutil
import signal
import threading
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from rsscene.data.images import IMAGE_EXTENSIONS
from rsscene.device import Dist
from rsscene.errors import Interrupted, UserError
from rsscene.inference import Predictor
from rsscene.mapping.folder import (
    MAP_FILES,
    STAGE,
    Earlier,
    Target,
    earlier_map,
    read_summary,
)
from rsscene.mapping.outputs import write_json
from rsscene.mapping.ranks import agree, exchange, share
from rsscene.mapping.remote import RemoteName, is_remote, scene_name
from rsscene.mapping.scenes import RASTER_SUFFIXES
from rsscene.mapping.stack import Stack, scene_label
from rsscene.mapping.tiling import NODATA_CLASS, Grid

# A folder's files that are scenes (hidden files, such as macOS's ._x.tif, are not).
SCENE_SUFFIXES = tuple(sorted(set(RASTER_SUFFIXES) | set(IMAGE_EXTENSIONS)))
GLOB_CHARS = "*?["
# The region's own files, in the order they are removed (region.json first: no region.json
# outlives the maps it describes).
REGION_FILES = ("region.json", "classes.vrt", "tiles.csv", "tiles.geojson")
# Files being written for the region: OUT/<this><token>-<name>, renamed into place.
PENDING = ".rsscene-region-"


# --------------------------------------------------------------------------- the scenes
def _is_pattern(spec: str) -> bool:
    # An existing name with brackets is a file, not a pattern; a URL's ? starts its query.
    return not is_remote(spec) and any(c in spec for c in GLOB_CHARS) and not Path(spec).exists()


def maps_a_region(specs: Sequence[str]) -> bool:
    """Whether SCENE arguments make a region: several, or a folder or a pattern. One file maps
    as it always has, into OUT itself."""
    return len(specs) != 1 or Path(specs[0]).is_dir() or _is_pattern(specs[0])


def _folder_scenes(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in SCENE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def _expand(spec: str) -> list[Path | RemoteName]:
    """The scene files one argument names: itself, a folder's rasters and images (sorted), or
    what a glob pattern matches (sorted; ``**`` descends), expanded here so a quoted one works;
    a remote raster's name (a URL or a GDAL network path) as it is, read once it is opened."""
    if is_remote(spec):
        return [RemoteName(spec)]
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = _folder_scenes(path)
        if not files:
            raise UserError(
                f"{spec}: a folder without raster or image files ({', '.join(SCENE_SUFFIXES)})"
            )
        return files
    if not _is_pattern(spec):
        raise UserError(
            f"{spec}: no such file or folder" if not path.exists() else f"{spec}: not a file"
        )
    files = []
    for match in sorted(glob.glob(os.path.expanduser(spec), recursive=True)):
        found = Path(match)
        files += _folder_scenes(found) if found.is_dir() else [found] if found.is_file() else []
    if not files:
        raise UserError(f"{spec}: no scene matches this pattern")
    return files


def collect_scenes(specs: Sequence[str | Path | Stack]) -> list[Path | RemoteName | Stack]:
    """Scene files from files, folders, glob patterns and remote names, in the order given, and
    band stacks as they are; a one-line :class:`UserError` for one that names nothing, or for
    a file named twice."""
    scenes = [
        scene
        for spec in specs
        for scene in ([spec] if isinstance(spec, Stack) else _expand(str(spec)))
    ]
    seen: dict[tuple[Any, ...], Path | RemoteName | Stack] = {}
    for scene in scenes:
        if isinstance(scene, Stack):  # an item is its file and id, or its band files
            key: tuple[Any, ...] = ("stack", str(_place(scene)), scene.files)
        elif isinstance(scene, RemoteName):  # a URL and its /vsicurl/ name are one file
            key = ("remote", scene.gdal)
        else:
            stat = scene.stat()
            key = (stat.st_dev, stat.st_ino)
        first = seen.setdefault(key, scene)
        if first is not scene:
            kind = "scene" if isinstance(scene, Stack) else "file"
            how = f"and {scene_label(first)} are the same {kind}"
            how = "is given twice" if first == scene else how
            raise UserError(f"{scene_label(scene)} {how}; give each scene once")
    return scenes


def folder_names(scenes: Sequence[str | Path]) -> list[str]:
    """Each scene's folder in the region: its file's stem (a URL's file name's: ``scene`` for
    ``https://host/x/scene.tif``); where stems clash (letter case aside, or with the region's
    own files), the folders above it (a URL's scheme, host and folders), then its suffix, then
    a hash of its path or URL. The names depend on the set of scenes, not on their order."""
    paths = [_place(s) for s in scenes]
    names = [p.stem.lstrip(".") or "scene" for p in paths]
    for rename in (_with_folders, _with_suffix):
        clashes = _clashes(names)
        group = [paths[i] for i in clashes]
        for i in clashes:
            names[i] = rename(paths[i], names[i], group)
    # Two URLs may differ in their query alone: the hash is of the whole name.
    for i in _clashes(names):
        key = str(scenes[i] if is_remote(scenes[i]) else paths[i])
        if isinstance(scenes[i], Stack):
            key += "\n" + "\n".join(scenes[i].files)
        names[i] = f"{names[i]}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    return names


def _place(scene: str | Path | Stack) -> PurePath:
    """Where a scene is, as a path: a file's, a URL's ``/scheme/host/path``; a STAC item's
    ``<file stem>/<id>.item`` beside its item file; band files' first file's, as ``.bands``."""
    if isinstance(scene, Stack):
        source = _place(scene.source)
        if source.suffix.lower() != ".json":  # band files: beside the first, another suffix
            return source.with_suffix(".bands")
        # An item in a folder named for its file: two collections may share an item id.
        return source.parent / source.stem / f"{scene.name}.item"
    named = scene_name(scene)
    return named.where if isinstance(named, RemoteName) else named.resolve()


def _clashes(names: list[str]) -> list[int]:
    keys = Counter(n.casefold() for n in names)
    return [
        i for i, n in enumerate(names) if keys[n.casefold()] > 1 or n.casefold() in REGION_FILES
    ]


def _with_folders(path: PurePath, name: str, group: list[PurePath]) -> str:
    common = Path(os.path.commonpath([p.parent for p in group]))
    return "-".join(path.relative_to(common).with_suffix("").parts) or name


def _with_suffix(path: PurePath, name: str, group: list[PurePath]) -> str:
    return f"{name}-{path.suffix.lstrip('.')}" if path.suffix else f"{name}-scene"


# --------------------------------------------------------------------------- the folder
def _ours(name: str) -> bool:
    """A leftover of an interrupted region: a scene's map being written or set aside, or a
    region file being written."""
    return name.startswith(PENDING) or (
        name.startswith(".") and (STAGE in name or ".rsscene-old-" in name)
    )


def _is_map(folder: Path) -> bool:
    entries = list(os.scandir(folder))
    return bool(entries) and all(
        (e.name in MAP_FILES and e.is_file(follow_symlinks=False)) or _ours(e.name) for e in entries
    )


def check_region_folder(
    out: Path, scenes: Sequence[Path | RemoteName], names: Sequence[str], force: bool
) -> list[Path]:
    """Refuse an output folder that holds a scene, a single scene's map or anything but a
    region's files; the maps in it of scenes not in the region, which ``force`` removes."""
    path = out.resolve()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    for scene in scenes:
        if isinstance(scene, Stack):  # its item file (or first band file) is where it is
            scene = scene.source
        if is_remote(scene):  # never in a local folder
            continue
        parent = Path(scene).resolve().parent
        if parent == path:
            raise UserError(
                f"--out {out}: is the folder of the scene {scene}; a region writes a folder per"
                " scene and its own files there, so choose another --out"
            )
        if path in parent.parents:
            raise UserError(
                f"--out {out}: holds the scene {scene}; choose a folder outside the scenes'"
            )
    if not path.is_dir():
        return []
    wanted, stale, foreign = set(names), [], []
    for e in sorted(os.scandir(path), key=lambda e: e.name):
        if _ours(e.name) or (e.name in wanted and e.is_dir(follow_symlinks=False)):
            continue
        if e.name in REGION_FILES and e.is_file(follow_symlinks=False):
            continue
        if e.name == "summary.json":
            raise UserError(
                f"--out {out}: holds the map of one scene, not a region; choose another --out"
            )
        if e.is_dir(follow_symlinks=False) and _is_map(Path(e.path)):
            stale.append(Path(e.path))
        else:
            foreign.append(e.name + ("/" if e.is_dir() else ""))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UserError(
            f"--out {out}: not empty and not an rsscene region (it holds {', '.join(foreign[:3])}"
            f"{more}); choose a new or empty folder, so that nothing is mixed or lost"
        )
    if stale and not force:
        summary = read_summary(stale[0] / "summary.json") or {}
        raise UserError(
            f"--out {out}: holds {stale[0].name}/, a map of {summary.get('scene', 'a scene')}"
            f" that is not among these {len(scenes)} scenes; --force removes it"
        )
    return stale


def _clear(out: Path, stale: list[Path], changing: bool) -> None:
    """An interrupted run's leftovers, the maps of scenes left out of the region (--force),
    and, when a scene is to be (re)mapped, the region's files."""
    if not out.is_dir():
        return
    for e in os.scandir(out):
        if _ours(e.name):
            shutil.rmtree(e.path) if e.is_dir(follow_symlinks=False) else os.remove(e.path)
    for folder in stale:
        shutil.rmtree(folder)
    for name in REGION_FILES if changing else ():
        (out / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- mapping
@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (``kill``, a batch system's stop) raises :class:`Interrupted` where the program
    is, as Ctrl-C raises KeyboardInterrupt: the map being written is removed, finished ones
    stay. Python runs signal handlers in the main thread only; elsewhere, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}", signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@dataclass
class Mapped:
    """One scene of a region: its file, its folder's name, and its map's summary."""

    scene: Path
    name: str
    summary: dict[str, Any]


def _plan_scene(
    predictor: Predictor, scene: Path, folder: Path, force: bool, options: dict[str, Any]
) -> tuple[Grid, Target, Earlier]:
    """The scene's checks, its windows and what its folder holds; a map of another scene
    there is replaced only with ``force``, settings or a checkpoint that changed always remap."""
    from rsscene.mapping import plan_map

    grid, target = plan_map(predictor, scene, folder, force=True, **options)
    earlier = earlier_map(target)
    if earlier.kind in ("other", "unknown") and not force:
        held = earlier.why if earlier.kind == "other" else "a map with " + earlier.why
        raise UserError(f"--out {folder}: holds {held}; --force replaces it")
    return grid, target, earlier


def _why(earlier: Earlier) -> str:
    return {
        "settings": f"other settings ({earlier.why})",
        "checkpoint": f"the checkpoint changed (mapped with {earlier.why})",
        "file": "the scene file changed since it was mapped",
        "incomplete": f"the earlier map was incomplete ({earlier.why})",
        "other": f"--force replaces {earlier.why}",
        "unknown": f"--force replaces a map with {earlier.why}",
    }[earlier.kind]


def map_region(
    predictor: Predictor,
    scenes: Sequence[str | Path],
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = False,
    log: Callable[[str], Any] | None = None,
    dist: Dist | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Map every scene that ``scenes`` (files, folders, patterns) names into ``out/<stem>/``
    and write the region's files in ``out``; region.json's contents. ``options`` are
    :func:`~rsscene.mapping.map_scene`'s; ``log`` gets a line per scene. Ctrl-C or SIGTERM
    raise :class:`Interrupted` saying how to continue (the same call).

    Under torchrun (``dist``, every rank calling this alike), the ranks share the scenes,
    balanced by the pixels of their windows (:func:`~.ranks.share`); every check runs on
    every rank, and a refusal is raised on all, before anything is written; rank 0 clears
    and, once every scene is mapped, writes the region's files; every rank returns them."""
    if options.get("truth") is not None:
        raise UserError("--truth compares the cells of one scene; map that scene alone")
    dist, out = dist or Dist(), Path(out)
    paths, names, stale, plans = agree(
        dist, lambda: _check_region(predictor, scenes, out, force, options)
    )
    # Every check passed: nothing was written before this, nothing is refused after it.
    changing = any(earlier.kind != "same" for *_, earlier in plans) or bool(stale)
    agree(dist, lambda: _clear(out, stale, changing) if dist.main else None)
    # Rank 0's view decides who maps what: another rank's HEAD request may have seen the
    # remote scenes otherwise, and the ranks must agree on the owners.
    weights = [_weight(grid, earlier) for grid, _, earlier in plans]
    owners = share(dist.broadcast(weights), dist.world)
    done: list[Mapped] = []
    try:
        with stop_on_sigterm():
            mine = (predictor, paths, names, plans, owners, dist, done, progress and dist.main)
            found = exchange(dist, partial(_map_mine, *mine, log or _quiet, options))
            mapped = [
                Mapped(p, n, found[owners[i]][i])
                for i, (p, n) in enumerate(zip(paths, names, strict=True))
            ]
            tiles = options.get("tiles", "csv")
            region = exchange(dist, lambda: write_region(out, mapped, tiles) if dist.main else None)
            return region[0]
    except (KeyboardInterrupt, Interrupted) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        how = f"{len(done)} of {len(paths)} scenes mapped"
        if dist.enabled:
            how = f"rank {dist.rank} had {len(done)} of its {owners.count(dist.rank)} scenes mapped"
        raise Interrupted(
            f"interrupted by {signal.Signals(signum).name} with {how} in {out}; the same"
            " command continues from there",
            signum,
        ) from None


def _check_region(
    predictor: Predictor,
    scenes: Sequence[str | Path],
    out: Path,
    force: bool,
    options: dict[str, Any],
) -> tuple[list[Path], list[str], list[Path], list[tuple[Grid, Target, Earlier]]]:
    """Every check of a region, before anything is written: its scenes, their folders'
    names, the maps in ``out`` of scenes left out, and each scene's plan."""
    paths = collect_scenes(scenes)
    names = folder_names(paths)
    stale = check_region_folder(out, paths, names, force)
    plans = [
        _plan_scene(predictor, p, out / n, force, options)
        for p, n in zip(paths, names, strict=True)
    ]
    return paths, names, stale, plans


def _weight(grid: Grid, earlier: Earlier) -> int:
    """A scene's work: the pixels its windows read, none for a map that is kept."""
    return 0 if earlier.summary is not None else grid.window_rows * grid.window_cols * grid.tile**2


def _map_mine(
    predictor: Predictor,
    paths: list[Path],
    names: list[str],
    plans: list[tuple[Grid, Target, Earlier]],
    owners: list[int],
    dist: Dist,
    done: list[Mapped],
    progress: bool,
    log: Callable[[str], Any],
    options: dict[str, Any],
) -> dict[int, dict[str, Any]]:
    """This rank's scenes mapped (or kept), in the region's order; their summaries by index."""
    rank = f" (rank {dist.rank})" if dist.enabled else ""
    found = {}
    for i, (path, name, (_, target, earlier)) in enumerate(zip(paths, names, plans, strict=True)):
        if owners[i] == dist.rank:
            found[i] = _map_one(predictor, path, target, earlier, progress, options, dist.beat)
            done.append(Mapped(path, name, found[i]))
            outcome = _outcome(earlier, found[i])
            log(f"[{i + 1}/{len(paths)}] {scene_label(path)} -> {target.out}: {outcome}{rank}")
    return found


def _quiet(line: str) -> None:
    pass


def _map_one(
    predictor: Predictor,
    scene: Path,
    target: Target,
    earlier: Earlier,
    progress: bool,
    options: dict[str, Any],
    beat: Callable[[], None],
) -> dict[str, Any]:
    """The scene's summary: its earlier map's, or a new map's."""
    from rsscene.mapping import map_scene

    if earlier.summary is not None:
        return earlier.summary
    return map_scene(
        predictor, scene, target.out, force=True, progress=progress, beat=beat, **options
    )


def _outcome(earlier: Earlier, summary: dict[str, Any]) -> str:
    if earlier.summary is not None:
        return "skipped (mapped earlier)"
    done = f"{summary['windows']} windows in {summary['predict_seconds']:.1f} s"
    return f"mapped, {done}" if earlier.kind == "none" else f"remapped ({_why(earlier)}), {done}"


# --------------------------------------------------------------------------- the summary
def _no_ground_area(summary: dict[str, Any]) -> str:
    """Why a scene's area is not summed, or "" when it is."""
    if summary["crs"] is None:
        return "no georeference: its cells are pixels, not ground"
    if summary["area_unit"].removesuffix("²") in ("", "None", "unknown"):
        return f"its CRS ({summary['crs']}) has no linear unit (degrees are not an area)"
    return ""


def summarize_region(scenes: Sequence[Mapped]) -> dict[str, Any]:
    """Cells, share and area per class over ``scenes``, each scene's folder, CRS and windows,
    and what was summed: areas add up per unit, over the scenes whose CRS has one."""
    summaries = [m.summary for m in scenes]
    classes = list(summaries[0]["per_class"])
    summed: dict[str, list[str]] = {}
    left_out = {}
    for m in scenes:
        why = _no_ground_area(m.summary)
        if why:
            left_out[m.name] = why
        else:
            summed.setdefault(m.summary["area_unit"], []).append(m.name)
    cells = {c: sum(s["per_class"][c]["cells"] for s in summaries) for c in classes}
    mapped = sum(cells.values())
    by_name = {m.name: m.summary for m in scenes}
    per_class = {
        c: {
            "cells": cells[c],
            "share": cells[c] / mapped if mapped else 0.0,
            "area": {
                unit: sum(by_name[n]["per_class"][c]["area"] for n in folders)
                for unit, folders in summed.items()
            },
        }
        for c in classes
    }
    crss = list(dict.fromkeys(s["crs"] for s in summaries if s["crs"] is not None))
    return {
        "scene_count": len(scenes),
        "checkpoint": summaries[0].get("checkpoint"),
        "cells": mapped,
        "nodata_cells": sum(s["nodata_cells"] for s in summaries),
        "windows": sum(s["windows"] for s in summaries),
        "windows_skipped_nodata": sum(s["windows_skipped_nodata"] for s in summaries),
        "per_class": per_class,
        "area": {"summed": summed, "not_summed": left_out, "note": _area_note(summed, left_out)},
        "crs": crss,
        "grids": _grids_note(crss, sum(s["crs"] is None for s in summaries)),
        "scenes": [_scene_entry(m) for m in scenes],
    }


def _scene_entry(m: Mapped) -> dict[str, Any]:
    s = m.summary
    keys = ("crs", "size", "tile", "stride", "grid", "windows", "windows_skipped_nodata")
    where = m.scene.source if isinstance(m.scene, Stack) else m.scene
    entry = {"folder": m.name, "scene": str(where.resolve()), **{k: s[k] for k in keys}}
    if isinstance(m.scene, Stack):
        entry["bands"] = {"item": m.scene.name, "files": list(m.scene.files)}
    entry["cells"] = sum(v["cells"] for v in s["per_class"].values())
    entry["area_unit"] = s["area_unit"]
    return entry


def _area_note(summed: dict[str, list[str]], left_out: dict[str, str]) -> str:
    parts = [f"{unit} summed over {len(f)} scene(s): {', '.join(f)}" for unit, f in summed.items()]
    if len(summed) > 1:
        parts.append("areas in different units are not added together")
    if not summed:
        parts.append("no area summed: no scene has a ground unit")
    if left_out:
        parts.append(f"counted in cells only: {', '.join(left_out)}")
    return "; ".join(parts)


def _grids_note(crss: list[str], plain: int) -> str:
    if len(crss) > 1:
        return (
            f"{len(crss)} CRSs: each scene is kept on its own grid in its own CRS, nothing is"
            " reprojected"
        )
    if crss and plain:
        return f"{plain} scene(s) without georeference: each kept on its own pixel grid"
    if crss:
        return f"one CRS ({crss[0]}): each scene on its own grid of cells"
    return "no georeference: each scene on its own pixel grid"


def format_region(region: dict[str, Any], out: str | Path) -> str:
    """region.json for a person: a table of cells, share and area per class, what the area
    sums, the CRSs and the mosaic."""
    units = list(region["area"]["summed"])
    width = max(len(c) for c in [*region["per_class"], "class"])
    head = f"  {'class':<{width}}  {'cells':>9}  {'share':>6}" + "".join(
        f"  {u:>12}" for u in units
    )
    lines = [f"region of {region['scene_count']} scenes in {out}: {region['grids']}", head]
    for name, v in region["per_class"].items():
        areas = "".join(f"  {v['area'][u]:12.4f}" for u in units)
        lines.append(f"  {name:<{width}}  {v['cells']:9d}  {v['share']:6.1%}{areas}")
    lines.append(f"  {'total':<{width}}  {region['cells']:9d}")
    lines.append(f"area: {region['area']['note']}")
    mosaic = region["mosaic"]
    if mosaic["file"]:
        lines.append(
            f"mosaic: {mosaic['file']} of {region['scene_count']} scenes ({mosaic['crs']})"
        )
    else:
        lines.append(f"mosaic: none, {mosaic['skipped']}")
    lines.append(f"wrote {', '.join(Path(f).name for f in region['files'])} to {out}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the files
def write_region(out: Path, scenes: Sequence[Mapped], tiles: str = "csv") -> dict[str, Any]:
    """The region's files, each written under a hidden name and renamed into place (region.json
    last, an earlier one removed first); region.json's contents."""
    token = f"{PENDING}{secrets.token_hex(4)}-"
    pending: dict[str, Path] = {}
    try:
        name = f"tiles.{tiles}"
        pending[name] = out / f"{token}{name}"
        (_region_csv if tiles == "csv" else _region_geojson)(pending[name], out, scenes)
        region = summarize_region(scenes)
        region["tiles"] = name
        pending["classes.vrt"] = out / f"{token}classes.vrt"
        region["mosaic"] = write_mosaic(pending["classes.vrt"], out, scenes)
        if region["mosaic"]["file"] is None:
            pending.pop("classes.vrt").unlink(missing_ok=True)
        region["files"] = [str(out / n) for n in [*pending, "region.json"]]
        pending["region.json"] = write_json(out / f"{token}region.json", region)
        for earlier in REGION_FILES:
            if earlier == "region.json" or earlier not in pending:
                (out / earlier).unlink(missing_ok=True)
        for name in sorted(pending, key=lambda n: n == "region.json"):
            os.replace(pending[name], out / name)
    except BaseException:
        for path in pending.values():
            path.unlink(missing_ok=True)
        raise
    return region


def _region_csv(path: Path, out: Path, scenes: Sequence[Mapped]) -> None:
    """Every scene's tiles.csv under one header, with its folder (and CRS) in front."""
    geo = any(m.summary["crs"] for m in scenes)
    fields: dict[str, None] = dict.fromkeys(["scene", "crs"] if geo else ["scene"])
    for m in scenes:
        with (out / m.name / "tiles.csv").open(newline="") as f:
            fields.update(dict.fromkeys(next(csv.reader(f), [])))
    with path.open("w", newline="") as dst:
        writer = csv.DictWriter(dst, fieldnames=list(fields), restval="")
        writer.writeheader()
        for m in scenes:
            with (out / m.name / "tiles.csv").open(newline="") as f:
                where = (
                    {"scene": m.name, "crs": m.summary["crs"] or ""} if geo else {"scene": m.name}
                )
                for row in csv.DictReader(f):
                    writer.writerow({**where, **row})


def _region_geojson(path: Path, out: Path, scenes: Sequence[Mapped]) -> None:
    """Every scene's cells in one collection, each with its folder and CRS; the collection
    names a CRS only when all share it (GeoJSON has one per collection)."""
    crss = {m.summary["crs"] for m in scenes}
    with path.open("w") as dst:
        dst.write('{"type": "FeatureCollection", ')
        if len(crss) == 1 and None not in crss:
            crs = {"type": "name", "properties": {"name": crss.pop()}}
            dst.write(f'"crs": {json.dumps(crs)}, ')
        dst.write('"features": [')
        first = True
        for m in scenes:  # one scene's cells in memory at a time
            collection = json.loads((out / m.name / "tiles.geojson").read_text())
            for feature in collection["features"]:
                feature["properties"] = {
                    "scene": m.name,
                    "crs": m.summary["crs"],
                    **feature["properties"],
                }
                dst.write(("" if first else ", ") + json.dumps(feature, allow_nan=False))
                first = False
        dst.write("]}\n")


# --------------------------------------------------------------------------- the mosaic
@dataclass
class Part:
    """A scene's classes.tif as a source of the mosaic."""

    path: Path
    relative: str
    width: int
    height: int
    transform: Any
    crs: Any
    colormap: dict[int, tuple[int, ...]]
    class_names: str
    block: tuple[int, int]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        t = self.transform
        return t.c, t.f + self.height * t.e, t.c + self.width * t.a, t.f


def _mosaic_problem(scenes: Sequence[Mapped]) -> str:
    """Why the scenes' class maps make no mosaic, or ""."""
    plain = [m.name for m in scenes if m.summary["crs"] is None]
    if plain:
        return f"not georeferenced: {', '.join(plain)} (classes.png) have no CRS to place them in"
    groups: dict[str, list[str]] = {}
    for m in scenes:
        groups.setdefault(m.summary["crs"], []).append(m.name)
    if len(groups) > 1:
        listed = "; ".join(f"{crs}: {', '.join(names)}" for crs, names in groups.items())
        return (
            f"the scenes are in {len(groups)} CRSs ({listed}); a mosaic needs one, so each"
            " keeps its own classes.tif"
        )
    return ""


def _read_part(out: Path, name: str) -> Part:
    import rasterio

    path = out / name / "classes.tif"
    with rasterio.open(path) as src:
        try:
            colormap = src.colormap(1)
        except ValueError:  # no colour table
            colormap = {}
        return Part(
            path,
            f"{name}/classes.tif",
            src.width,
            src.height,
            src.transform,
            src.crs,
            colormap,
            src.tags().get("class_names", ""),
            src.block_shapes[0],
        )


def write_mosaic(path: Path, out: Path, scenes: Sequence[Mapped]) -> dict[str, Any]:
    """``classes.vrt`` at ``path``: the scenes' classes.tif side by side in their one CRS,
    built by GDAL where its Python bindings are installed, else written here; read back and
    checked against its parts. What region.json says of it, with the reason when skipped."""
    import rasterio

    why = _mosaic_problem(scenes)
    parts = [] if why else [_read_part(out, m.name) for m in scenes]
    if not why and any(p.transform.b or p.transform.d or p.transform.e > 0 for p in parts):
        why = "the class maps are rotated or not north-up, which a VRT mosaic cannot hold"
    if why:
        return {"file": None, "skipped": why}
    try:
        built = _gdal_vrt(path, parts) if _gdal() is not None else _xml_vrt(path, parts)
        why = check_mosaic(path, parts)
    except (OSError, RuntimeError, rasterio.errors.RasterioError) as e:
        why = f"the VRT could not be built or read back ({str(e).splitlines()[0][:200]})"
    if why:
        path.unlink(missing_ok=True)
        return {"file": None, "skipped": why}
    with rasterio.open(path) as vrt:
        size = [vrt.width, vrt.height]
    return {
        "file": "classes.vrt",
        "built_with": built,
        "crs": parts[0].crs.to_string(),
        "size": size,
    }


def _gdal() -> Any:
    """GDAL's Python bindings (osgeo.gdal), or None."""
    try:
        from osgeo import gdal
    except ImportError:
        return None
    return gdal


def _gdal_vrt(path: Path, parts: Sequence[Part]) -> str:
    gdal = _gdal()
    options = gdal.BuildVRTOptions(
        resolution="highest", srcNodata=NODATA_CLASS, VRTNodata=NODATA_CLASS
    )
    vrt = gdal.BuildVRT(str(path), [str(p.path) for p in parts], options=options)
    if vrt is None:
        raise RuntimeError(gdal.GetLastErrorMsg() or "gdal.BuildVRT failed")
    vrt.SetMetadataItem("class_names", parts[0].class_names)
    vrt.FlushCache()
    vrt = None  # closing writes it
    return "gdal.BuildVRT"


def _number(value: float) -> str:
    """A VRT offset or size: whole where it is (to a micro-cell), else a float."""
    return str(round(value)) if abs(value - round(value)) < 1e-6 else repr(float(value))


def _xml_vrt(path: Path, parts: Sequence[Part]) -> str:
    """The VRT GDAL's BuildVRT writes (``-resolution highest``, 255 as nodata): each part a
    ComplexSource placed by its transform, its path relative to the VRT."""
    res_x = min(p.transform.a for p in parts)
    res_y = min(-p.transform.e for p in parts)
    left, bottom = min(p.bounds[0] for p in parts), min(p.bounds[1] for p in parts)
    right, top = max(p.bounds[2] for p in parts), max(p.bounds[3] for p in parts)
    width, height = max(1, round((right - left) / res_x)), max(1, round((top - bottom) / res_y))
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ET.SubElement(root, "SRS").text = parts[0].crs.to_wkt()
    geo = (left, res_x, 0.0, top, 0.0, -res_y)
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in geo)
    metadata = ET.SubElement(root, "Metadata")
    ET.SubElement(metadata, "MDI", key="class_names").text = parts[0].class_names
    band = ET.SubElement(root, "VRTRasterBand", dataType="Byte", band="1")
    ET.SubElement(band, "NoDataValue").text = str(NODATA_CLASS)
    ET.SubElement(band, "ColorInterp").text = "Palette"
    table = ET.SubElement(band, "ColorTable")
    for i in range(256):
        rgba = parts[0].colormap.get(i, (0, 0, 0, 0))
        ET.SubElement(table, "Entry", {f"c{k + 1}": str(v) for k, v in enumerate(rgba)})
    for p in parts:
        source = ET.SubElement(band, "ComplexSource")
        ET.SubElement(source, "SourceFilename", relativeToVRT="1").text = p.relative
        ET.SubElement(source, "SourceBand").text = "1"
        props = {"RasterXSize": p.width, "RasterYSize": p.height, "DataType": "Byte"}
        props |= {"BlockXSize": p.block[1], "BlockYSize": p.block[0]}
        ET.SubElement(source, "SourceProperties", {k: str(v) for k, v in props.items()})
        ET.SubElement(
            source, "SrcRect", xOff="0", yOff="0", xSize=str(p.width), ySize=str(p.height)
        )
        t = p.transform
        dst = {"xOff": (t.c - left) / res_x, "yOff": (top - t.f) / res_y}
        dst |= {"xSize": p.width * t.a / res_x, "ySize": p.height * -t.e / res_y}
        ET.SubElement(source, "DstRect", {k: _number(v) for k, v in dst.items()})
        ET.SubElement(source, "NODATA").text = str(NODATA_CLASS)
    ET.indent(root)
    path.write_text(ET.tostring(root, encoding="unicode") + "\n", encoding="utf-8")
    return "rsscene (VRT XML)"


def check_mosaic(path: Path, parts: Sequence[Part]) -> str:
    """Why the VRT at ``path`` is not the mosaic of ``parts``, or "": it must open in
    rasterio, in their CRS, and read each part's window (cell for cell where the part lies on
    the mosaic's grid and no other part overlaps it)."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path) as vrt:
        if vrt.crs != parts[0].crs or vrt.count != 1:
            return f"the VRT reads back in {vrt.crs} with {vrt.count} bands, not as its parts"
        t = vrt.transform
        whole = Window(0, 0, vrt.width, vrt.height)
        for p in parts:
            x, y = (p.transform.c - t.c) / t.a, (p.transform.f - t.f) / t.e
            size = (p.width * p.transform.a / t.a, p.height * p.transform.e / t.e)
            window = Window(round(x), round(y), max(1, round(size[0])), max(1, round(size[1])))
            got = vrt.read(1, window=window.intersection(whole))
            aligned = all(_number(v).isdigit() for v in (x, y)) and size == (p.width, p.height)
            alone = not any(_overlap(p, q) for q in parts if q is not p)
            if aligned and alone:
                with rasterio.open(p.path) as src:
                    if not np.array_equal(got, src.read(1)):
                        return f"the VRT does not read back {p.relative} cell for cell"
    return ""


def _overlap(a: Part, b: Part) -> bool:
    (al, ab, ar, at), (bl, bb, br, bt) = a.bounds, b.bounds
    return al < br and bl < ar and ab < bt and bb < at
