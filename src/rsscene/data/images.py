"""The one place that opens an image file.

Every reader in rsscene (prepare, datasets, predict, cam, the server, map) goes through
:func:`read_image`, so the same rules hold everywhere. A TIFF or GeoTIFF is read by tifffile
as ``C x H x W`` in the file's own dtype (any number of bands, pixel- or band-interleaved,
compressed); every other format is decoded by Pillow through :func:`open_image` into 8-bit
RGB (any mode becomes 3-channel RGB, EXIF orientation is applied, the first frame of an
animation is taken). Models trained without ``--bands`` read every file as 8-bit RGB
(:func:`load_tensor` without ``bands``), as rsscene always did. What a TIFF may hold (sample
type, bands, pages) is decided by :func:`check_raster` alone, for files and for the scenes
``rsscene map`` reads by window. Anything that is not a decodable image of sane size raises
:class:`ImageError` naming the file.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from rsscene.errors import UserError

if TYPE_CHECKING:
    import tifffile

log = logging.getLogger("rsscene")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")
# 100 megapixels: far above any scene tile, far below what would exhaust memory when decoded.
MAX_PIXELS = int(os.environ.get("RSSCENE_MAX_PIXELS", 100_000_000))
MIN_SIDE = 8
# Decoded bytes allowed per pixel of the limit: an 8-bit RGBA image of MAX_PIXELS, or a
# 13-band uint16 one of 30 megapixels. A header claiming thousands of bands is refused too.
MAX_BYTES_PER_PIXEL = 8
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Sample types a band image may hold (what remote-sensing rasters use).
BAND_DTYPES = ("uint8", "uint16", "int16", "float32")
# Sample types of 3 colour bands read as RGB: Pillow decodes 8- and 16-bit RGB, nothing else.
RGB_DTYPES = ("uint8", "uint16")
# Pages looked at one by one (overview or not); a file with more counts the rest as images.
MAX_PAGES_INSPECTED = 64
# GDAL writes band descriptions into its XML metadata tag; read them without an XML parser
# (nothing in an untrusted file gets to expand entities).
_GDAL_DESCRIPTION = re.compile(
    r'<Item name="DESCRIPTION" sample="(\d+)" role="description">([^<]*)</Item>'
)
_GDAL_COLORINTERP = re.compile(
    r'<Item name="COLORINTERP" sample="(\d+)" role="colorinterp">([^<]*)</Item>'
)


class ImageError(UserError):
    """A file that cannot be used as an image; ``str()`` is ``"PATH: reason"``."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _too_large(w: int, h: int, max_pixels: int) -> str:
    return (
        f"too large ({w}x{h} = {w * h:,} pixels > {max_pixels:,}): refused as a possible"
        " decompression bomb"
    )


def _to_rgb(img: Image.Image) -> Image.Image:
    # Pillow's own convert clips wide grey images to 255; scale the real range instead, in
    # integers or float32 so that a large image costs no float64 copies (8 bytes a pixel each).
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img) // 257).astype(np.uint8), "L")
    elif img.mode in ("I", "F"):
        arr = np.array(img, dtype=np.float32)
        arr *= 255.0 / max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8), "L")
    if (img.mode == "P" and "transparency" in img.info) or img.mode in ("LA", "PA", "La"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        # Transparent pixels become black whatever colour they hide, so results do not depend
        # on invisible data.
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB") if img.mode != "RGB" else img


@contextmanager
def _opened(source: str | Path | bytes, max_pixels: int, label: str) -> Iterator[Image.Image]:
    """The Pillow image with only its header read and checked; any failure in the block,
    decoding included, becomes an :class:`ImageError` naming ``label``."""
    try:
        if isinstance(source, bytes):
            if not source:
                raise ImageError(label, "empty file")
            fp = io.BytesIO(source)
        else:
            if os.path.getsize(source) == 0:
                raise ImageError(label, "empty file")
            fp = open(source, "rb")  # noqa: SIM115 - closed below, Pillow reads lazily
        with fp, warnings.catch_warnings():
            if _header(source) in TIFF_MAGIC:
                # The rule every raster reader applies (map's scenes too), before Pillow, which
                # would read a 4th band as alpha, a multi-page file as its first page, and
                # int32 or 1-bit samples as grey.
                check_raster(label, _tiff_header(source, label, max_pixels), rgb=True)
            # Pillow warns from 89 MP, below max_pixels; the check below is the limit that holds
            # (Pillow's own error, at twice its warning size, stays as a backstop).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(label, _too_large(w, h, max_pixels))
            if min(w, h) < MIN_SIDE:
                raise ImageError(label, f"too small ({w}x{h}; at least {MIN_SIDE} px a side)")
            yield img
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(label, "no such file") from None
    except IsADirectoryError:
        raise ImageError(label, "is a directory") from None
    except PermissionError:
        raise ImageError(label, "permission denied") from None
    except UnidentifiedImageError:
        if _header(source) in TIFF_MAGIC:
            # It passed the rule above: a layout or codec Pillow lacks, not a wrong kind of file.
            raise ImageError(
                label,
                "a TIFF whose layout Pillow cannot decode as RGB; a model trained with --bands"
                " reads it",
            ) from None
        raise ImageError(label, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(label, f"refused as a possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        # Pillow reports truncated and corrupt data through several exception types.
        reason = str(e) or type(e).__name__
        raise ImageError(label, f"corrupt or truncated image ({reason})") from None
    except MemoryError:
        raise ImageError(label, "image too large to decode in memory") from None


def _label(source: str | Path | bytes, name: str | None) -> str:
    return name or ("<bytes>" if isinstance(source, bytes) else str(source))


def image_size(
    source: str | Path | bytes, *, max_pixels: int = MAX_PIXELS, name: str | None = None
) -> tuple[int, int]:
    """Width and height as the header states them, nothing decoded: what decoding will cost.

    Raises :class:`ImageError` for what :func:`read_image` refuses from the header alone.
    """
    label = _label(source, name)
    if _header(source) in TIFF_MAGIC:
        import tifffile

        with _tiff_errors(label), tifffile.TiffFile(_stream(source)) as tif:
            _check_tiff(tif, label, max_pixels)
            return int(tif.pages.first.imagewidth), int(tif.pages.first.imagelength)
    with _opened(source, max_pixels, label) as img:
        return img.size


def open_image(
    source: str | Path | bytes, *, max_pixels: int = MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Decode a file (or bytes) into an RGB Pillow image, or raise :class:`ImageError`."""
    with _opened(source, max_pixels, _label(source, name)) as img:
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return _to_rgb(img)


def _not_rgb(bands: int, dtype: np.dtype | None = None) -> str:
    kind = f" ({dtype})" if dtype is not None else ""
    return (
        f"has {bands} bands{kind}, but this reads 8-bit RGB images (3 bands); a model"
        " trained with --bands reads multi-band files"
    )


@dataclass(frozen=True)
class RasterInfo:
    """What a raster's header says: its sample type, its bands (``alpha`` of them
    transparency) and its full-resolution pages (overviews and masks not counted)."""

    dtype: str
    bands: int
    alpha: int = 0
    pages: int = 1


def check_raster(label: str, info: RasterInfo, *, rgb: bool = False) -> None:
    """The one rule of what a raster may be, for every reader (files, and map's scenes): one
    image (a pyramid's reduced-resolution pages aside), samples of a :data:`BAND_DTYPES` type,
    and, read as 8-bit RGB (``rgb``), 1 or 3 colour bands, 3 only of 8 or 16 bits. Raises an
    :class:`ImageError` naming ``label`` otherwise."""
    if info.pages > 1:
        raise ImageError(
            label,
            f"has {info.pages} pages (images), and rsscene reads one image per file; save the"
            " page you mean as a file of its own (reduced-resolution overview pages are fine)",
        )
    if info.dtype not in BAND_DTYPES:
        raise ImageError(
            label, f"sample type {info.dtype} is not supported (one of {', '.join(BAND_DTYPES)})"
        )
    colour = info.bands - info.alpha
    if not rgb or colour == 1 or (colour == 3 and info.dtype in RGB_DTYPES):
        return
    if colour == 3:
        raise ImageError(
            label,
            f"has 3 bands of {info.dtype}, but this reads RGB images of 8 or 16 bits; a model"
            " trained with --bands reads other sample types",
        )
    raise ImageError(label, _not_rgb(colour, np.dtype(info.dtype)))


def tiff_info(tif: tifffile.TiffFile) -> RasterInfo:
    """The :class:`RasterInfo` of an open ``tifffile.TiffFile``, from its tags alone."""
    page = tif.pages.first
    bands = int(page.samplesperpixel)
    alpha = sum(1 for e in page.extrasamples if e in (1, 2))  # associated or unassociated
    # GDAL's own colour interpretation overrides the tag (NAIP files tag their near-infrared
    # band as alpha and say "Undefined" here).
    tag = page.tags.get("GDAL_METADATA")
    interp = dict(_GDAL_COLORINTERP.findall(str(tag.value))) if tag is not None else {}
    if interp:
        alpha = sum(1 for i in range(1, bands) if interp.get(str(i), "").lower() == "alpha")
    dtype = page.dtype.name if page.dtype is not None else f"{page.bitspersample}-bit"
    return RasterInfo(dtype, bands, alpha, _full_pages(tif))


def _full_pages(tif: tifffile.TiffFile) -> int:
    """Pages that are images of their own: not reduced-resolution (overviews), not masks."""
    total = len(tif.pages)
    if total == 1:
        return 1
    seen = min(total, MAX_PAGES_INSPECTED)
    # NewSubfileType: bit 0 a reduced-resolution version of another page, bit 2 a mask.
    own = sum(1 for i in range(seen) if not int(tif.pages[i].subfiletype) & 0b101)
    return own + total - seen


def raster_header(source: str | Path | bytes, *, name: str | None = None) -> RasterInfo:
    """A TIFF's :class:`RasterInfo` from its header, nothing decoded (any size)."""
    import tifffile

    label = _label(source, name)
    with _tiff_errors(label), tifffile.TiffFile(_stream(source)) as tif:
        return tiff_info(tif)


def _tiff_header(source: str | Path | bytes, label: str, max_pixels: int) -> RasterInfo:
    import tifffile

    with _tiff_errors(label), tifffile.TiffFile(_stream(source)) as tif:
        return _check_tiff(tif, label, max_pixels)


def _stream(source: str | Path | bytes) -> str | Path | io.BytesIO:
    return io.BytesIO(source) if isinstance(source, bytes) else source


def _header(source: str | Path | bytes) -> bytes:
    if isinstance(source, bytes):
        return source[:4]
    try:
        with open(source, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


@dataclass
class Raster:
    """A decoded image: ``array`` is ``C x H x W`` in the file's dtype; ``names`` the band
    descriptions the file carries (None when it has none)."""

    array: np.ndarray
    names: list[str] | None = None


def _gdal_names(page, bands: int) -> list[str] | None:
    tag = page.tags.get("GDAL_METADATA")
    if tag is None or not isinstance(tag.value, str):
        return None
    found = {int(i): text.strip() for i, text in _GDAL_DESCRIPTION.findall(tag.value)}
    if not found:
        return None
    return [found.get(i, "") for i in range(bands)]


def _check_tiff(tif: tifffile.TiffFile, label: str, max_pixels: int) -> RasterInfo:
    """Refuse, from the header alone, what would be too large or too small, and what
    :func:`check_raster` refuses; the header's :class:`RasterInfo` otherwise."""
    page = tif.pages.first
    h, w = int(page.imagelength), int(page.imagewidth)
    bands = int(page.samplesperpixel)
    if w * h > max_pixels:
        raise ImageError(label, _too_large(w, h, max_pixels))
    itemsize = page.dtype.itemsize if page.dtype is not None else 1
    if w * h * bands * itemsize > max_pixels * MAX_BYTES_PER_PIXEL:
        raise ImageError(
            label,
            f"too large ({w}x{h} x {bands} bands of {page.dtype} ="
            f" {w * h * bands * itemsize:,} bytes decoded): refused as a possible"
            " decompression bomb",
        )
    if min(w, h) < MIN_SIDE:
        raise ImageError(label, f"too small ({w}x{h}; at least {MIN_SIDE} px a side)")
    info = tiff_info(tif)
    check_raster(label, info)
    return info


def finite_bands(array: np.ndarray, label: str) -> np.ndarray:
    """Float bands: refused when no value is finite; NaN/Inf (nodata) elsewhere become the
    band's mean, which standardises to 0."""
    bad = ~np.isfinite(array)
    if not bad.any():
        return array
    if bad.all():
        raise ImageError(label, "no finite pixel values (all NaN or infinite)")
    array = array.copy()
    for band, mask in zip(array, bad, strict=True):
        if mask.all():
            raise ImageError(label, "a band has no finite pixel values (all NaN or infinite)")
        band[mask] = band[~mask].mean()
    return array


def _read_tiff(source: str | Path | bytes, label: str, max_pixels: int) -> Raster:
    import tifffile

    with tifffile.TiffFile(_stream(source)) as tif:
        page = tif.pages.first
        _check_tiff(tif, label, max_pixels)
        if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
            # Colour-mapped: the indexes are no bands; Pillow applies the palette.
            return Raster(to_tensor(open_image(source, max_pixels=max_pixels, name=label)).numpy())
        try:
            array = page.asarray()
        except KeyError as e:  # tifffile's way of naming a codec it lacks
            raise ImageError(label, f"cannot decode its compression ({e.args[0]})") from None
        # tifffile names the axes: S the samples (bands), pixel- (YXS) or band-interleaved (SYX).
        if page.axes == "YX":
            array = array[None]
        elif page.axes == "YXS":
            array = array.transpose(2, 0, 1)
        elif page.axes != "SYX":
            raise ImageError(label, f"unsupported TIFF layout (axes {page.axes})")
        names = _gdal_names(page, array.shape[0])
    array = np.ascontiguousarray(array)
    if array.dtype.kind == "f":
        array = finite_bands(array, label)
    return Raster(array, names)


def read_image(
    source: str | Path | bytes, *, max_pixels: int = MAX_PIXELS, name: str | None = None
) -> Raster:
    """Decode a file (or bytes) into a :class:`Raster` (``C x H x W`` in the file's dtype),
    or raise :class:`ImageError`. TIFF goes through tifffile with every band; other formats
    through :func:`open_image` as 8-bit RGB."""
    label = _label(source, name)
    if _header(source) not in TIFF_MAGIC:
        return Raster(to_tensor(open_image(source, max_pixels=max_pixels, name=name)).numpy())
    with _tiff_errors(label):
        return _read_tiff(source, label, max_pixels)


@contextmanager
def _tiff_errors(label: str) -> Iterator[None]:
    """Any failure of tifffile as an :class:`ImageError` naming ``label``."""
    try:
        yield
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(label, "image too large to decode in memory") from None
    except Exception as e:
        # tifffile reports damaged files through many exception types (its own, ValueError,
        # struct.error, IndexError, zlib.error, ...): all of them mean the file is unusable.
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ImageError(label, f"corrupt or truncated image ({reason})") from None


@dataclass(frozen=True)
class BandPick:
    """Which bands of each file a model reads: 1-based ``indexes`` in the model's order, from
    files that must have ``count`` bands of ``dtype``. With ``names`` (the chosen bands' names,
    when the training files carry them) a file that names its bands is read by name, in
    whatever order it stores them; a file without names by position."""

    indexes: tuple[int, ...]
    count: int
    dtype: str = "uint8"
    # How files are matched to the bands, not which bands: left out of equality.
    names: tuple[str, ...] | None = field(default=None, compare=False)

    def take(self, raster: Raster, label: str) -> np.ndarray:
        """The chosen bands of ``raster`` (read from ``label``), or an :class:`ImageError`
        naming both band counts (or both dtypes) when the file is not like the training data."""
        have = raster.array.shape[0]
        if have != self.count:
            raise ImageError(
                label,
                f"has {have} band{'s' if have != 1 else ''}, but the model was trained on files"
                f" with {self.count}",
            )
        if raster.array.dtype.name != self.dtype:
            # Another dtype has another range: scaling it as the training data would be wrong.
            raise ImageError(
                label,
                f"holds {raster.array.dtype.name} values, but the model was trained on"
                f" {self.dtype} files",
            )
        return raster.array[self._positions(raster, label)]

    def _positions(self, raster: Raster, label: str) -> list[int]:
        if not (self.names and raster.names):
            if self.names and self not in _SAID_BY_POSITION:
                _SAID_BY_POSITION.add(self)
                log.warning(
                    "%s carries no band names: its bands %s are read by position as %s",
                    label,
                    ",".join(map(str, self.indexes)),
                    ",".join(self.names),
                )
            return [i - 1 for i in self.indexes]
        lower = [n.lower() for n in raster.names]
        missing = [n for n in self.names if n.lower() not in lower]
        if missing:
            raise ImageError(
                label,
                f"has no band named {missing[0]!r} (its bands: {', '.join(raster.names)});"
                f" the model reads {', '.join(self.names)}",
            )
        return [lower.index(n.lower()) for n in self.names]


# The band choices already said to be read by position from a file without names: said once.
_SAID_BY_POSITION: set[BandPick] = set()


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB Pillow image → uint8 tensor of shape 3 x H x W."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def resize_bands(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased resize of a ``C x H x W`` image of any dtype, keeping its dtype (integers
    rounded and clamped to their range)."""
    if x.shape[-2:] == (size, size):
        return x
    if x.dtype == torch.uint8:
        return TF.resize(x, [size, size], antialias=True)
    out = TF.resize(x.float(), [size, size], antialias=True)
    if x.dtype.is_floating_point:
        return out.to(x.dtype)
    info = torch.iinfo(x.dtype)
    return out.round_().clamp_(info.min, info.max).to(x.dtype)


def load_tensor(
    source: str | Path | bytes,
    size: int | None = None,
    bands: BandPick | None = None,
    **kwargs,
) -> torch.Tensor:
    """Decode to a ``C x H x W`` tensor, resized to ``size`` x ``size`` when given: without
    ``bands`` 8-bit RGB (3 x H x W uint8); with them the chosen bands in the file's dtype.

    This is the one resize every pipeline uses (cached or not), so pixels agree between them.
    """
    if bands is None:
        x = to_tensor(open_image(source, **kwargs))
    else:
        label = kwargs.get("name") or ("<bytes>" if isinstance(source, bytes) else str(source))
        x = torch.from_numpy(np.ascontiguousarray(bands.take(read_image(source, **kwargs), label)))
    return x if size is None else resize_bands(x, size)
