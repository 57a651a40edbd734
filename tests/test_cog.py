"""classes.tif and probabilities.tif are cloud-optimised GeoTIFFs with overviews (mode for the
classes, average for the probabilities), their colour table, class names and band names kept;
summary.json records each file's size and sha256."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rsscene.data.synthetic import CLASSES
from rsscene.inference import Predictor
from rsscene.mapping import map_scene
from rsscene.mapping.folder import checksum
from rsscene.mapping.outputs import palette, write_class_raster, write_probabilities
from rsscene.mapping.scenes import Scene
from rsscene.mapping.tiling import NODATA_CLASS, Grid, MapResult
from test_images import tiny_checkpoint
from test_mapping import geotiff

rasterio = pytest.importorskip("rasterio", reason="GeoTIFF maps need the geo extra (rasterio)")
cogeo = pytest.importorskip("rio_cogeo.cogeo", reason="COGs are validated with rio-cogeo")
from rasterio.crs import CRS  # noqa: E402 - after the skip
from rasterio.transform import from_origin  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS, COLS, STRIDE = 600, 700, 32
NAMES = ["water", "field", "town"]


def synthetic_map() -> tuple[Scene, MapResult]:
    """A 700 x 600-cell map (large enough for overviews), without predicting a window.

    Rows 0-199: class 1 but for class 2 in the top-left cell of every 2 x 2 block, the cell
    GDAL's nearest overview keeps, so only a mode overview is 1 there. Rows 200-599: class 0
    with random probabilities; the cells left of column 100 and cell (201, 101) are nodata."""
    classes = np.ones((ROWS, COLS), np.int64)
    classes[:200][0::2, 0::2] = 2
    classes[200:] = 0
    rng = np.random.default_rng(0)
    prob_sum = np.eye(len(NAMES), dtype=np.float32)[classes] * 0.5 + 0.1
    prob_sum[200:, :, 0] = rng.uniform(0.5, 1.0, (ROWS - 200, COLS))
    hits = np.ones((ROWS, COLS), np.int64)
    hits[200:, :100] = 0
    hits[201, 101] = 0
    prob_sum[hits == 0] = 0
    grid = Grid(STRIDE, STRIDE, ROWS, COLS)
    scene = Scene(
        Path("synthetic.tif"),
        COLS * STRIDE,
        ROWS * STRIDE,
        3,
        "uint8",
        crs=CRS.from_epsg(32633),
        transform=from_origin(500000.0, 4200000.0, 10.0, 10.0),
    )
    return scene, MapResult(grid, NAMES, prob_sum, hits, windows=int(hits.sum()))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cog")
    scene, result = synthetic_map()
    write_class_raster(out, scene, result)
    write_probabilities(out, scene, result)
    return out


def assert_cog(path: Path) -> None:
    valid, errors, warnings = cogeo.cog_validate(path, quiet=True)
    assert valid and errors == [] and warnings == [], (path, errors, warnings)


def test_the_rasters_are_valid_cogs_with_overviews_and_nothing_else(written: Path) -> None:
    assert sorted(os.listdir(written)) == ["classes.tif", "probabilities.tif"]
    for name in ("classes.tif", "probabilities.tif"):
        assert_cog(written / name)
        with rasterio.open(written / name) as src:
            layout = src.tags(ns="IMAGE_STRUCTURE")
            assert layout["LAYOUT"] == "COG" and layout["COMPRESSION"] == "DEFLATE"
            assert src.block_shapes[0] == (256, 256)
            # Halved until the smallest fits in a 256-cell block: 350 x 300, 175 x 150.
            assert all(src.overviews(b) == [2, 4] for b in src.indexes)
            assert (src.width, src.height) == (COLS, ROWS)


def test_class_overviews_take_the_most_common_class(written: Path) -> None:
    with rasterio.open(written / "classes.tif") as src:
        full = src.read(1)
    with rasterio.open(written / "classes.tif", overview_level=0) as src:
        half = src.read(1)
    assert (full[:200][0::2, 0::2] == 2).all()  # what a nearest overview would keep
    assert half.shape == (300, 350)
    assert (half[:100] == 1).all()
    # Nodata is left out of the mode, and stays nodata where a block has nothing else.
    assert (half[100:, :50] == NODATA_CLASS).all() and half[100, 50] == 0


def test_probability_overviews_average_the_mapped_cells(written: Path) -> None:
    with rasterio.open(written / "probabilities.tif") as src:
        full = src.read(1)
        assert np.isnan(src.nodata) and src.dtypes[0] == "float32"
    with rasterio.open(written / "probabilities.tif", overview_level=0) as src:
        half = src.read(1)
    assert np.isnan(half[100:, :50]).all() and np.isfinite(half[:, 50:]).all()
    # Cell (201, 101) is NaN: its block's mean is that of the other three.
    block = full[200:202, 100:102]
    assert np.isnan(block).sum() == 1
    assert half[100, 50] == pytest.approx(np.nanmean(block), rel=1e-6)


def test_colour_table_names_and_nodata_survive(written: Path) -> None:
    with rasterio.open(written / "classes.tif") as src:
        colours = src.colormap(1)
        assert [colours[i] for i in range(len(NAMES))] == [(*c, 255) for c in palette(3)]
        assert json.loads(src.tags()["class_names"]) == NAMES
        assert src.descriptions == ("class index (255: nodata)",)
        assert src.nodata == NODATA_CLASS and src.crs == CRS.from_epsg(32633)
        assert src.transform == from_origin(500000.0, 4200000.0, 320.0, 320.0)
    with rasterio.open(written / "probabilities.tif") as src:
        assert src.descriptions == tuple(NAMES)


def test_a_map_writes_cogs_and_records_their_checksums(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_checkpoint(tmp_path / "model.pt", classes=list(CLASSES))
    pixels = np.random.default_rng(0).integers(0, 255, (3, 96, 128), dtype=np.uint8)
    path = geotiff(tmp_path / "scene.tif", pixels)
    out = tmp_path / "out"
    summary = map_scene(Predictor(model), path, out, tile=32, probabilities=True)
    for name in ("classes.tif", "probabilities.tif"):
        assert_cog(out / name)
    with rasterio.open(out / "classes.tif") as src:
        assert json.loads(src.tags()["class_names"]) == list(CLASSES)
        assert src.read(1).shape == (3, 4)
    written = json.loads((out / "summary.json").read_text())
    names = [Path(f).name for f in written["files"]]
    assert names == ["classes.tif", "probabilities.tif", "tiles.csv", "overlay.png"]
    assert written["checksums"] == {n: checksum(out / n) for n in names}
    assert written["checksums"]["classes.tif"]["bytes"] == (out / "classes.tif").stat().st_size
    assert "checksums" not in summary  # like the record, kept out of what map returns
