"""ImageFolder-style splits, the decoded cache and the batch loader.

A split folder holds ``train/CLASS/*`` and one of ``test``, ``val``, ``valid``,
``validation``. Class names and their order come from ``train`` (sorted, as torchvision's
``ImageFolder`` does). Images are decoded once into a store (``--cache memory`` or a
memory-mapped file with ``--cache disk``) or decoded per batch (``--cache none``); both
yield the same pixels, through :func:`rsscene.data.images.load_tensor`. The store is uint8
``N x 3 x S x S`` for RGB, and ``N x C x S x S`` in the data's dtype with ``--bands``.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm import tqdm

from rsscene.data.bands import Preprocess, band_stats, resolve_bands
from rsscene.data.images import (
    BandPick,
    ImageError,
    Raster,
    image_size,
    is_image_file,
    load_tensor,
    read_image,
)
from rsscene.data.transforms import to_device
from rsscene.errors import UserError

log = logging.getLogger("rsscene")

EVAL_FOLDERS = ("test", "val", "valid", "validation")
CACHE_MODES = ("auto", "memory", "disk", "none")
# The memory cache is chosen by "auto" while it needs less than this share of free RAM, and
# moved to the GPU while it needs less than this share of the GPU's free memory.
MEMORY_SHARE = 0.25


@dataclass
class ImageList:
    """Files and their labels under one folder of class sub-folders."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def typical_side(images: ImageList, sample: int = 64) -> int | None:
    """The median shorter side of up to ``sample`` of the images (from their headers), or None
    when none can be read that way."""
    step = max(1, len(images) // sample)
    sides = []
    for path in images.paths[::step][:sample]:
        try:
            sides.append(min(image_size(path)))
        except ImageError:
            continue
    return int(np.median(sides)) if sides else None


def list_classes(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{folder}: no class folders inside (expected {folder}/CLASS/image.jpg)")
    return classes


def list_images(folder: str | Path, classes: list[str] | None = None) -> ImageList:
    """Image files under ``folder/CLASS/`` (recursively), sorted; ``classes`` fixes the order."""
    folder = Path(folder)
    found = list_classes(folder)
    if classes is None:
        classes = found
    elif set(found) - set(classes):
        raise UserError(
            f"{folder}: classes {sorted(set(found) - set(classes))} are not among the training"
            f" classes {classes}"
        )
    paths, labels, skipped = [], [], []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for p in sorted(class_dir.rglob("*")):
            if p.name.startswith(".") or p.is_dir():
                continue
            if is_image_file(p):
                paths.append(p)
                labels.append(label)
            else:
                skipped.append((str(p), "not an image file extension"))
    if not paths:
        raise UserError(f"{folder}: no images found in its class folders")
    return ImageList(folder, list(classes), paths, labels, skipped)


@dataclass
class Split:
    """A prepared dataset: training images and the held-out images evaluated after each epoch."""

    root: Path
    classes: list[str]
    train: ImageList
    test: ImageList
    val: ImageList | None = None


def find_eval_folder(root: Path) -> Path:
    for name in EVAL_FOLDERS:
        if (root / name).is_dir():
            return root / name
    raise UserError(f"{root}: no test folder (looked for {', '.join(EVAL_FOLDERS)})")


def open_split(root: str | Path) -> Split:
    """``DATA/train`` plus ``DATA/test`` (or val/valid/validation); ``DATA/val`` as well when
    both ``test`` and ``val`` exist (as ``prepare --val-ratio`` writes)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    if not (root / "train").is_dir():
        raise UserError(f"{root}: no train folder (expected {root}/train/CLASS/...)")
    train = list_images(root / "train")
    test = list_images(find_eval_folder(root), train.classes)
    val = None
    if (root / "test").is_dir() and (root / "val").is_dir():
        val = list_images(root / "val", train.classes)
    return Split(root, train.classes, train, test, val)


# --------------------------------------------------------------------------- pixel sources
class DecodedImages(Dataset):
    """Decodes and resizes one image per item; a file that fails is replaced, not fatal.

    A corrupt file (for instance one changed after ``prepare``) is logged and replaced by the
    next image of the same class, so an epoch never dies of one bad file. With
    ``strict=True`` it raises instead.
    """

    def __init__(
        self, images: ImageList, size: int, strict: bool = False, bands: BandPick | None = None
    ) -> None:
        self.images = images
        self.size = size
        self.strict = strict
        self.bands = bands
        labels = np.asarray(images.labels)
        self._by_class = [np.flatnonzero(labels == c) for c in range(len(images.classes))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        """Returns (uint8 image, label, index actually used); in a worker process, index -1
        flags an error for :meth:`BatchLoader.batches` to raise in the main process."""
        try:
            return self._decode(index)
        except UserError:
            if get_worker_info() is None:
                raise
            # A DataLoader worker's exception reaches the main process as a RuntimeError with
            # a traceback: a user's error would read as a crash.
            blank = torch.zeros(
                _channels(self.bands), self.size, self.size, dtype=_dtype(self.bands)
            )
            return blank, self.images.labels[index], -1

    def _decode(self, index: int) -> tuple[torch.Tensor, int, int]:
        label = self.images.labels[index]
        candidates = self._by_class[label]
        start = int(np.searchsorted(candidates, index))
        for step in range(len(candidates)):
            i = int(candidates[(start + step) % len(candidates)])
            try:
                return load_tensor(self.images.paths[i], self.size, self.bands), label, i
            except ImageError as e:
                if self.strict:
                    raise
                log.warning(
                    "skipped %s (replaced by another %s image)", e, self.images.classes[label]
                )
        raise UserError(f"no readable image left in class {self.images.classes[label]!r}")


def _channels(bands: BandPick | None) -> int:
    return 3 if bands is None else len(bands.indexes)


def _dtype(bands: BandPick | None) -> torch.dtype:
    return torch.uint8 if bands is None else getattr(torch, bands.dtype)


def _bands_tag(bands: BandPick | None) -> str:
    """Names the band choice in a disk cache's name ('' for RGB: its caches keep their names)."""
    if bands is None:
        return ""
    return "b" + hashlib.sha256(repr(bands).encode()).hexdigest()[:8] + "-"


def _cache_key(images: ImageList, size: int, bands: BandPick | None = None) -> str:
    # v2: readable images are packed at the front of the store, skipped ones leave no gap.
    h = hashlib.sha256(f"rsscene-cache-v2:{size}{_bands_tag(bands)}".encode())
    for p in images.paths:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:20]


def _cache_dir(images: ImageList) -> Path:
    local = images.root.parent / ".rsscene-cache"
    try:
        local.mkdir(exist_ok=True)
        if os.access(local, os.W_OK):
            return local
    except OSError:
        pass
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rsscene"
    home.mkdir(parents=True, exist_ok=True)
    return home


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def resolve_cache_mode(mode: str, n_images: int, size: int, bytes_per_pixel: int = 3) -> str:
    """``auto`` made concrete: memory while the store (``bytes_per_pixel``: bands x their
    size) needs under a quarter of the free RAM, else disk."""
    if mode not in CACHE_MODES:
        raise UserError(f"unknown cache mode {mode!r}; choose one of {', '.join(CACHE_MODES)}")
    if mode != "auto":
        return mode
    need = n_images * bytes_per_pixel * size * size
    return "memory" if need < MEMORY_SHARE * _available_memory() else "disk"


class DecodedCache:
    """Every image of an :class:`ImageList` decoded once into an ``N x C x S x S`` store: uint8
    RGB, or with ``bands`` the chosen bands in the data's dtype.

    ``mode="disk"`` keeps the store in a memory-mapped file beside the data (or in
    ``~/.cache/rsscene`` when that folder is read-only), named by a key over every file's
    path, size and mtime and the image size, so a changed file or size builds a new one
    (and deletes the older build of that folder and size). Files that cannot be decoded are
    left out and listed in ``skipped``.
    """

    def __init__(
        self,
        images: ImageList,
        size: int,
        mode: str = "memory",
        workers: int = 0,
        strict: bool = False,
        progress: bool = False,
        bands: BandPick | None = None,
    ) -> None:
        self.size = size
        self.bands = bands
        self.classes = images.classes
        self.skipped: list[tuple[str, str]] = []
        n = len(images)
        shape = (n, _channels(bands), size, size)
        if mode == "disk":
            folder = _cache_dir(images)
            # Named by folder and size, then by content: a newer build of the same folder and
            # size replaces the older one instead of piling up beside it.
            where = hashlib.sha256(str(images.root.absolute()).encode()).hexdigest()[:8]
            prefix = f"{images.root.name}-{where}-{size}-{_bands_tag(bands)}"
            name = prefix + _cache_key(images, size, bands)
            suffix = ".u8" if bands is None else f".{bands.dtype}"
            data_file, index_file = folder / f"{name}{suffix}", folder / f"{name}.json"
            if index_file.is_file() and data_file.is_file():
                self._open(data_file, json.loads(index_file.read_text()), images)
                return
            # Private temporary names: several processes (torchrun ranks) may build at once.
            tmp = f".{os.getpid()}.tmp"
            store = np.lib.format.open_memmap(
                f"{data_file}{tmp}",
                mode="w+",
                dtype=np.uint8 if bands is None else np.dtype(bands.dtype),
                shape=shape,
            )
            ok = self._fill(torch.from_numpy(store), images, workers, strict, progress)
            store.flush()
            del store
            os.replace(f"{data_file}{tmp}", data_file)
            meta = {"ok": ok, "skipped": self.skipped}
            Path(f"{index_file}{tmp}").write_text(json.dumps(meta))
            os.replace(f"{index_file}{tmp}", index_file)
            for old in folder.glob(f"{glob.escape(prefix)}*"):
                if old.stem != name and not old.name.endswith(".tmp"):
                    old.unlink(missing_ok=True)
            self._open(data_file, meta, images)
        else:
            store = torch.empty(shape, dtype=_dtype(bands))
            ok = self._fill(store, images, workers, strict, progress)
            self._keep(store, ok, images)

    def _open(self, data_file: Path, meta: dict, images: ImageList) -> None:
        # Copy-on-write: pages are read lazily and shared, and nothing can write to the file.
        store = np.load(data_file, mmap_mode="c")
        self.skipped = [tuple(s) for s in meta["skipped"]]
        self._keep(torch.from_numpy(store), meta["ok"], images)

    def _keep(self, store: torch.Tensor, ok: list[bool], images: ImageList) -> None:
        """The readable images, packed at the front of ``store``: a view, never a copy."""
        keep = torch.tensor(ok, dtype=torch.bool)
        self.images = store[: int(keep.sum())]
        self.labels = torch.tensor(images.labels)[keep]
        self.paths = [p for p, k in zip(images.paths, ok, strict=True) if k]

    def _fill(
        self, store: torch.Tensor, images: ImageList, workers: int, strict: bool, progress: bool
    ) -> list[bool]:
        """Decode every image into the next free row of ``store``; True for each one kept."""
        ok = [True] * len(images)
        row = 0
        loader = DataLoader(
            _StrictDecode(images, self.size, self.bands),
            batch_size=None,
            num_workers=workers,
            # DataLoader seeds its workers from this generator, by default the global one:
            # decoding must not shift the model's initialisation or any later random draw.
            generator=torch.Generator(),
        )
        for i, item in enumerate(tqdm(loader, desc="decoding", disable=not progress, leave=False)):
            if isinstance(item, str):
                if strict:
                    raise ImageError(str(images.paths[i]), item)
                ok[i] = False
                self.skipped.append((str(images.paths[i]), item))
            else:
                store[row] = item
                row += 1
        for path, reason in self.skipped:
            log.warning("skipped %s: %s", path, reason)
        return ok

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> DecodedCache:
        self.images = self.images.to(device)
        self.labels = self.labels.to(device)
        return self


class _StrictDecode(Dataset):
    def __init__(self, images: ImageList, size: int, bands: BandPick | None) -> None:
        self.images, self.size, self.bands = images, size, bands

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor | str:
        try:
            return load_tensor(self.images.paths[i], self.size, self.bands)
        except ImageError as e:
            return e.reason


# --------------------------------------------------------------------------- batches
@dataclass
class Batch:
    images: torch.Tensor  # B x C x S x S: uint8 RGB, or the bands in the data's dtype
    labels: torch.Tensor
    index: torch.Tensor  # rows of the source, for reporting which files were predicted


class BatchLoader:
    """Batches of images from a cache (indexing) or from files (DataLoader workers): uint8
    RGB, or with ``bands`` the chosen bands in the data's dtype.

    The order is given from outside (a permutation or ``range``), so the two sources yield
    the same batches for the same seed.
    """

    def __init__(
        self,
        images: ImageList,
        size: int,
        cache: str = "auto",
        workers: int = 0,
        device: torch.device | str = "cpu",
        strict: bool = False,
        progress: bool = True,
        bands: BandPick | None = None,
    ) -> None:
        self.images = images
        self.size = size
        self.device = torch.device(device)
        self.workers = workers
        per_pixel = _channels(bands) * _dtype(bands).itemsize
        self.mode = resolve_cache_mode(cache, len(images), size, per_pixel)
        self.classes = images.classes
        self.replaced = 0  # samples decoded from another file because theirs was unreadable
        if self.mode == "none":
            self.cache = None
            self.source = DecodedImages(images, size, strict=strict, bands=bands)
            self.labels = torch.tensor(images.labels)
            self.paths = list(images.paths)
            self.skipped = list(images.skipped)
        else:
            self.cache = DecodedCache(
                images,
                size,
                self.mode,
                workers=workers,
                strict=strict,
                progress=progress and sys.stderr.isatty(),
                bands=bands,
            )
            # "auto" judged host memory; on the GPU the cache must also leave room to train, or
            # it stays on the host and batches are copied up.
            if self.device.type == "cuda" and self.mode == "memory":
                free, _ = torch.cuda.mem_get_info(self.device)
                if self.cache.images.nbytes < MEMORY_SHARE * free:
                    self.cache.to(self.device)
            self.labels = self.cache.labels.cpu()
            self.paths = self.cache.paths
            self.skipped = list(images.skipped) + self.cache.skipped

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: list[list[int]]) -> Iterator[Batch]:
        """Yield one :class:`Batch` per list of row indices, on ``self.device``."""
        if self.cache is not None:
            for rows in order:
                idx = torch.as_tensor(rows, dtype=torch.long)
                # On a GPU cache (memory mode) the rows are gathered there; from a memory map
                # the gathered batch is copied up through pinned memory.
                at = to_device(idx, self.cache.images.device)
                x = to_device(self.cache.images[at], self.device)
                y = to_device(self.cache.labels[at], self.device)
                yield Batch(x, y, idx)
            return
        loader = DataLoader(
            self.source,
            batch_sampler=order,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            generator=torch.Generator(),  # leaves the global RNG alone, as the cache does
        )
        for rows, (x, y, idx) in zip(order, loader, strict=True):
            used = idx.tolist()
            for k in [k for k, i in enumerate(used) if i < 0]:
                x[k], _, used[k] = self.source[rows[k]]  # raises what the worker could not
            idx = torch.tensor(used)
            # DecodedImages hands back the row it used: another one means a bad file was replaced.
            self.replaced += sum(a != b for a, b in zip(rows, used, strict=True))
            yield Batch(
                x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), idx
            )


def chunks(indices: list[int], size: int, drop_last: bool = False) -> list[list[int]]:
    out = [indices[i : i + size] for i in range(0, len(indices), size)]
    if drop_last and len(out) > 1 and len(out[-1]) < size:
        out.pop()
    return out


def first_raster(images: ImageList) -> tuple[Raster, str]:
    """The first readable training image's raster and path, for choosing bands from."""
    problems = []
    for path in images.paths:
        try:
            return read_image(path), str(path)
        except ImageError as e:
            problems.append(str(e))
    raise UserError(f"{images.root}: no readable image ({problems[0] if problems else 'none'})")


def _preprocess(
    train: BatchLoader,
    size: int,
    pick: BandPick | None,
    names: list[str] | None,
    normalize: bool,
) -> Preprocess:
    """How the model trained on ``train`` is fed: 8-bit RGB with ImageNet mean/std, or the
    picked bands with their mean/std over the training images; at ``size`` px."""
    pre = Preprocess(size, source_size=typical_side(train.images))
    if pick is not None:
        pre = dataclasses.replace(
            pre, bands=list(pick.indexes), band_count=pick.count, band_names=names, dtype=pick.dtype
        )
        rows = chunks(list(range(len(train))), 256)
        pre.mean, pre.std = band_stats((b.images for b in train.batches(rows)), pre.scale)
    if not normalize:
        pre.mean = pre.std = None
    return pre


@dataclass
class TrainData:
    """What a trainer reads: training batches, the held-out images evaluated after each epoch
    (``test``, and ``val`` when the split has one, which then chooses ``best.pt``), the class
    names in label order, and ``preprocess``: how the model is fed (bands, statistics, test
    size, the images' side), built once here. Loaders of your own get 8-bit RGB with
    ImageNet mean/std at the held-out images' size."""

    train: BatchLoader
    test: BatchLoader | None = None
    val: BatchLoader | None = None
    preprocess: Preprocess | None = None

    def __post_init__(self) -> None:
        if self.preprocess is None:
            size = (self.test or self.train).size
            self.preprocess = Preprocess(size, source_size=typical_side(self.train.images))

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def held_out(self) -> dict[str, BatchLoader]:
        return {name: loader for name in ("test", "val") if (loader := getattr(self, name))}

    @classmethod
    def from_split(
        cls,
        root: str | Path,
        store_size: int,
        eval_size: int | None = None,
        cache: str = "auto",
        workers: int = 0,
        device: torch.device | str = "cpu",
        strict: bool = False,
        progress: bool = True,
        bands: str | None = None,
        normalize: bool = True,
    ) -> TrainData:
        """Loaders over a prepared split: training images stored at ``store_size`` (each
        epoch's batches are resized from there), held-out ones at ``eval_size`` (default: the
        same). ``bands`` (``all``, ``4,3,2``, names) reads those bands of multi-band files,
        standardised (unless not ``normalize``) by per-band mean/std of the training images."""
        split = open_split(root)
        eval_size = eval_size or store_size
        pick, names = None, None
        if bands is not None:
            raster, label = first_raster(split.train)
            pick, names = resolve_bands(bands, raster, label)
        loader = functools.partial(
            BatchLoader,
            workers=workers,
            device=device,
            strict=strict,
            progress=progress,
            bands=pick,
        )
        train = loader(split.train, store_size, cache)
        if not len(train):
            # Every file was left out (the decoder's lines name each): say why in one line.
            path, reason = train.skipped[0] if train.skipped else (split.train.root, "none read")
            raise UserError(
                f"{split.train.root}: no readable training image; {len(train.skipped)} left out,"
                f" the first {path}: {reason}"
            )
        # Held-out images are decoded into a store even with --cache none: an unreadable one
        # must be left out and counted, not replaced by another as in training.
        eval_cache = "memory" if cache == "none" else cache
        held_out = {
            name: loader(images, eval_size, eval_cache)
            for name, images in (("test", split.test), ("val", split.val))
            if images is not None
        }
        pre = _preprocess(train, eval_size, pick, names, normalize)
        return cls(train, **held_out, preprocess=pre)
