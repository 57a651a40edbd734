"""Bands in separate files read as one scene: a STAC item's assets, or ``--band-files``.

Sentinel-2 and Landsat deliver each band as its own cloud-optimised GeoTIFF, at 10, 20 or 60 m.
:func:`open_stack` puts every file on the grid of the finest one (a GDAL warped VRT per coarser
file, read window by window: no band is ever decoded whole) and reads them as one multi-band
scene, in the order given, which is the model's band order. Coarser bands are resampled
``bilinear`` by default (reflectances are continuous; a 20 m band seen at 10 m without
blocks) or ``nearest`` (each fine pixel takes its coarse pixel's value unchanged).

:func:`read_stac` turns a local STAC item or item collection (JSON, read with ``pystac``, the
``geo`` extra) into one :class:`Stack` per item, choosing the assets by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsscene.data.bands import Preprocess
from rsscene.errors import UserError
from rsscene.mapping.folder import file_record
from rsscene.mapping.remote import (
    RemoteName,
    gdal_path,
    is_remote,
    remote_failure,
    remote_record,
    scene_name,
)

RESAMPLING = ("bilinear", "nearest")
# The media types of the assets a map can read (STAC's image/tiff with or without a profile).
RASTER_MEDIA = ("image/tiff", "image/vnd.stac.geotiff", "image/jp2", "application/x-vrt")


@dataclass(frozen=True)
class Stack:
    """A scene made of band files: ``files`` (paths or GDAL names such as ``/vsicurl/...``)
    stacked in order, each file's bands named by ``names``; ``source`` is the file a
    summary and the resume record name (the STAC item, or the first band file) and ``name``
    the scene's folder in a region."""

    source: Path | RemoteName
    name: str
    files: tuple[str, ...]
    names: tuple[str, ...]
    resampling: str = "bilinear"

    @property
    def label(self) -> str:
        """How errors name the scene: the item (and its id), or the band files."""
        if self.source.suffix.lower() == ".json":
            return f"{self.source} (item {self.name})"
        return f"{self.source} (+{len(self.files) - 1} band files)"

    def record(self) -> dict[str, Any]:
        """What makes another map: the item, each band file (a local one's size and
        modification time: a file rewritten in place), the bands' names and the resampling."""
        files = [
            remote_record(RemoteName(f)) if is_remote(f) else file_record(f) for f in self.files
        ]
        return {
            "item": self.name,
            "files": files,
            "names": list(self.names),
            "resampling": self.resampling,
        }


def scene_label(scene: Any) -> str:
    """How a line names a scene: a stack by its item (or band files), a file by its name."""
    return scene.label if isinstance(scene, Stack) else str(scene)


def band_files(files: Sequence[str | Path], resampling: str = "bilinear") -> Stack:
    """``--band-files``: each file's bands, in the order given, as one scene."""
    if len(files) < 2:
        raise UserError("--band-files: give two or more files, one per band (or group of bands)")
    named = [scene_name(str(f)) for f in files]  # a URL stays a URL (Path drops its //)
    names = tuple(n.stem for n in named)
    return Stack(named[0], names[0], tuple(gdal_path(str(f)) for f in files), names, resampling)


# --------------------------------------------------------------------------- STAC
def read_stac(
    path: str | Path,
    assets: Sequence[str] | None = None,
    wanted: Sequence[str] | None = None,
    resampling: str = "bilinear",
    bands: int | None = None,
) -> list[Stack]:
    """One :class:`Stack` per item of a STAC item or item collection file: the ``assets``
    named (asset keys, or their bands' ``name``/``common_name``), in that order, else those
    matching ``wanted`` (the model's band names), else, for an RGB model (``bands`` None), a
    ``visual`` asset or the assets whose common names are red, green and blue. A model of
    ``bands`` unnamed bands needs ``assets``."""
    path = scene_name(path)
    if not (assets or wanted) and bands is not None:
        raise UserError(
            f"{path}: the model reads {bands} bands that its training files did not name;"
            f" choose the item's assets for them with --assets, in the model's band order"
        )
    items = _items(path)
    return [
        Stack(path, item.id, *_choose(path, item, assets, wanted), resampling) for item in items
    ]


def is_stac(spec: Any) -> bool:
    """Whether a SCENE argument names a STAC file: a ``.json`` file that holds JSON (an
    image misnamed ``.json`` is an image, and refused or mapped as one)."""
    if not (isinstance(spec, (str, Path)) and str(spec).lower().endswith(".json")):
        return False
    try:
        with open(spec, "rb") as f:
            return f.read(64).lstrip()[:1] == b"{"
    except OSError:
        return not Path(spec).exists()  # a missing item: said to be missing, as a STAC file


def with_stacks(
    specs: Sequence[str | Path],
    pre: Preprocess,
    assets: Sequence[str] | None = None,
    files: Sequence[str | Path] | None = None,
    resampling: str = "bilinear",
) -> list[str | Path | Stack]:
    """SCENE arguments with each STAC file replaced by its items' stacks (their bands chosen
    for the model ``pre`` describes, or by ``assets``), and ``files`` (``--band-files``) as
    one more scene; ``assets`` without a STAC file is refused."""
    if assets and not any(is_stac(s) for s in specs):
        raise UserError("--assets chooses a STAC item's bands: give the item (JSON) as SCENE")
    bands = len(pre.bands) if pre.bands else None
    out: list[str | Path | Stack] = []
    for spec in specs:
        if is_stac(spec):
            out += read_stac(spec, assets, pre.named_bands, resampling, bands)
        else:
            out.append(spec)
    return out + ([band_files(files, resampling)] if files else [])


def _items(path: Path | RemoteName) -> list[Any]:
    """The file's items, each with the file as its own location, so that relative asset hrefs
    are the file's neighbours (pystac leaves a collection's items without one)."""
    items = _read_items(path)
    for item in items:
        item.set_self_href(str(path))
    return items


def _read_items(path: Path | RemoteName) -> list[Any]:
    try:
        import pystac
    except ModuleNotFoundError:
        raise UserError(
            f'{path}: reading STAC items needs pystac: pip install "rsscene[geo]"'
        ) from None
    try:
        data = pystac.StacIO.default().read_json(str(path))
        kind = data.get("type")
        if kind == "Feature":
            return [pystac.Item.from_dict(data)]
        if kind == "FeatureCollection":
            items = list(pystac.ItemCollection.from_dict(data))
            if items:
                return items
            raise UserError(f"{path}: a STAC item collection without items")
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pystac.STACError) as e:
        # urllib's HTTPError is an OSError: a remote item's 404 is said here, in one line.
        raise UserError(f"{path}: not a readable STAC item ({type(e).__name__}: {e})") from None
    raise UserError(
        f"{path}: not a STAC item or item collection (its type is {kind!r}, not 'Feature' or"
        " 'FeatureCollection')"
    )


def _asset_names(key: str, asset: Any) -> list[str]:
    """Every name an asset answers to: its key, and its bands' names and common names."""
    bands = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
    names = [key]
    if len(bands) == 1 and isinstance(bands[0], dict):
        names += [
            str(bands[0][k]) for k in ("name", "common_name", "eo:common_name") if k in bands[0]
        ]
    return names


def _rasters(item: Any) -> dict[str, Any]:
    return {
        key: asset
        for key, asset in item.assets.items()
        if (asset.media_type or "image/tiff").split(";")[0].strip() in RASTER_MEDIA
        and "thumbnail" not in (asset.roles or [])
        and "overview" not in (asset.roles or [])
    }


def _choose(
    path: Path, item: Any, assets: Sequence[str] | None, wanted: Sequence[str] | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The chosen assets' GDAL names and band names, in order."""
    rasters = _rasters(item)
    lookup = {n.lower(): key for key, a in rasters.items() for n in _asset_names(key, a)}
    names = list(assets or wanted or [])
    if not names:  # an RGB model
        names = ["visual"] if "visual" in lookup else ["red", "green", "blue"]
    missing = [n for n in names if n.lower() not in lookup]
    if missing:
        how = "" if assets else "; choose them with --assets"
        raise UserError(
            f"{path}: item {item.id} has no asset {missing[0]!r}{how} (its raster assets:"
            f" {', '.join(rasters) or 'none'})"
        )
    keys = [lookup[n.lower()] for n in names]
    hrefs = tuple(gdal_path(rasters[k].get_absolute_href() or rasters[k].href) for k in keys)
    return hrefs, tuple(names)


# --------------------------------------------------------------------------- reading
class StackReader:
    """The band files as one dataset: what :class:`~rsscene.mapping.scenes.Scene` reads
    (``read`` of a window or at a smaller ``out_shape``, ``dataset_mask``), each file warped
    to the finest file's grid."""

    def __init__(self, files: Sequence[Any], resampling: str) -> None:
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        self.sources = list(files)
        self.ref = ref = finest(self.sources)
        self.dtype = np.result_type(*(s.dtypes[0] for s in self.sources))
        self.readers = [
            s
            if _same_grid(s, ref)
            else WarpedVRT(
                s,
                crs=ref.crs,
                transform=ref.transform,
                width=ref.width,
                height=ref.height,
                resampling=Resampling[resampling],
            )
            for s in self.sources
        ]
        self.count = sum(s.count for s in self.sources)

    def read(self, window: Any = None, out_shape: tuple[int, ...] | None = None) -> np.ndarray:
        parts = [
            r.read(
                window=window, out_shape=None if out_shape is None else (r.count, *out_shape[1:])
            )
            for r in self.readers
        ]
        return np.concatenate([p.astype(self.dtype, copy=False) for p in parts])

    def dataset_mask(self, window: Any = None) -> np.ndarray:
        return np.minimum.reduce([r.dataset_mask(window=window) for r in self.readers])

    def close(self) -> None:
        for r in self.readers + self.sources:
            r.close()


def finest(sources: Sequence[Any]) -> Any:
    """The open file with the smallest pixels: the grid the others are warped onto."""
    return min(sources, key=lambda s: abs(s.transform.a * s.transform.e))


def _same_grid(a: Any, b: Any) -> bool:
    return a.crs == b.crs and a.transform == b.transform and a.shape == b.shape


def open_stack(stack: Stack) -> tuple[StackReader, list[str]]:
    """The stack's reader and its bands' names; a one-line error for a file that cannot be
    read, a file without georeference among several, or files in different CRSs."""
    import warnings

    import rasterio

    opened: list[Any] = []
    try:
        for name in stack.files:
            try:
                with warnings.catch_warnings():  # refused below, in one line
                    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                    opened.append(rasterio.open(name))
            except rasterio.errors.RasterioError as e:
                why = remote_failure(e, reading=False) if is_remote(name) else e
                raise UserError(f"{stack.label}: cannot read {name} ({why})") from None
        _check_grids(stack, opened)
        reader = StackReader(opened, stack.resampling)
    except BaseException:
        for src in opened:
            src.close()
        raise
    names = [
        n if src.count == 1 else f"{n}:{b}"
        for n, src in zip(stack.names, opened, strict=True)
        for b in range(1, src.count + 1)
    ]
    return reader, names


def _check_grids(stack: Stack, sources: Sequence[Any]) -> None:
    plain = [s.name for s in sources if s.crs is None]
    if plain:
        raise UserError(
            f"{stack.label}: {plain[0]} has no georeference; band files are stacked by their"
            " place on the ground"
        )
    crss = {s.crs.to_string() for s in sources}
    if len(crss) > 1:
        raise UserError(
            f"{stack.label}: its band files are in different CRSs ({', '.join(sorted(crss))});"
            " reproject them to one first"
        )
    ref = finest(sources)
    for s in sources:
        if _disjoint(s.bounds, ref.bounds):
            raise UserError(f"{stack.label}: {s.name} does not overlap {ref.name}")


def _disjoint(a: Any, b: Any) -> bool:
    """Whether two (left, bottom, right, top) boxes share no area."""
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
