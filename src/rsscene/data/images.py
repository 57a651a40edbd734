"""The one place that opens an image file.

Every reader in rsscene (prepare, datasets, predict, cam, the server) goes through
:func:`open_image`, so the same rules hold everywhere: any mode becomes 3-channel RGB,
EXIF orientation is applied, the first frame of an animation is taken, and anything
that is not a decodable image of sane size raises :class:`ImageError` naming the file.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from rsscene.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")
# 100 megapixels: far above any scene tile, far below what would exhaust memory when decoded.
MAX_PIXELS = int(os.environ.get("RSSCENE_MAX_PIXELS", 100_000_000))
MIN_SIDE = 8


class ImageError(UserError):
    """A file that cannot be used as an image; ``str()`` is ``"PATH: reason"``."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


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
            # Pillow warns from 89 MP, below max_pixels; the check below is the limit that holds
            # (Pillow's own error, at twice its warning size, stays as a backstop).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(
                    label,
                    f"too large ({w}x{h} = {w * h:,} pixels > {max_pixels:,}): refused as a"
                    " possible decompression bomb",
                )
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

    Raises :class:`ImageError` for what :func:`open_image` refuses from the header alone.
    """
    with _opened(source, max_pixels, _label(source, name)) as img:
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


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB Pillow image → uint8 tensor of shape 3 x H x W."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def load_tensor(source: str | Path | bytes, size: int | None = None, **kwargs) -> torch.Tensor:
    """Decode to a uint8 3 x H x W tensor, resized to ``size`` x ``size`` when given.

    This is the one resize every pipeline uses (cached or not), so pixels agree between them.
    """
    x = to_tensor(open_image(source, **kwargs))
    if size is not None and x.shape[-2:] != (size, size):
        x = TF.resize(x, [size, size], antialias=True)
    return x
