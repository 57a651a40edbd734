"""rsscene map: windows, georeferenced outputs, nodata, overlap, and clear errors."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_data
from rsscene import checkpoint
from rsscene.checkpoint import Checkpoint, Preprocess
from rsscene.cli import main
from rsscene.data.synthetic import CLASSES, generate_mosaic
from rsscene.inference import Predictor
from rsscene.mapping import map_scene, open_scene
from rsscene.mapping.tiling import make_grid, predict_scene
from rsscene.models import create_model
from test_images import tiny_checkpoint

rasterio = pytest.importorskip("rasterio", reason="GeoTIFF maps need the geo extra (rasterio)")
from rasterio.transform import from_origin  # noqa: E402 - after the skip
from rasterio.windows import Window, bounds  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return tiny_checkpoint(tmp_path_factory.mktemp("map") / "model.pt", classes=list(CLASSES))


def band_model(path: Path, bands: list[int], count: int, dtype: str) -> Path:
    """A random-init model that reads ``bands`` of ``count``-band ``dtype`` files at 32 px."""
    torch.manual_seed(0)
    weights = create_model("resnet18", num_classes=len(CLASSES), in_channels=len(bands))
    pre = Preprocess(32, [0.3] * len(bands), [0.2] * len(bands), bands, count, dtype=dtype)
    record = Checkpoint(weights.state_dict(), "resnet18", list(CLASSES), preprocess=pre)
    return checkpoint.save(record, path)


def geotiff(path: Path, pixels: np.ndarray, crs: str | None = "EPSG:32633", nodata=None) -> Path:
    """``pixels`` (C x H x W) as a GeoTIFF with 10 m pixels, or a plain TIFF without ``crs``."""
    profile = {
        "driver": "GTiff",
        "count": pixels.shape[0],
        "height": pixels.shape[1],
        "width": pixels.shape[2],
        "dtype": pixels.dtype.name,
        "nodata": nodata,
    }
    if crs:
        profile.update(crs=crs, transform=from_origin(500000.0, 4200000.0, 10.0, 10.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(pixels)
    return path


def cells(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "tiles.csv").open()))


@pytest.mark.parametrize(
    "name, tile",
    [
        ("landsat7-rgb.tif", 64),
        ("naip-rgbn-2010.tif", 96),
        ("naip-rgbn-2019.tif", 96),
        ("spacenet-pan.tif", 100),
    ],
)
def test_real_scenes_map_onto_their_own_grid(name: str, tile: int, model: Path, tmp_path: Path):
    scene = shared_data("scenes") / name
    if name.startswith("naip"):  # red, green, blue, near-infrared: a 4-band model reads them
        model = band_model(tmp_path / "rgbn.pt", [1, 2, 3, 4], 4, "uint8")
    out = tmp_path / "map"
    assert main(["map", str(model), str(scene), "--out", str(out), "--tile", str(tile)]) == 0
    with rasterio.open(scene) as src, rasterio.open(out / "classes.tif") as classes:
        assert classes.crs == src.crs
        assert (classes.width, classes.height) == (src.width // tile, src.height // tile)
        assert classes.transform == src.transform @ src.transform.scale(tile)
        class_map = classes.read(1)
        for row in cells(out):
            r, c = int(row["row"]), int(row["col"])
            expected = bounds(Window(c * tile, r * tile, tile, tile), src.transform)
            got = tuple(float(row[k]) for k in ("left", "bottom", "right", "top"))
            assert got == pytest.approx(expected, abs=1e-6)
            assert (row["class"] == "nodata") == (class_map[r, c] == 255)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["crs"] == rasterio.open(scene).crs.to_string()
    if name.startswith("landsat"):  # a rotated scene inside a border of nodata 0
        assert summary["windows_skipped_nodata"] > 0 and summary["nodata_cells"] > 0


def test_a_mosaic_maps_as_predict_classifies_its_scenes(model: Path, tmp_path: Path) -> None:
    truth = generate_mosaic(tmp_path / "mosaic", 3, 4, size=48, seed=0)
    predictor = Predictor(model)
    summary = map_scene(
        predictor,
        tmp_path / "mosaic" / "mosaic.png",
        tmp_path / "out",
        tile=48,
        batch_size=5,  # batches that do not divide the 12 tiles
        truth=tmp_path / "mosaic" / "mosaic.csv",
    )
    assert summary["crs"] is None and (tmp_path / "out" / "classes.png").is_file()
    # One window per scene: the same pixels, so the same class as predict gives each scene.
    from PIL import Image

    mosaic = Image.open(tmp_path / "mosaic" / "mosaic.png")
    scenes = []
    for r, c, _ in truth:
        path = tmp_path / f"scene-{r}-{c}.png"
        mosaic.crop((c * 48, r * 48, (c + 1) * 48, (r + 1) * 48)).save(path)
        scenes.append(path)
    results, _ = predictor.predict_files(scenes, topk=1)
    mapped = {(int(row["row"]), int(row["col"])): row["class"] for row in cells(tmp_path / "out")}
    assert [mapped[r, c] for r, c, _ in truth] == [p.top[0][0] for p in results]
    right = sum(p.top[0][0] == cls for p, (_, _, cls) in zip(results, truth, strict=True))
    assert summary["truth"]["accuracy"] == pytest.approx(right / len(truth))


def test_overlapping_windows_average_their_probabilities(model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = geotiff(tmp_path / "s.tif", rng.integers(0, 255, (3, 96, 128), dtype=np.uint8))
    predictor, scene = Predictor(model), open_scene(path)
    coarse = predict_scene(predictor, scene, make_grid(scene, 32))
    fine = predict_scene(predictor, scene, make_grid(scene, 32, stride=16))
    assert fine.grid.rows == 6 and fine.grid.cols == 8  # cells of 16 px, windows of 2 x 2 cells
    assert fine.hits[0, 0] == 1 and fine.hits[1, 1] == 4 and fine.hits.sum() == 4 * fine.windows
    assert np.allclose(fine.probabilities.sum(-1), 1, atol=1e-5)
    # A corner cell is seen by one window only: the non-overlapping map's first window.
    assert np.allclose(fine.probabilities[0, 0], coarse.probabilities[0, 0], atol=1e-5)
    scene.close()


def test_nodata_windows_are_skipped_and_marked(model: Path, tmp_path: Path) -> None:
    pixels = np.full((3, 64, 96), 120, dtype=np.uint16)
    pixels[:, :, :32] = 0  # the left third is nodata
    path = geotiff(tmp_path / "s.tif", pixels, nodata=0)
    out = tmp_path / "out"
    assert main(["map", str(model), str(path), "--out", str(out), "--tile", "32"]) == 0
    classes = [[row["class"] for row in cells(out) if row["row"] == str(r)] for r in range(2)]
    assert [row[0] for row in classes] == ["nodata", "nodata"]
    assert all(c != "nodata" for row in classes for c in row[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["windows_skipped_nodata"] == 2 and summary["area_unit"] == "km²"
    assert summary["cell_area"] == pytest.approx(320 * 320 / 1e6)


def test_a_band_model_maps_its_bands_and_refuses_other_scenes(
    model: Path, tmp_path: Path, capsys
) -> None:
    rng = np.random.default_rng(0)
    scene13 = geotiff(tmp_path / "s13.tif", rng.integers(0, 4000, (13, 64, 64), dtype=np.uint16))
    model13 = band_model(tmp_path / "m13.pt", [4, 3, 2, 8], 13, "uint16")
    out = tmp_path / "out"
    argv = ["map", str(model13), str(scene13), "--out", str(out), "--tile", "32", "--amp", "off"]
    assert main(argv) == 0
    # The same window through predict's path for a file: the same class (both in float32).
    window = tmp_path / "window.tif"
    geotiff(window, rasterio.open(scene13).read(window=Window(32, 0, 32, 32)))
    (prediction,), _ = Predictor(model13).predict_files([window], topk=1)
    assert cells(out)[1]["class"] == prediction.top[0][0]
    capsys.readouterr()
    rgb = geotiff(tmp_path / "s3.tif", rng.integers(0, 255, (3, 64, 64), dtype=np.uint8))
    assert main(["map", str(model13), str(rgb), "--out", str(out), "--tile", "32"]) == 2
    err = capsys.readouterr().err
    assert "has 3 bands, but the model was trained on files with 13" in err
    assert main(["map", str(model), str(scene13), "--out", str(out), "--tile", "32"]) == 2
    err = capsys.readouterr().err
    assert "has 13 bands, but the model reads 8-bit RGB" in err and len(err.splitlines()) == 1


def test_tile_in_metres_and_geojson_in_the_scenes_crs(model: Path, tmp_path: Path) -> None:
    path = geotiff(tmp_path / "s.tif", np.zeros((3, 80, 80), dtype=np.uint8) + 90)
    out = tmp_path / "out"
    argv = [
        "map",
        str(model),
        str(path),
        "--out",
        str(out),
        "--tile-m",
        "400",
        "--tiles",
        "geojson",
    ]
    assert main(argv) == 0
    collection = json.loads((out / "tiles.geojson").read_text())
    assert collection["crs"]["properties"]["name"] == "EPSG:32633"
    assert len(collection["features"]) == 4  # 40 px windows (400 m at 10 m) over 80 x 80 px
    ring = collection["features"][0]["geometry"]["coordinates"][0]
    assert ring[0] == [500000.0, 4200000.0] and ring[2] == [500400.0, 4199600.0]


@pytest.mark.parametrize(
    "case, message",
    [
        ("truncated", "corrupt or truncated"),
        ("smaller than a tile", "is smaller than one 64 px tile; use a --tile of at most 40"),
        ("tile larger than the scene", "is smaller than one 500 px tile"),
        ("stride", "--stride 24 must divide --tile 64"),
        ("metres without a CRS", "--tile-m needs a georeferenced scene"),
    ],
)
def test_bad_scenes_and_settings_get_one_line(
    case: str, message: str, model: Path, tmp_path: Path, capsys
) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (3, 200, 200), dtype=np.uint8)
    path = geotiff(tmp_path / "s.tif", pixels)
    extra = ["--tile", "64"]
    if case == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "smaller than a tile":
        path = geotiff(tmp_path / "small.tif", pixels[:, :40, :60])
    elif case == "tile larger than the scene":
        extra = ["--tile", "500"]
    elif case == "stride":
        extra += ["--stride", "24"]
    else:
        path = geotiff(tmp_path / "plain.tif", pixels, crs=None)
        extra = ["--tile-m", "100"]
    assert main(["map", str(model), str(path), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsscene map: error:") and message in err, err
    assert len(err.splitlines()) == 1


def test_a_tiff_without_a_crs_maps_in_pixels(model: Path, tmp_path: Path, capsys) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    path = geotiff(tmp_path / "plain.tif", pixels, crs=None)
    assert main(["map", str(model), str(path), "--out", str(tmp_path / "out"), "--tile", "32"]) == 0
    assert "no georeference: pixel coordinates" in capsys.readouterr().out
    assert (tmp_path / "out" / "classes.png").is_file()
    assert not (tmp_path / "out" / "classes.tif").exists()
    assert "left" not in cells(tmp_path / "out")[0]


# --------------------------------------------------------------------------- serve
def test_serve_maps_an_uploaded_scene(model: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi", reason="serving needs the serve extra (rsscene[serve])")
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from rsscene.serve.app import create_app

    generate_mosaic(tmp_path, 2, 3, size=32, seed=0)
    pixels = np.random.default_rng(0).integers(0, 255, (3, 64, 96), dtype=np.uint8)
    tif = geotiff(tmp_path / "s.tif", pixels).read_bytes()
    huge = tmp_path / "huge.tif"  # a header claiming 12,000 x 12,000 px, its blocks never written
    profile = {"driver": "GTiff", "width": 12000, "height": 12000, "count": 3, "dtype": "uint8"}
    with rasterio.open(huge, "w", **profile, tiled=True, sparse_ok=True):
        pass
    with TestClient(create_app(model)) as client:
        png = (tmp_path / "mosaic.png").read_bytes()
        answer = client.post("/map?tile=32", files={"file": ("mosaic.png", png)})
        assert answer.status_code == 200, answer.text
        summary = answer.json()["summary"]
        assert summary["scene"] == "mosaic.png" and summary["grid"] == [2, 3]
        assert sum(v["cells"] for v in summary["per_class"].values()) == 6
        overlay = Image.open(io.BytesIO(base64.b64decode(answer.json()["overlay"])))
        assert overlay.format == "PNG"
        answer = client.post("/map?tile=32", files={"file": ("s.tif", tif)})
        assert answer.status_code == 200 and answer.json()["summary"]["crs"] == "EPSG:32633"
        small = client.post("/map?tile=128", files={"file": ("s.tif", tif)})
        assert small.status_code == 422 and "s.tif" in small.json()["error"]
        assert "smaller than one 128 px tile" in small.json()["error"]
        many = client.post("/map?tile=8&stride=1", files={"file": ("s.tif", tif)})
        assert many.status_code == 422 and "the limit is 4,096" in many.json()["error"]
        big = client.post("/map", files={"file": ("huge.tif", huge.read_bytes())})
        assert big.status_code == 422 and "too large" in big.json()["error"], big.text


def test_probabilities_without_rasterio_is_one_line(
    model: Path, tmp_path: Path, monkeypatch, capsys
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "rasterio" else real(name, *a)
    )
    png = generate_mosaic(tmp_path, 1, 2, size=32) and tmp_path / "mosaic.png"
    argv = ["map", str(model), str(png), "--out", str(tmp_path / "out"), "--probabilities"]
    assert main(argv) == 2
    assert 'pip install "rsscene[geo]"' in capsys.readouterr().err


def test_nan_in_a_float_scene_is_nodata(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).random((4, 64, 96), dtype=np.float32)
    pixels[:, :, :32] = np.nan  # a float raster's usual nodata, though the file does not say so
    pixels[:, 5, 40] = np.nan  # one stray pixel: filled with its window's band mean
    path = geotiff(tmp_path / "s.tif", pixels)
    model = band_model(tmp_path / "m.pt", [1, 2, 3, 4], 4, "float32")
    out = tmp_path / "out"
    assert main(["map", str(model), str(path), "--out", str(out), "--tile", "32"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["windows"], summary["windows_skipped_nodata"]) == (4, 2)
    probs = [float(r["probability"]) for r in cells(out) if r["class"] != "nodata"]
    assert len(probs) == 4 and all(0 < p <= 1 for p in probs)
