"""rsscene map against its own faults: outputs over inputs, mixed or partial folders, rasters
the file reader refuses, unwritable folders, damage outside the windows, silence in logs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from rsscene.cli import main
from rsscene.data.images import load_tensor, read_image
from rsscene.data.synthetic import CLASSES, generate_mosaic
from rsscene.inference import Predictor
from rsscene.mapping import map_scene, outputs
from test_images import tiny_checkpoint
from test_mapping import band_model

rasterio = pytest.importorskip("rasterio", reason="GeoTIFF maps need the geo extra (rasterio)")
from test_mapping import geotiff  # noqa: E402 - needs rasterio

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return tiny_checkpoint(tmp_path_factory.mktemp("faults") / "model.pt", classes=list(CLASSES))


def scene_tif(path: Path, side: int = 64, crs: str | None = "EPSG:32633") -> Path:
    pixels = np.random.default_rng(0).integers(0, 255, (3, side, side), dtype=np.uint8)
    return geotiff(path, pixels, crs=crs)


def run_map(model: Path, scene: Path, out: Path, *extra: str) -> int:
    return main(["map", str(model), str(scene), "--out", str(out), "--tile", "32", *extra])


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("rsscene map: error:") and len(err.splitlines()) == 1, err
    return err


def leftovers(folder: Path) -> list[str]:
    """What a map may have left beside its output folder: hidden working folders."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- 1. never over inputs
@pytest.mark.parametrize("name", ["classes.tif", "overlay.png", "summary.json"])
def test_the_scene_is_never_an_output(name: str, model: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "maps"
    folder.mkdir()
    if name.endswith(".tif"):
        scene = scene_tif(folder / name)
    else:
        generate_mosaic(tmp_path, 2, 2, size=32, seed=0)
        scene = folder / name
        scene.write_bytes((tmp_path / "mosaic.png").read_bytes())
    before = scene.read_bytes()
    assert run_map(model, scene, folder) == 2
    err = one_line(capsys)
    assert f"{folder / name} is the scene itself" in err
    assert scene.read_bytes() == before and sorted(os.listdir(folder)) == [name]


def test_a_map_beside_its_scene_keeps_the_scene(model: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "here"
    folder.mkdir()
    scene = scene_tif(folder / "scene.tif")
    before = scene.read_bytes()
    assert run_map(model, scene, folder) == 0
    assert run_map(model, scene, folder) == 0  # the same map again: replaced
    assert scene.read_bytes() == before
    assert sorted(os.listdir(folder)) == [
        "classes.tif",
        "overlay.png",
        "scene.tif",
        "summary.json",
        "tiles.csv",
    ]
    (folder / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert run_map(model, scene, folder) == 2
    assert "holds notes.txt" in one_line(capsys)


# --------------------------------------------------------------------------- 2. never mixed
def test_a_map_of_another_scene_is_refused_and_force_replaces_it(
    model: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    assert run_map(model, scene_tif(tmp_path / "a.tif"), out) == 0
    first = json.loads((out / "summary.json").read_text())
    png = generate_mosaic(tmp_path, 2, 2, size=32, seed=0) and tmp_path / "mosaic.png"
    capsys.readouterr()
    assert run_map(model, png, out) == 2
    err = one_line(capsys)
    assert "a map of another scene" in err and "--force replaces it" in err
    assert json.loads((out / "summary.json").read_text()) == first  # untouched
    assert run_map(model, png, out, "--force") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scene"] == str(png)
    # Replaced whole: the georeferenced map's classes.tif is gone with it.
    assert sorted(os.listdir(out)) == ["classes.png", "overlay.png", "summary.json", "tiles.csv"]
    assert leftovers(tmp_path) == []


def test_the_same_map_is_replaced_and_other_settings_are_refused(
    model: Path, tmp_path: Path, capsys
) -> None:
    scene, out = scene_tif(tmp_path / "a.tif"), tmp_path / "out"
    assert run_map(model, scene, out) == 0
    from rsscene.mapping.folder import RECORD

    record = json.loads((out / "summary.json").read_text())[RECORD]
    assert record["scene"]["path"] == str(scene.resolve())
    assert record["scene"]["bytes"] == scene.stat().st_size
    assert record["settings"]["tile"] == 32 and record["settings"]["stride"] == 32
    assert run_map(model, scene, out) == 0
    capsys.readouterr()
    assert run_map(model, scene, out, "--stride", "16") == 2
    assert "other settings (stride 32 -> 16)" in one_line(capsys)
    os.utime(scene, ns=(1, 1))  # the same path, another file
    assert run_map(model, scene, out) == 2
    assert "made before the file changed" in one_line(capsys)


def test_a_folder_of_other_files_is_never_deleted(model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "overlay.png").write_text("not a map's")
    scene = scene_tif(tmp_path / "a.tif")
    assert run_map(model, scene, out) == 2
    assert "not an rsscene map (it holds notes.txt)" in one_line(capsys)
    with pytest.raises(Exception, match="not an rsscene map"):
        map_scene(Predictor(model), scene, out, tile=32, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "overlay.png").read_text() == "not a map's"


# --------------------------------------------------------------------------- 3. atomic
@pytest.mark.parametrize("fault", [KeyboardInterrupt, OSError])
def test_an_interrupted_map_leaves_no_partial_folder(
    fault: type[BaseException], model: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    scene, out = scene_tif(tmp_path / "a.tif"), tmp_path / "maps" / "out"

    def broken(*args, **kwargs):
        raise fault(28, "No space left on device") if fault is OSError else fault()

    with monkeypatch.context() as m:
        m.setattr(outputs, "write_overlay", broken)
        assert run_map(model, scene, out) == (130 if fault is KeyboardInterrupt else 2)
    assert not (tmp_path / "maps").exists()  # nor the parent it created
    # Over an earlier map of the same scene: the earlier one stays whole.
    assert run_map(model, scene, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(outputs, "write_overlay", broken)
        assert run_map(model, scene, out) != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out.parent) == []


# --------------------------------------------------------------------------- 4. one reader
def tiff(path: Path, pixels: np.ndarray, pages: int = 1) -> Path:
    """``pixels`` (C x H x W) as a plain TIFF of ``pages`` full-resolution pages."""
    with tifffile.TiffWriter(path) as tif:
        for _ in range(pages):
            if pixels.shape[0] == 3:
                tif.write(pixels.transpose(1, 2, 0), photometric="rgb")
            elif pixels.shape[0] == 1:
                tif.write(pixels[0], photometric="minisblack")
            else:  # bands in planes (2 x H x W is not 2 pages)
                tif.write(pixels, photometric="minisblack", planarconfig="separate")
    return path


RNG = np.random.default_rng(0)
REFUSED = {
    "complex64": (RNG.random((1, 64, 64)).astype(np.complex64), "sample type complex64"),
    "float64": (RNG.random((1, 64, 64)), "sample type float64"),
    "int32": (RNG.integers(0, 999, (1, 64, 64), dtype=np.int32), "sample type int32"),
    "uint32": (RNG.integers(0, 999, (1, 64, 64), dtype=np.uint32), "sample type uint32"),
    "int8": (RNG.integers(-99, 99, (1, 64, 64), dtype=np.int8), "sample type int8"),
    "bool": (RNG.random((1, 64, 64)) > 0.5, "sample type bool"),
    "3 x float32": (RNG.random((3, 64, 64), dtype=np.float32), "has 3 bands of float32"),
    "3 x int16": (RNG.integers(0, 999, (3, 64, 64), dtype=np.int16), "has 3 bands of int16"),
    "2 x uint8": (RNG.integers(0, 255, (2, 64, 64), dtype=np.uint8), "has 2 bands"),
}


@pytest.mark.parametrize("case", [*REFUSED, "3 pages"])
def test_map_refuses_what_predict_refuses(case: str, model: Path, tmp_path: Path, capsys) -> None:
    if case == "3 pages":
        path = tiff(tmp_path / "s.tif", RNG.integers(0, 255, (3, 64, 64), dtype=np.uint8), 3)
        reason = f"{path}: has 3 pages (images)"
    else:
        pixels, reason = REFUSED[case]
        path = tiff(tmp_path / "s.tif", pixels)
    ([], [(_, why)]) = Predictor(model).predict_files([path])
    assert reason.split(": ")[-1] in why
    assert run_map(model, path, tmp_path / "out") == 2
    err = one_line(capsys)
    assert f"{path}: {why}" in err  # the same sentence, word for word
    assert not (tmp_path / "out").exists()


def test_band_models_refuse_pages_and_dtypes_alike(tmp_path: Path, capsys) -> None:
    model = band_model(tmp_path / "m.pt", [1, 2, 3], 3, "uint8")
    pages = tiff(tmp_path / "pages.tif", RNG.integers(0, 255, (3, 64, 64), dtype=np.uint8), 2)
    with pytest.raises(Exception, match="has 2 pages"):
        read_image(pages)
    assert run_map(model, pages, tmp_path / "out") == 2
    assert "pages.tif: has 2 pages (images)" in one_line(capsys)
    wide = tiff(tmp_path / "wide.tif", RNG.random((3, 64, 64)))
    with pytest.raises(Exception, match="sample type float64 is not supported"):
        load_tensor(wide, 32, Predictor(model).pre.pick)
    assert run_map(model, wide, tmp_path / "out") == 2
    assert "wide.tif: sample type float64 is not supported" in one_line(capsys)


def test_a_pyramid_is_one_image(model: Path, tmp_path: Path) -> None:
    pixels = RNG.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(pixels, photometric="rgb")
        tif.write(pixels[::2, ::2], photometric="rgb", subfiletype=1)  # reduced resolution
    ([prediction], []) = Predictor(model).predict_files([path])
    assert prediction.source == str(path)
    assert run_map(model, path, tmp_path / "out") == 0


# --------------------------------------------------------------------------- 5. unwritable
def test_a_folder_in_the_way_of_an_output_is_one_line(model: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    (out / "classes.tif").mkdir(parents=True)
    assert run_map(model, scene_tif(tmp_path / "a.tif"), out) == 2
    assert "holds classes.tif/" in one_line(capsys)
    assert os.listdir(out) == ["classes.tif"]


@pytest.mark.parametrize("where", ["the folder", "its parent"])
def test_a_read_only_folder_is_one_line(where: str, model: Path, tmp_path: Path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked if where == "the folder" else locked / "out"
    scene = scene_tif(tmp_path / "a.tif")
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user writes in read-only folders (root with CAP_DAC_OVERRIDE)")
        assert run_map(model, scene, out) == 2
    finally:
        locked.chmod(0o755)
    assert "permission denied" in one_line(capsys)
    assert os.listdir(locked) == []


# --------------------------------------------------------------------------- 6. damage outside
def test_a_truncated_strip_outside_the_windows_is_one_line(
    model: Path, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "s.tif"  # 72 rows in strips of 8: 32 px windows read rows 0-63 only
    pixels = RNG.integers(0, 255, (72, 64, 3), dtype=np.uint8)
    tifffile.imwrite(path, pixels, photometric="rgb", rowsperstrip=8)
    with tifffile.TiffFile(path) as tif:
        last = tif.pages.first.dataoffsets[-1]
    path.write_bytes(path.read_bytes()[: last + 100])
    assert run_map(model, path, tmp_path / "out") == 2
    assert f"{path}: corrupt or truncated" in one_line(capsys)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- 7. progress in logs
def test_progress_lines_without_a_terminal(model: Path, tmp_path: Path, capsys) -> None:
    png = generate_mosaic(tmp_path, 3, 4, size=32, seed=0) and tmp_path / "mosaic.png"
    predictor = Predictor(model)
    map_scene(
        predictor, png, tmp_path / "a", tile=32, batch_size=5, progress=True, progress_every=0
    )
    lines = capsys.readouterr().err.splitlines()
    assert lines[:2] == [line for line in lines[:2] if line.startswith("map: ")]
    assert lines[0].startswith("map: 5/12 windows (42%),") and "windows/s" in lines[0]
    assert len(lines) == 2  # after 5 and 10 of 12; the summary says the end
    map_scene(predictor, png, tmp_path / "b", tile=32, progress=True, progress_every=3600)
    map_scene(predictor, png, tmp_path / "c", tile=32, progress_every=0)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- 8. clear messages
@pytest.mark.parametrize(
    "pixel, tile_m, message",
    [
        (300.0, "100", "a window of less than one pixel of"),
        (10.0, "50", "a window of 5 px of"),
    ],
)
def test_a_tile_in_metres_below_the_smallest_window(
    pixel: float, tile_m: str, message: str, model: Path, tmp_path: Path, capsys
) -> None:
    from rasterio.transform import from_origin

    path = tmp_path / "s.tif"
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 3, "dtype": "uint8"}
    transform = from_origin(500000.0, 4200000.0, pixel, pixel)
    with rasterio.open(path, "w", **profile, crs="EPSG:32633", transform=transform) as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    argv = ["map", str(model), str(path), "--out", str(tmp_path / "o"), "--tile-m", tile_m]
    assert main(argv) == 2
    err = one_line(capsys)
    assert message in err and f"--tile-m {8 * pixel:g} or more" in err


# --------------------------------------------------------------------------- JSON
def test_map_json_is_strict(model: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    path = outputs.write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5]})
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1.5]}
    # A model that gives NaN (a diverged checkpoint, fp16 overflow) is refused, not mapped.
    predictor = Predictor(model)
    real = predictor.probabilities
    monkeypatch.setattr(predictor, "probabilities", lambda *a, **k: real(*a, **k) * float("nan"))
    png = generate_mosaic(tmp_path, 2, 2, size=32, seed=0) and tmp_path / "mosaic.png"
    with pytest.raises(Exception, match="non-finite probabilities for the window at pixel"):
        map_scene(predictor, png, tmp_path / "out", tile=32, tiles="geojson")
    assert not (tmp_path / "out").exists()
