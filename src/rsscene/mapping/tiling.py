"""The grid of windows over a scene, and batched prediction over it.

Windows of ``tile`` source pixels start every ``stride`` pixels; the map has one cell per
``stride`` x ``stride`` block, and a cell covered by several overlapping windows takes the mean
of their probabilities. Windows that are mostly nodata are skipped and their cells marked as
nodata. Reading the next batch of windows overlaps with the model's work on this one. Under
torchrun the ranks predict blocks of the batches, and rank 0 sums them (:func:`predict_scene`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from rsscene.data.bands import Preprocess
from rsscene.device import Dist
from rsscene.errors import UserError
from rsscene.inference import Predictor
from rsscene.mapping.ranks import block, exchange
from rsscene.mapping.scenes import Scene, window_image

# The smallest window, in source pixels.
MIN_TILE = 8
# Cells x classes of the probability sums held in memory (float32: 400 MB).
MAX_CELL_VALUES = 100_000_000
# A window with more than this share of nodata pixels is not predicted.
MAX_NODATA_SHARE = 0.5
NODATA_CLASS = 255
# Without a terminal (a log, a batch job), a progress line at most this often (seconds).
PROGRESS_EVERY = 10.0


@dataclass(frozen=True)
class Grid:
    """Windows of ``tile`` px every ``stride`` px; cells of ``stride`` px, ``rows`` x ``cols``."""

    tile: int
    stride: int
    window_rows: int
    window_cols: int

    @property
    def span(self) -> int:
        """Cells a window covers along each side."""
        return self.tile // self.stride

    @property
    def rows(self) -> int:
        return self.window_rows + self.span - 1

    @property
    def cols(self) -> int:
        return self.window_cols + self.span - 1

    def windows(self) -> Iterator[tuple[int, int]]:
        """(row, col) of each window's first cell, row by row."""
        for i in range(self.window_rows):
            for j in range(self.window_cols):
                yield i, j


def make_grid(scene: Scene, tile: int, stride: int | None = None) -> Grid:
    """The windows over ``scene``, or a one-line error for a tile or stride that cannot work."""
    stride = stride or tile
    if tile < MIN_TILE or stride < 1:
        raise UserError(
            f"--tile must be at least {MIN_TILE} px and --stride at least 1, got {tile}, {stride}"
        )
    if tile % stride:
        raise UserError(f"--stride {stride} must divide --tile {tile}, so that cells align")
    if tile > min(scene.width, scene.height):
        raise UserError(
            f"{scene.path}: the scene ({scene.width}x{scene.height} px) is smaller than one"
            f" {tile} px tile; use a --tile of at most {min(scene.width, scene.height)}"
        )
    grid = Grid(
        tile, stride, (scene.height - tile) // stride + 1, (scene.width - tile) // stride + 1
    )
    return grid


def check_capacity(scene: Scene, grid: Grid, classes: int) -> None:
    """Refuse a map whose class indexes or probability sums would not fit."""
    if classes >= NODATA_CLASS:
        raise UserError(f"a map holds at most {NODATA_CLASS - 1} classes; the model has {classes}")
    if grid.rows * grid.cols * classes > MAX_CELL_VALUES:
        raise UserError(
            f"{scene.path}: a map of {grid.rows}x{grid.cols} cells x {classes} classes is too"
            f" large to hold (over {MAX_CELL_VALUES:,} values); use a larger --stride"
        )


# --------------------------------------------------------------------------- prediction
@dataclass
class MapResult:
    """Per cell: the summed probabilities of the windows that covered it, and their count."""

    grid: Grid
    classes: list[str]
    prob_sum: np.ndarray  # rows x cols x classes, float32
    hits: np.ndarray  # rows x cols, windows predicted over each cell (tile/stride squared at most)
    windows: int = 0
    skipped: int = 0  # windows left out as mostly nodata

    @property
    def probabilities(self) -> np.ndarray:
        return self.prob_sum / np.maximum(self.hits, 1)[..., None]

    @property
    def class_map(self) -> np.ndarray:
        """rows x cols uint8: the class index, or :data:`NODATA_CLASS` where nothing was mapped."""
        out = self.prob_sum.argmax(-1).astype(np.uint8)
        out[self.hits == 0] = NODATA_CLASS
        return out


def _read_batch(
    scene: Scene, grid: Grid, cells: list[tuple[int, int]], pre: Preprocess
) -> tuple[list[torch.Tensor], list[tuple[int, int]], int]:
    """The batch's windows that are not mostly nodata, as the model reads them, their cells,
    and how many were skipped."""
    images, kept = [], []
    for i, j in cells:
        pixels, valid = scene.read(j * grid.stride, i * grid.stride, grid.tile, grid.tile)
        if pixels.dtype.kind == "f":  # NaN is nodata too, whether or not the file says so
            valid = valid & np.isfinite(pixels).all(0)
        if 1.0 - valid.mean() > MAX_NODATA_SHARE:
            continue
        images.append(window_image(pixels, scene.pick(pre), pre.size, str(scene.path), scene.names))
        kept.append((i, j))
    return images, kept, len(cells) - len(kept)


class Progress:
    """Windows done: a tqdm bar on a terminal; elsewhere (a log file, a batch job) one line on
    stderr at most every ``every`` seconds, so a long map is not silent until it ends."""

    def __init__(self, total: int, enabled: bool, every: float = PROGRESS_EVERY) -> None:
        terminal = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="tile", desc="map") if terminal else None
        self.lines = enabled and not terminal
        self.total, self.every, self.done = total, every, 0
        self.started = self.shown = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        now = time.monotonic()
        if self.lines and now - self.shown >= self.every and self.done < self.total:
            self.shown = now
            rate = self.done / max(now - self.started, 1e-9)
            left = (self.total - self.done) / max(rate, 1e-9)
            print(
                f"map: {self.done:,}/{self.total:,} windows ({self.done / self.total:.0%}),"
                f" {rate:.1f} windows/s, about {left:.0f} s left",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_finite(
    kept: list[tuple[int, int]], probs: np.ndarray, scene: Scene, grid: Grid, amp: str
) -> None:
    """Refuse non-finite probabilities (a diverged model, fp16 overflow) rather than write
    them as NaN or as a class they do not support."""
    bad = ~np.isfinite(probs).all(1)
    if bad.any():
        i, j = kept[int(bad.argmax())]
        s = grid.stride
        raise UserError(
            f"{scene.path}: the model gave non-finite probabilities for the window at pixel"
            f" ({j * s}, {i * s}) in {amp}"
            + ("; --amp off predicts in float32" if amp != "float32" else "")
        )


# A predicted batch: its windows' first cells, their probabilities, windows skipped as nodata.
Part = tuple[list[tuple[int, int]], np.ndarray, int]


def _add_batch(result: MapResult, part: Part) -> None:
    """Sum a batch's probabilities into its cells, window after window."""
    kept, probs, skipped = part
    span = result.grid.span
    for (i, j), p in zip(kept, probs, strict=True):
        result.prob_sum[i : i + span, j : j + span] += p
        result.hits[i : i + span, j : j + span] += 1
    result.windows += len(kept)
    result.skipped += skipped


def _predict_batches(
    predictor: Predictor,
    scene: Scene,
    grid: Grid,
    batches: list[list[tuple[int, int]]],
    tta: bool,
    amp: torch.dtype | None,
    bar: Progress,
    take: Callable[[Part], None],
    beat: Callable[[], None] | None,
) -> None:
    """Predict ``batches`` in order, reading the next while the model runs; each batch to
    ``take``, then ``beat`` (the ranks waiting for this one hear that it works)."""
    precision = str(amp or torch.float32).removeprefix("torch.")
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(_read_batch, scene, grid, batches[0], predictor.pre)
        for n in range(len(batches)):
            images, kept, skipped = pending.result()
            if n + 1 < len(batches):
                pending = reader.submit(_read_batch, scene, grid, batches[n + 1], predictor.pre)
            probs = np.zeros((0, len(predictor.classes)), np.float32)
            if len(kept):
                probs = predictor.probabilities(images, tta=tta, amp=amp).numpy()
                _check_finite(kept, probs, scene, grid, precision)
            take((kept, probs, skipped))
            bar.update(len(kept) + skipped)
            if beat is not None:
                beat()


def predict_scene(
    predictor: Predictor,
    scene: Scene,
    grid: Grid,
    batch_size: int = 64,
    tta: bool = False,
    progress: bool = False,
    amp: torch.dtype | None = None,
    progress_every: float = PROGRESS_EVERY,
    dist: Dist | None = None,
    beat: Callable[[], None] | None = None,
) -> MapResult | None:
    """Predict every window in batches, reading the next batch while the model runs; in
    ``amp`` precision when given (float32 otherwise, as ``predict``). ``progress``: a bar on a
    terminal, else a line every ``progress_every`` seconds. ``beat`` is called after each batch.

    Under torchrun (``dist``), each rank predicts a contiguous block of the batches one
    process forms, and rank 0 adds every rank's windows into the sums in one process's
    order, so that the map is the same bit for bit; the other ranks return None."""
    dist = dist or Dist()
    k = len(predictor.classes)
    check_capacity(scene, grid, k)
    if amp is not None:
        predictor.model.to(memory_format=torch.channels_last)  # once, not per batch
    order = list(grid.windows())
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    mine = [batches[n] for n in block(len(batches), dist.rank, dist.world)]
    result = None
    if dist.main:
        cells = (grid.rows, grid.cols)
        result = MapResult(
            grid,
            list(predictor.classes),
            np.zeros((*cells, k), np.float32),
            np.zeros(cells, np.uint32),
        )
    own: list[Part] = []  # another rank's batches, for rank 0

    def work() -> list[Part]:
        if mine:
            bar = Progress(sum(map(len, mine)), progress, progress_every)
            # Rank 0's block comes first in one process's order: it adds it as it goes.
            take = own.append if result is None else partial(_add_batch, result)
            try:
                _predict_batches(
                    predictor, scene, grid, mine, tta, amp, bar, take, beat or dist.beat
                )
            finally:
                bar.close()
        return own

    parts = exchange(dist, work)
    if result is not None:
        for rank_parts in parts[1:]:
            for part in rank_parts:
                _add_batch(result, part)
    return result
