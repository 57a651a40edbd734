"""Bands as data: which bands of a file a model reads, their statistics, and the
:class:`Preprocess` record that turns file pixels into the model's input.

A checkpoint records its :class:`Preprocess`: the bands (1-based, in the model's order),
how many bands its files have, their dtype, names, per-band mean/std and the input size.
Every consumer (evaluate, predict, cam, export, serve, map) feeds the model through it:
:meth:`Preprocess.load` for a file, :meth:`Preprocess.to_input` for an array already read,
:meth:`Preprocess.input` for a batch of loaded images. RGB with ImageNet statistics is the
default record: 8-bit RGB decoding (``bands`` None), scale 255, ImageNet mean/std.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rsscene.data.images import BAND_DTYPES, BandPick, ImageError, Raster, load_tensor
from rsscene.data.transforms import MEAN, STD, eval_batch
from rsscene.errors import UserError

# Each dtype's values are divided by this before standardising: 8-bit to 0..1 as for RGB,
# integers by their largest value, floats (reflectance, radiance) as they are.
SCALES = {"uint8": 255.0, "uint16": 65535.0, "int16": 32767.0, "float32": 1.0}
# Per-band display stretch: these percentiles of each band map to black and white.
STRETCH = (2.0, 98.0)


def parse_band_spec(text: str) -> str:
    """``all``, 1-based indexes (``4,3,2``) or band names (``B04,B03,B02``), checked and
    normalised; a ``--bands`` value (argparse type)."""
    parts = [p.strip() for p in str(text).split(",")]
    if parts != [""] and "" in parts:
        raise ValueError(f"--bands {text}: an empty band between commas")
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError("--bands: expected all, 1-based indexes such as 4,3,2, or band names")
    if parts == ["all"]:
        return "all"
    if all(p.lstrip("-").isdigit() for p in parts):
        bad = [p for p in parts if int(p) < 1]
        if bad:
            raise ValueError(f"--bands {text}: band indexes start at 1 (got {', '.join(bad)})")
    if len({p.lower() for p in parts}) != len(parts):
        raise ValueError(f"--bands {text}: a band is named twice")
    return ",".join(parts)


def parse_display(text: str) -> list[int]:
    """Three 1-based band indexes ``R,G,B``: the bands an image is drawn with."""
    try:
        bands = [int(part) for part in str(text).split(",")]
    except ValueError:
        bands = []
    if len(bands) != 3 or min(bands) < 1:
        raise ValueError(f"expected three 1-based band indexes R,G,B, got {text}")
    return bands


def resolve_bands(spec: str, raster: Raster, label: str) -> tuple[BandPick, list[str]]:
    """The bands ``spec`` selects in files like ``raster`` (read from ``label``), and their
    names (the file's descriptions, else ``band N``)."""
    count = raster.array.shape[0]
    dtype = raster.array.dtype.name
    if dtype not in BAND_DTYPES:
        raise UserError(f"{label}: sample type {dtype} is not supported")
    names = raster.names or [f"band {i}" for i in range(1, count + 1)]
    parts = spec.split(",")
    if spec == "all":
        indexes = list(range(1, count + 1))
    elif all(p.isdigit() for p in parts):
        indexes = [int(p) for p in parts]
        over = [i for i in indexes if i > count]
        if over:
            raise UserError(
                f"--bands {spec}: band {over[0]} does not exist: {label} has {count} band"
                f"{'s' if count != 1 else ''} (1..{count})"
            )
    else:
        if not raster.names:
            raise UserError(
                f"--bands {spec}: {label} carries no band descriptions; give 1-based indexes"
                f" such as 4,3,2 (it has {count} bands)"
            )
        lower = [n.lower() for n in raster.names]
        missing = [p for p in parts if p.lower() not in lower]
        if missing:
            raise UserError(
                f"--bands {spec}: {label} has no band named {missing[0]!r}; its bands are"
                f" {', '.join(raster.names)}"
            )
        indexes = [lower.index(p.lower()) + 1 for p in parts]
    chosen = [names[i - 1] for i in indexes]
    named = tuple(chosen) if raster.names else None
    return BandPick(tuple(indexes), count, dtype, named), chosen


def band_stats(batches: Iterable[Tensor], scale: float) -> tuple[list[float], list[float]]:
    """Per-band mean and standard deviation of ``B x C x H x W`` batches divided by ``scale``.

    Sums are taken in float64, so 16-bit values over many images lose nothing; a constant
    band gets a standard deviation of 1 (it standardises to 0 rather than dividing by 0).
    """
    total = total_sq = None
    n = 0
    for x in batches:
        v = x.double().div_(scale).transpose(0, 1).reshape(x.shape[1], -1)
        s, sq = v.sum(1), (v * v).sum(1)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        n += v.shape[1]
    if not n:
        raise UserError("no training image to compute the band statistics from")
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_(min=0).sqrt_()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return mean.tolist(), std.tolist()


@dataclass
class Preprocess:
    """How images are fed to the model: the bands read from each file (``bands``, 1-based;
    None: every file decoded as 8-bit RGB), resized to ``size``, divided by the dtype's
    :data:`SCALES`, then standardised by ``mean``/``std`` (None: not standardised)."""

    size: int = 224
    mean: list[float] | None = field(default_factory=lambda: list(MEAN))
    std: list[float] | None = field(default_factory=lambda: list(STD))
    bands: list[int] | None = None
    band_count: int | None = None
    band_names: list[str] | None = None
    dtype: str = "uint8"
    # The three bands (1-based file indexes, among ``bands``) an image is shown with.
    display: list[int] | None = None
    # The training images' typical side before resizing: the window `rsscene map` cuts.
    source_size: int | None = None

    @property
    def normalize(self) -> bool:
        return self.mean is not None

    @property
    def channels(self) -> int:
        return len(self.bands) if self.bands else 3

    @property
    def scale(self) -> float:
        return SCALES[self.dtype]

    @property
    def standardise(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~rsscene.data.transforms.eval_batch` (and of
        evaluation's ``predict``) that standardise like this record."""
        return {
            "normalize": self.normalize,
            "mean": self.mean,
            "std": self.std,
            "scale": self.scale,
        }

    @property
    def pick(self) -> BandPick | None:
        """What :func:`~rsscene.data.images.load_tensor` reads (None: 8-bit RGB)."""
        if self.bands is None:
            return None
        count = int(self.band_count or max(self.bands))
        return BandPick(tuple(self.bands), count, self.dtype, self.named_bands)

    @property
    def named_bands(self) -> tuple[str, ...] | None:
        """The bands' names when the training files carried them (files are then read by
        name); None where they were only numbered (``band 4``)."""
        if not self.band_names or self.band_names == [f"band {i}" for i in self.bands or []]:
            return None
        return tuple(self.band_names)

    def load(self, source: str | Path | bytes, name: str | None = None) -> Tensor:
        """One file's bands at the model size, ``C x size x size`` in the data's dtype."""
        return load_tensor(source, self.size, self.pick, name=name)

    def input(self, images: Tensor, names: Sequence[str] | None = None) -> Tensor:
        """Loaded images ``B x C x H x W`` (the data's dtype) → the model's float input, always
        finite: an image holding NaN is refused (:func:`refuse_nan`, naming it by ``names``),
        and values beyond float32's reach are clipped (:func:`~rsscene.data.transforms.normalize`)."""
        refuse_nan(images, names)
        return eval_batch(images, self.size, self.normalize, self.mean, self.std, self.scale)

    def to_input(self, array: np.ndarray | Tensor, label: str = "<array>") -> Tensor:
        """An image already read (``C x H x W`` in the file's dtype, every band of the file,
        e.g. a tile of a scene) → the model's input ``1 x C' x size x size``. NaN or infinite
        values in the bands read are refused: a file's are filled when it is read
        (:func:`~rsscene.data.images.finite_bands`), so an array must come filled too."""
        array = array.numpy() if isinstance(array, Tensor) else np.asarray(array)
        pick = self.pick
        if pick is not None:
            array = pick.take(Raster(array), label)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ImageError(
                label,
                "holds NaN or infinite pixel values; fill them first, as files are filled when"
                " read (rsscene.data.images.finite_bands: each band's mean)",
            )
        x = torch.from_numpy(np.ascontiguousarray(array))
        return self.input(x[None], [label])

    def shown_as(self, display: list[int] | None) -> Preprocess:
        """This record drawing ``display`` (three 1-based bands) as red, green and blue, or a
        :class:`UserError` when they are not three of the model's bands; None: as it is."""
        if display is None:
            return self
        pre = dataclasses.replace(self, display=list(display))
        pre.display_bands()
        return pre

    def display_bands(self) -> list[int]:
        """Positions (0-based, in the model's input) of the bands shown as red, green, blue:
        ``display`` (1-based file bands, 1,2,3 for an RGB model) or by default the first three
        bands, or a model of one or two bands in grey (its first band three times)."""
        bands = self.bands or [1, 2, 3]
        chosen = self.display or (bands[:3] if len(bands) >= 3 else bands[:1] * 3)
        missing = [b for b in chosen if b not in bands]
        if missing or len(chosen) != 3:
            kind = "" if self.bands else "; it reads 8-bit RGB"
            raise UserError(
                f"show bands {','.join(map(str, chosen))}: give three of the model's bands"
                f" ({','.join(map(str, bands))}{kind})"
            )
        return [bands.index(b) for b in chosen]


def refuse_nan(images: Tensor, names: Sequence[str] | None = None) -> None:
    """An :class:`~rsscene.data.images.ImageError` naming the first of the images ``B x ...``
    that holds NaN (``names[i]``, else its place in the batch): NaN has no value to clip.

    A file's own NaN and infinities are filled when it is read; NaN here comes from resizing
    values at float32's limit (+-3.4e38, an unmarked nodata value), which overflow."""
    if not images.dtype.is_floating_point:
        return  # integers hold no NaN
    bad = images.isnan().flatten(1).any(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        label = names[i] if names else f"image {i + 1} of {len(images)} in the batch"
        raise ImageError(
            label,
            "pixel values near float32's limit (+-3.4e38, e.g. an unmarked nodata value) give NaN"
            " once resized; mark them as nodata (NaN) in the file",
        )


def render_rgb(image: Tensor, pre: Preprocess) -> Tensor:
    """A loaded image (``C x H x W``, the data's dtype) as 8-bit RGB for display: RGB as it
    is (or the ``display`` order); other bands as the chosen triple (one band in grey), each
    stretched between its 2nd and 98th percentile."""
    order = pre.display_bands()
    if pre.bands is None:
        return image if order == [0, 1, 2] else image[order]
    # float64: a float32 band reaching 3e38 would overflow to inf (and inf / inf is NaN).
    x = image[order].double()
    flat = x.reshape(3, -1)
    lo = torch.quantile(flat, STRETCH[0] / 100, dim=1).view(3, 1, 1)
    hi = torch.quantile(flat, STRETCH[1] / 100, dim=1).view(3, 1, 1)
    x = (x - lo) / (hi - lo).clamp(min=1e-12)
    return x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
