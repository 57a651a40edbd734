"""Scenes read window by window: rasters through rasterio (the ``geo`` extra), so a scene far
larger than memory maps in bounded memory, and other images decoded whole, up to their own
limit (``RSSCENE_MAP_MAX_PIXELS``, 250 MP)."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsscene.data.bands import Preprocess
from rsscene.data.images import (
    BAND_DTYPES,
    TIFF_MAGIC,
    BandPick,
    ImageError,
    Raster,
    RasterInfo,
    check_raster,
    finite_bands,
    raster_header,
    read_image,
    resize_bands,
)
from rsscene.mapping.remote import RemoteName, gdal_options, is_remote, remote_failure
from rsscene.mapping.stack import Stack, open_stack

MAX_DECODED_PIXELS = int(os.environ.get("RSSCENE_MAP_MAX_PIXELS", 250_000_000))
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2")


@dataclass
class Scene:
    """A scene's size, bands and georeference, and a reader of windows ``C x h x w``."""

    path: Path | RemoteName
    width: int
    height: int
    count: int
    dtype: str
    alpha: int = 0  # how many of the bands are transparency (GDAL's colour interpretation)
    names: list[str] | None = None  # the bands' descriptions, when the file names every band
    crs: Any = None  # a rasterio CRS, or None without georeference
    transform: Any = None  # an affine.Affine from pixel (col, row) to map (x, y)
    # Band files stacked (their bands are the model's, in its order: not the training files'
    # layout, which the model's own pick reads).
    stack: Stack | None = None
    _raster: Any = field(default=None, repr=False)
    _pixels: np.ndarray | None = field(default=None, repr=False)
    _options: dict[str, str] | None = field(default=None, repr=False)  # remote: GDAL's settings

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None

    def pick(self, pre: Preprocess) -> BandPick | None:
        """How the model's bands are taken from this scene's (None: as 8-bit RGB)."""
        if pre.pick is None or self.stack is None:
            return pre.pick
        n = len(pre.pick.indexes)
        return BandPick(tuple(range(1, n + 1)), n, pre.pick.dtype)

    def read(self, x: int, y: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """The window's pixels ``C x h x w`` in the scene's dtype, and its valid-pixel mask."""
        if self._pixels is not None:
            return self._pixels[:, y : y + h, x : x + w], np.ones((h, w), dtype=bool)
        from rasterio.windows import Window

        window = Window(x, y, w, h)
        try:
            with self._settings():
                pixels = self._raster.read(window=window)
                valid = self._raster.dataset_mask(window=window) > 0
        except Exception as e:  # rasterio reports damage as RasterioIOError, CPLE_*Error...
            raise ImageError(str(self.path), self._failure(e)) from None
        return pixels, valid

    def preview(self, max_side: int) -> np.ndarray:
        """The whole scene, decimated to at most ``max_side`` px a side: ``C x h x w``."""
        scale = max(self.width, self.height) / max_side
        if self._pixels is not None:
            step = max(1, int(np.ceil(scale)))
            return self._pixels[:, ::step, ::step]
        h, w = max(1, round(self.height / max(scale, 1))), max(1, round(self.width / max(scale, 1)))
        try:
            with self._settings():
                return self._raster.read(out_shape=(self.count, h, w))
        except Exception as e:  # a strip no window read may be the damaged one
            raise ImageError(str(self.path), self._failure(e)) from None

    def close(self) -> None:
        if self._raster is not None:
            self._raster.close()

    def _settings(self) -> contextlib.AbstractContextManager:
        """A remote scene's GDAL settings while it is read too: a VRT opens its sources then,
        and the settings of the thread that opened the scene are not a reader thread's."""
        if self._options is None:
            return contextlib.nullcontext()
        import rasterio

        return rasterio.Env(**self._options)

    def _failure(self, error: BaseException) -> str:
        if isinstance(self.path, RemoteName) or self._options is not None:
            return remote_failure(error, reading=True)
        return f"corrupt or truncated raster ({_gdal(error)})"


def _gdal(error: BaseException) -> str:
    """GDAL's own words for a failure: rasterio's "Read failed. See previous exception" wraps
    them, and a one-line error has no previous exception to see."""
    cause = error.__cause__ or error.__context__
    return str(cause if cause is not None and str(cause) else error).splitlines()[0][:200]


def open_scene(path: str | Path | Stack, max_pixels: int | None = None) -> Scene:
    """A raster read by window through rasterio (the ``geo`` extra), or an image decoded whole,
    or band files stacked (a :class:`~rsscene.mapping.stack.Stack`); a scene over
    ``max_pixels`` is refused (the server's limit; the command has none for rasters)."""
    if isinstance(path, Stack):
        return _sized(_open_stack(path), max_pixels)
    if is_remote(path):
        return _sized(_open_remote(RemoteName(str(path))), max_pixels)
    path = Path(path)
    if not path.is_file():
        raise ImageError(str(path), "no such file" if not path.exists() else "is a directory")
    with path.open("rb") as f:
        tiff = f.read(4) in TIFF_MAGIC
    if tiff:
        # The rule predict's reader applies, from the same tags (GDAL shows 1-bit samples as
        # uint8 and other pages as subdatasets: it would not refuse the same files).
        check_raster(str(path), raster_header(path))
    if path.suffix.lower() in RASTER_SUFFIXES:
        _small_gdal_cache()
        try:
            import rasterio
        except ModuleNotFoundError:
            pass  # decoded whole below, without its georeference
        else:
            return _sized(_open_raster(path, rasterio), max_pixels)
    limit = min(max_pixels or MAX_DECODED_PIXELS, MAX_DECODED_PIXELS)
    raster = read_image(path, max_pixels=limit)
    count, height, width = raster.array.shape
    return Scene(
        path,
        width,
        height,
        count,
        raster.array.dtype.name,
        names=raster.names,
        _pixels=raster.array,
    )


def _sized(scene: Scene, max_pixels: int | None) -> Scene:
    """``scene``, or a one-line error (the scene closed) when it is over ``max_pixels``."""
    if max_pixels is not None and scene.width * scene.height > max_pixels:
        scene.close()
        raise ImageError(
            str(scene.path),
            f"too large ({scene.width}x{scene.height} = {scene.width * scene.height:,}"
            f" pixels > {max_pixels:,})",
        )
    return scene


def _open_raster(path: Path, rasterio: Any) -> Scene:
    try:
        with warnings.catch_warnings():
            # A plain TIFF is fine: it is mapped in pixel coordinates, and the summary says so.
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            src = rasterio.open(path)
    except rasterio.errors.RasterioError as e:
        raise ImageError(str(path), f"not a readable raster ({e})") from None
    # A TIFF was checked from its tags; other formats from GDAL's.
    return _raster_scene(path, src, check=src.driver != "GTiff")


def _small_gdal_cache() -> None:
    """GDAL caches decoded blocks up to 5% of the machine's memory by default: a map reads
    each block once or twice, so a small cache keeps its memory bounded on any scene (a
    user's own GDAL_CACHEMAX wins)."""
    os.environ.setdefault("GDAL_CACHEMAX", "64")


def _open_remote(name: RemoteName) -> Scene:
    """A remote raster opened through GDAL's network file systems, with the settings for
    reading over a network (:data:`~rsscene.mapping.remote.GDAL_OPTIONS`), and checked from
    what GDAL reads of its header."""
    try:
        import rasterio
    except ModuleNotFoundError:
        raise ImageError(
            name, 'a remote scene is read by GDAL: pip install "rsscene[geo]"'
        ) from None
    _small_gdal_cache()
    options = gdal_options()
    try:
        with rasterio.Env(**options), warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            src = rasterio.open(name.gdal)
    except rasterio.errors.RasterioError as e:
        raise ImageError(name, remote_failure(e, reading=False)) from None
    scene = _raster_scene(name, src, check=True)
    scene._options = options
    return scene


def _raster_scene(path: Path | RemoteName, src: Any, check: bool) -> Scene:
    """The scene of an open rasterio dataset; with ``check``, refused (and closed) by the rule
    for rasters, from what GDAL says of its samples and pages."""
    if check:
        dtypes = sorted(set(src.dtypes), key=lambda d: d in BAND_DTYPES)
        # GDAL shows 1-bit samples as uint8 (a TIFF's own tags say "bool").
        bits = src.tags(1, ns="IMAGE_STRUCTURE").get("NBITS")
        dtype = "1-bit" if bits == "1" else dtypes[0]
        info = RasterInfo(dtype, src.count, pages=max(1, len(src.subdatasets)))
        try:
            check_raster(str(path), info)
        except ImageError:
            src.close()
            raise
    georeferenced = src.crs is not None and not src.transform.is_identity
    return Scene(
        path,
        src.width,
        src.height,
        src.count,
        src.dtypes[0],
        alpha=sum(ci.name == "alpha" for ci in src.colorinterp),
        names=list(src.descriptions) if all(src.descriptions) else None,
        crs=src.crs if georeferenced else None,
        transform=src.transform if georeferenced else None,
        _raster=src,
    )


def _open_stack(stack: Stack) -> Scene:
    """Band files on the finest one's grid, their bands in the order given: the model's."""
    try:
        import rasterio
    except ModuleNotFoundError:
        raise ImageError(
            stack.label, 'band files are read by GDAL: pip install "rsscene[geo]"'
        ) from None

    _small_gdal_cache()
    # Remote band files are read with the network settings a remote scene gets.
    options = gdal_options() if any(is_remote(f) for f in stack.files) else None
    with rasterio.Env(**(options or {})):
        reader, names = open_stack(stack)
    ref = reader.ref
    return Scene(
        stack.source,
        ref.width,
        ref.height,
        reader.count,
        reader.dtype.name,
        names=names,
        crs=ref.crs,
        transform=ref.transform,
        stack=stack,
        _raster=reader,
        _options=options,
    )


def check_bands(scene: Scene, pre: Preprocess) -> None:
    """Refuse, before any window is read, a scene whose bands the model cannot read as it was
    trained: another band count or dtype, or colour bands an RGB model would drop."""
    label = str(scene.path)
    pick = scene.pick(pre)
    if pick is not None:
        blank = np.zeros((scene.count, 1, 1), dtype=scene.dtype)
        pick.take(Raster(blank, scene.names), label)
        return
    if scene.count - scene.alpha > 3:
        raise ImageError(
            label,
            f"has {scene.count - scene.alpha} bands, but the model reads 8-bit RGB (3 bands);"
            " a model trained with --bands maps multi-band scenes",
        )
    # The rest of what an RGB model reads, by the rule its file reader applies.
    check_raster(label, RasterInfo(scene.dtype, scene.count, scene.alpha), rgb=True)


def window_image(
    pixels: np.ndarray, pick: BandPick | None, size: int, label: str, names: list[str] | None = None
) -> torch.Tensor:
    """A window as the model reads the same pixels saved as a file: its bands (8-bit RGB for
    an RGB model) at the model's size, in the data's dtype; non-finite values become the
    window's band mean, as :func:`~rsscene.data.images.finite_bands` does for a file. The
    scene's band ``names`` choose the model's bands by name, as for a file."""
    if pixels.dtype.kind == "f":
        pixels = finite_bands(pixels, label)
    if pick is None:
        return resize_bands(torch.from_numpy(np.ascontiguousarray(as_rgb8(pixels))), size)
    bands = pick.take(Raster(pixels, names), label)
    return resize_bands(torch.from_numpy(np.ascontiguousarray(bands)), size)


def as_rgb8(pixels: np.ndarray) -> np.ndarray:
    """A window ``C x h x w`` of any dtype as the 3-band uint8 image an RGB model takes, by the
    rules :func:`rsscene.data.images.open_image` applies to whole files: one band is repeated,
    16-bit values are scaled from 0..65535, floats by their maximum; bands after the third
    (transparency, by :func:`check_bands`) are left out."""
    if pixels.shape[0] < 3:
        pixels = np.repeat(pixels[:1], 3, axis=0)
    pixels = pixels[:3]
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype in (np.uint16, np.int16):
        peak = 65535.0
    else:
        peak = max(float(np.nanmax(pixels)) if pixels.size else 1.0, 1.0)
    return np.clip(np.nan_to_num(pixels * (255.0 / peak)), 0, 255).astype(np.uint8)
