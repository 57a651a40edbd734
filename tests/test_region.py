"""rsscene map over a region: many scenes in one command, a folder each, region.json, one
tiles file, a VRT mosaic; reruns that skip what is done; interruptions; bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import rsscene.mapping
from rsscene.cli import main
from rsscene.data.synthetic import CLASSES
from rsscene.mapping import region as region_module
from rsscene.mapping.region import collect_scenes, folder_names, maps_a_region
from test_images import tiny_checkpoint

rasterio = pytest.importorskip("rasterio", reason="GeoTIFF maps need the geo extra (rasterio)")
from rasterio.transform import from_origin  # noqa: E402 - after the skip
from rasterio.windows import Window  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MAP_FILES = ["classes.tif", "overlay.png", "summary.json", "tiles.csv"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return tiny_checkpoint(tmp_path_factory.mktemp("region") / "model.pt", classes=list(CLASSES))


def scene(path: Path, crs: str | None = "EPSG:32633", x0=500000.0, y0=4200000.0, seed=0) -> Path:
    """A 64 x 64 px RGB GeoTIFF of 10 m pixels with its top-left corner at (x0, y0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 3, "dtype": "uint8"}
    if crs:
        profile.update(crs=crs, transform=from_origin(x0, y0, 10.0, 10.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(pixels)
    return path


def region_scenes(folder: Path) -> list[Path]:
    """Two scenes in one CRS: b is 2 cells (of 32 px) east of a's edge and 1 cell lower."""
    return [
        scene(folder / "a.tif", seed=0),
        scene(folder / "b.tif", x0=500000.0 + 1280, y0=4200000.0 - 320, seed=1),
    ]


def run_map(model: Path, scenes: list, out: Path, *extra: str) -> int:
    return main(["map", str(model), *map(str, scenes), "--out", str(out), "--tile", "32", *extra])


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def predictions(monkeypatch) -> list[str]:
    """The scenes whose windows are predicted, in order."""
    calls: list[str] = []
    real = rsscene.mapping.predict_scene

    def counted(predictor, scene, *args, **kwargs):
        calls.append(scene.path.name)
        return real(predictor, scene, *args, **kwargs)

    monkeypatch.setattr(rsscene.mapping, "predict_scene", counted)
    return calls


# --------------------------------------------------------------------------- the region
def test_several_scenes_make_a_region(model: Path, tmp_path: Path, capsys) -> None:
    scenes, out = region_scenes(tmp_path / "scenes"), tmp_path / "out"
    assert run_map(model, scenes, out) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["a", "b", "classes.vrt", "region.json", "tiles.csv"]
    assert all(sorted(os.listdir(out / n)) == MAP_FILES for n in "ab")
    summaries = {n: read_json(out / n / "summary.json") for n in "ab"}
    region = read_json(out / "region.json")
    assert region["scene_count"] == 2 and region["crs"] == ["EPSG:32633"]
    total = sum(s["per_class"][c]["cells"] for s in summaries.values() for c in CLASSES)
    assert region["cells"] == total == 8
    for c in CLASSES:
        cells = sum(s["per_class"][c]["cells"] for s in summaries.values())
        area = sum(s["per_class"][c]["area"] for s in summaries.values())
        assert region["per_class"][c]["cells"] == cells
        assert region["per_class"][c]["share"] == pytest.approx(cells / total)
        assert region["per_class"][c]["area"] == {"km²": pytest.approx(area)}
    assert region["area"]["summed"] == {"km²": ["a", "b"]} and region["area"]["not_summed"] == {}
    for entry, name in zip(region["scenes"], "ab", strict=True):
        assert entry["folder"] == name and entry["crs"] == "EPSG:32633"
        assert entry["windows"] == summaries[name]["windows"] == 4
        assert entry["scene"] == str((tmp_path / "scenes" / f"{name}.tif").resolve())
    rows = list(csv.DictReader((out / "tiles.csv").open()))
    assert [r["scene"] for r in rows] == ["a"] * 4 + ["b"] * 4
    for name in "ab":
        theirs = list(csv.DictReader((out / name / "tiles.csv").open()))
        ours = [{k: v for k, v in r.items() if k not in ("scene", "crs")} for r in rows]
        assert [
            r for r, s in zip(ours, [r["scene"] for r in rows], strict=True) if s == name
        ] == theirs
    assert "[1/2]" in printed and ": mapped, 4 windows" in printed
    assert "mosaic: classes.vrt of 2 scenes (EPSG:32633)" in printed
    for c in CLASSES:
        assert f"  {c}" in printed  # the table has a row per class


@pytest.fixture(params=["xml", "gdal"])
def builder(request, monkeypatch) -> str:
    """The VRT written here from rasterio's metadata, or by gdal.BuildVRT where osgeo is."""
    if request.param == "xml":
        monkeypatch.setattr(region_module, "_gdal", lambda: None)
    elif region_module._gdal() is None:
        pytest.skip("GDAL's Python bindings (osgeo) are not installed")
    return request.param


def test_the_vrt_reads_back_the_scenes_classes(builder: str, model: Path, tmp_path: Path) -> None:
    scenes, out = region_scenes(tmp_path / "scenes"), tmp_path / "out"
    assert run_map(model, scenes, out) == 0
    mosaic = read_json(out / "region.json")["mosaic"]
    assert mosaic["built_with"] == {"xml": "rsscene (VRT XML)", "gdal": "gdal.BuildVRT"}[builder]
    with rasterio.open(out / "classes.vrt") as vrt:
        assert (vrt.width, vrt.height) == (6, 3) and mosaic["size"] == [6, 3]
        assert vrt.crs.to_string() == "EPSG:32633" and vrt.nodata == 255
        everything = vrt.read(1)
        for name, (col, row) in {"a": (0, 0), "b": (4, 1)}.items():
            with rasterio.open(out / name / "classes.tif") as part:
                window = vrt.read(1, window=Window(col, row, 2, 2))
                assert np.array_equal(window, part.read(1))
                assert vrt.colormap(1)[1] == part.colormap(1)[1]
                assert vrt.xy(row, col) == part.xy(0, 0)  # the same place on the ground
        assert (everything == 255).sum() == 18 - 8  # the gap between the scenes is nodata
        assert json.loads(vrt.tags()["class_names"]) == list(CLASSES)


def test_the_vrt_places_coarser_and_offset_scenes(builder: str, model: Path, tmp_path: Path):
    a = scene(tmp_path / "s" / "a.tif")
    c = tmp_path / "s" / "c.tif"  # 20 m pixels, a quarter of a cell off a's grid
    profile = {"driver": "GTiff", "width": 96, "height": 96, "count": 3, "dtype": "uint8"}
    transform = from_origin(500720.0, 4199920.0, 20.0, 20.0)
    with rasterio.open(c, "w", **profile, crs="EPSG:32633", transform=transform) as dst:
        dst.write(np.random.default_rng(5).integers(0, 255, (3, 96, 96), dtype=np.uint8))
    out = tmp_path / "out"
    assert run_map(model, [a, c], out) == 0
    assert read_json(out / "region.json")["mosaic"]["size"] == [8, 6]  # at a's finer cells
    with rasterio.open(out / "classes.vrt") as vrt:
        mosaic = vrt.read(1)
        parts = [rasterio.open(out / n / "classes.tif") for n in "ac"]
        # Each cell of the mosaic holds the class of the scene's cell under its centre.
        for r, col in np.ndindex(mosaic.shape):
            x, y = vrt.xy(r, col)
            want = 255
            for part in parts:
                left, bottom, right, top = part.bounds
                if left < x < right and bottom < y < top:
                    want = part.read(1)[part.index(x, y)]
            assert mosaic[r, col] == want, (r, col)
        for part in parts:
            part.close()


def test_scenes_in_two_crss_keep_their_grids_and_skip_the_vrt(
    model: Path, tmp_path: Path, capsys
) -> None:
    a = scene(tmp_path / "a.tif", "EPSG:32633")
    c = scene(tmp_path / "c.tif", "EPSG:32634", x0=300000.0, seed=2)
    out = tmp_path / "out"
    assert run_map(model, [a, c], out, "--tiles", "geojson") == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["a", "c", "region.json", "tiles.geojson"]
    region = read_json(out / "region.json")
    assert region["crs"] == ["EPSG:32633", "EPSG:32634"]
    assert "each scene is kept on its own grid in its own CRS" in region["grids"]
    assert region["mosaic"]["file"] is None
    assert "2 CRSs (EPSG:32633: a; EPSG:32634: c)" in region["mosaic"]["skipped"]
    assert "mosaic: none, the scenes are in 2 CRSs" in printed
    assert region["area"]["summed"] == {"km²": ["a", "c"]}  # both in metres
    collection = read_json(out / "tiles.geojson")
    assert "crs" not in collection  # one collection cannot hold two CRSs: each feature says
    features = collection["features"]
    assert [f["properties"]["scene"] for f in features] == ["a"] * 4 + ["c"] * 4
    assert {f["properties"]["crs"] for f in features} == {"EPSG:32633", "EPSG:32634"}
    assert (
        features[4]["geometry"] == read_json(out / "c" / "tiles.geojson")["features"][0]["geometry"]
    )


def test_a_scene_without_georeference_is_counted_not_summed(
    model: Path, tmp_path: Path, capsys
) -> None:
    a, plain = scene(tmp_path / "a.tif"), scene(tmp_path / "plain.tif", crs=None, seed=3)
    out = tmp_path / "out"
    assert run_map(model, [a, plain], out) == 0
    region = read_json(out / "region.json")
    assert region["cells"] == 8 and region["area"]["summed"] == {"km²": ["a"]}
    assert "no georeference" in region["area"]["not_summed"]["plain"]
    a_area = read_json(out / "a" / "summary.json")["per_class"]
    for c in CLASSES:
        assert region["per_class"][c]["area"]["km²"] == pytest.approx(a_area[c]["area"])
    assert "not georeferenced: plain" in region["mosaic"]["skipped"]
    assert (out / "plain" / "classes.png").is_file() and not (out / "classes.vrt").exists()
    rows = list(csv.DictReader((out / "tiles.csv").open()))
    assert [r["crs"] for r in rows] == ["EPSG:32633"] * 4 + [""] * 4
    assert "counted in cells only: plain" in capsys.readouterr().out


def test_scenes_without_georeference_make_a_region_in_pixels(model: Path, tmp_path: Path):
    scenes = [scene(tmp_path / f"{n}.tif", crs=None, seed=i) for i, n in enumerate("pq")]
    out = tmp_path / "out"
    assert run_map(model, scenes, out) == 0
    region = read_json(out / "region.json")
    assert region["crs"] == [] and region["area"]["summed"] == {}
    assert "no area summed" in region["area"]["note"]
    assert (
        "scene" in (header := next(csv.reader((out / "tiles.csv").open()))) and "crs" not in header
    )
    assert sorted(os.listdir(out)) == ["p", "q", "region.json", "tiles.csv"]


def test_one_file_maps_as_before_and_a_folder_is_a_region(model: Path, tmp_path: Path) -> None:
    a = scene(tmp_path / "scenes" / "a.tif")
    assert run_map(model, [a], tmp_path / "one") == 0
    assert sorted(os.listdir(tmp_path / "one")) == MAP_FILES
    assert run_map(model, [tmp_path / "scenes"], tmp_path / "folder") == 0
    assert sorted(os.listdir(tmp_path / "folder")) == [
        "a",
        "classes.vrt",
        "region.json",
        "tiles.csv",
    ]
    assert maps_a_region([str(a)]) is False and maps_a_region([str(tmp_path / "*.tif")]) is True


# --------------------------------------------------------------------------- the scenes
def test_folders_and_quoted_globs_give_sorted_scenes(tmp_path: Path) -> None:
    for name in ("c.tif", "a.png", "b.TIF", "notes.txt", ".hidden.tif"):
        (tmp_path / "s" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "s" / name).write_bytes(b"x")
    (tmp_path / "s" / "deeper").mkdir()
    (tmp_path / "s" / "deeper" / "d.tif").write_bytes(b"x")
    names = lambda paths: [p.name for p in paths]  # noqa: E731
    assert names(collect_scenes([tmp_path / "s"])) == ["a.png", "b.TIF", "c.tif"]
    assert names(collect_scenes([str(tmp_path / "s" / "*.tif")])) == ["c.tif"]
    assert names(collect_scenes([str(tmp_path / "**" / "*.tif")])) == ["c.tif", "d.tif"]
    # An existing name with brackets is a file, not a pattern.
    (tmp_path / "s" / "x[1].tif").write_bytes(b"x")
    assert names(collect_scenes([str(tmp_path / "s" / "x[1].tif")])) == ["x[1].tif"]


def test_equal_stems_get_distinct_folders_whatever_the_order(tmp_path: Path) -> None:
    paths = [
        tmp_path / "2019" / "tile.tif",
        tmp_path / "2020" / "tile.tif",
        tmp_path / "2020" / "tile.png",
        tmp_path / "2020" / "Other.tif",
        tmp_path / "other.tif",
        tmp_path / "region.json.tif",
    ]
    names = folder_names(paths)
    assert names == [
        "2019-tile",
        "2020-tile-tif",
        "2020-tile-png",
        "2020-Other",
        "other",
        "region.json-tif",
    ]
    assert folder_names(paths[::-1]) == names[::-1]
    assert len({n.casefold() for n in names}) == len(names)


# --------------------------------------------------------------------------- reruns
def test_a_rerun_skips_complete_scenes_and_remaps_what_changed(
    model: Path, tmp_path: Path, predictions: list[str], capsys
) -> None:
    scenes, out = region_scenes(tmp_path / "scenes"), tmp_path / "out"
    assert run_map(model, scenes, out) == 0
    first = read_json(out / "region.json")
    assert predictions == ["a.tif", "b.tif"]
    capsys.readouterr()
    predictions.clear()
    assert run_map(model, scenes, out) == 0
    assert predictions == []
    assert capsys.readouterr().out.count("skipped (mapped earlier)") == 2
    assert read_json(out / "region.json") == first
    assert run_map(model, scenes, out, "--stride", "16") == 0
    assert predictions == ["a.tif", "b.tif"]
    assert "remapped (other settings (stride 32 -> 16))" in capsys.readouterr().out
    assert read_json(out / "region.json")["cells"] == 32  # 4 x 4 cells a scene
    predictions.clear()
    os.utime(scenes[1], ns=(1, 1))  # the same path, another file
    assert run_map(model, scenes, out, "--stride", "16") == 0
    assert predictions == ["b.tif"]
    printed = capsys.readouterr().out
    assert "a.tif -> " in printed and "skipped (mapped earlier)" in printed
    assert "remapped (the scene file changed since it was mapped)" in printed
    assert hidden(out) == []


def test_a_changed_checkpoint_remaps_every_scene(
    model: Path, tmp_path: Path, predictions: list[str], capsys
) -> None:
    scenes, out = region_scenes(tmp_path / "scenes"), tmp_path / "out"
    ckpt = tmp_path / "run" / "last.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(model.read_bytes())
    assert run_map(ckpt, scenes, out) == 0
    capsys.readouterr()
    predictions.clear()
    # Retrained: the same path, new weights.
    torch.manual_seed(1)
    tiny_checkpoint(ckpt, classes=list(CLASSES))
    assert run_map(ckpt, scenes, out) == 0
    assert predictions == ["a.tif", "b.tif"]
    assert (
        "remapped (the checkpoint changed (mapped with an earlier version"
        in capsys.readouterr().out
    )
    predictions.clear()
    assert run_map(model, scenes, out) == 0  # another checkpoint file
    assert predictions == ["a.tif", "b.tif"]
    assert (
        f"other settings (checkpoint {ckpt.resolve()} -> {model.resolve()})"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize("when", ["SIGINT in scene 2", "SIGTERM in scene 2", "SIGINT at the end"])
def test_an_interrupted_region_continues_with_the_same_command(
    when: str, model: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    scenes = [*region_scenes(tmp_path / "scenes"), scene(tmp_path / "scenes" / "c.tif", seed=2)]
    out = tmp_path / "out"
    real = rsscene.mapping.predict_scene
    calls: list[str] = []

    def stopping(predictor, s, *args, **kwargs):
        calls.append(s.path.name)
        if calls == ["a.tif", "b.tif"] and when == "SIGTERM in scene 2":
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, mid-scene
        if calls == ["a.tif", "b.tif"] and when == "SIGINT in scene 2":
            raise KeyboardInterrupt
        return real(predictor, s, *args, **kwargs)

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(rsscene.mapping, "predict_scene", stopping)
        if when.endswith("at the end"):
            m.setattr(region_module, "write_mosaic", broken)
        code = run_map(model, scenes, out)
    assert code == 128 + (signal.SIGTERM if "SIGTERM" in when else signal.SIGINT)
    err = capsys.readouterr().err
    assert err.startswith("rsscene map: interrupted by SIG") and len(err.splitlines()) == 1
    assert "the same command continues from there" in err
    mapped = ["a", "b", "c"] if when.endswith("at the end") else ["a"]
    assert f"with {len(mapped)} of 3 scenes mapped" in err
    assert sorted(os.listdir(out)) == mapped and hidden(out) == []  # no region.json, no parts
    assert sorted(os.listdir(out / "a")) == MAP_FILES
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(rsscene.mapping, "predict_scene", stopping)
        assert run_map(model, scenes, out) == 0
    assert calls == ([] if when.endswith("at the end") else ["b.tif", "c.tif"])
    assert read_json(out / "region.json")["scene_count"] == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back


def test_maps_of_scenes_left_out_are_refused_unless_forced(
    model: Path, tmp_path: Path, capsys
) -> None:
    a, b = region_scenes(tmp_path / "scenes")
    c = scene(tmp_path / "scenes" / "c.tif", seed=2)
    out = tmp_path / "out"
    assert run_map(model, [a, b], out) == 0
    capsys.readouterr()
    assert run_map(model, [a, c], out) == 2
    err = capsys.readouterr().err
    assert f"holds b/, a map of {b} that is not among these 2 scenes; --force removes it" in err
    assert sorted(os.listdir(out)) == ["a", "b", "classes.vrt", "region.json", "tiles.csv"]
    assert run_map(model, [a, c], out, "--force") == 0
    assert sorted(os.listdir(out)) == ["a", "c", "classes.vrt", "region.json", "tiles.csv"]
    # Another scene of the same name in a scene's folder: the same rule.
    other = scene(tmp_path / "elsewhere" / "a.tif", x0=600000.0, seed=4)
    capsys.readouterr()
    assert run_map(model, [other, c], out) == 2
    assert "a map of another scene" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "case, message",
    [
        ("a glob matching nothing", "none*.tif: no scene matches this pattern"),
        ("a folder without scenes", "empty: a folder without raster or image files"),
        ("a missing scene", "missing.tif: no such file or folder"),
        ("the same scene twice", "a.tif is given twice; give each scene once"),
        ("a scene and its folder", "a.tif is given twice; give each scene once"),
        ("a link to a scene", "are the same file; give each scene once"),
        ("--out is a scene's folder", "is the folder of the scene"),
        ("--out holds a scene", "holds the scene"),
        ("--out holds other files", "not empty and not an rsscene region (it holds notes.txt)"),
        ("--out holds a map", "holds the map of one scene, not a region"),
        ("--truth", "--truth compares the cells of one scene"),
        ("a scene the model cannot read", "has 2 bands"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    case: str, message: str, model: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "scenes"
    a, b = region_scenes(folder)
    out, extra = tmp_path / "out", []
    args: list = [a, b]
    if case == "a glob matching nothing":
        args = [a, str(folder / "none*.tif")]
    elif case == "a folder without scenes":
        (tmp_path / "empty").mkdir()
        args = [a, tmp_path / "empty"]
    elif case == "a missing scene":
        args = [a, folder / "missing.tif"]
    elif case == "the same scene twice":
        args = [a, b, a]
    elif case == "a scene and its folder":
        args = [a, folder]
    elif case == "a link to a scene":
        (tmp_path / "link.tif").symlink_to(a)
        args = [a, tmp_path / "link.tif"]
    elif case == "--out is a scene's folder":
        out = folder
    elif case == "--out holds a scene":
        out = tmp_path
    elif case == "--out holds other files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "--out holds a map":
        assert run_map(model, [a], out) == 0
        capsys.readouterr()
    elif case == "--truth":
        extra = ["--truth", str(tmp_path / "truth.csv")]
    else:
        profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 2, "dtype": "uint8"}
        transform = from_origin(0.0, 0.0, 10.0, 10.0)
        with rasterio.open(
            folder / "two.tif", "w", **profile, crs="EPSG:32633", transform=transform
        ) as dst:
            dst.write(np.zeros((2, 64, 64), np.uint8))
        args = [a, b, folder / "two.tif"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert run_map(model, args, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsscene map: error:") and len(err.splitlines()) == 1, err
    assert message in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_sigterm_on_one_scene_leaves_no_partial_map(
    model: Path, tmp_path: Path, monkeypatch, capsys
):
    a, out = scene(tmp_path / "a.tif"), tmp_path / "maps" / "out"

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(rsscene.mapping, "predict_scene", terminated)
    assert run_map(model, [a], out) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err == f"rsscene map: interrupted by SIGTERM; --out {out} is as it was\n"
    assert not (tmp_path / "maps").exists() and hidden(tmp_path) == []


# --------------------------------------------------------------------------- checksums
# (issue 30, part 6: a scene whose files are not as summary.json's checksums say is remapped)
@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_a_damaged_file_remaps_its_scene_and_says_which(
    damage: str, model: Path, tmp_path: Path, predictions: list[str], capsys
) -> None:
    scenes, out = region_scenes(tmp_path / "scenes"), tmp_path / "out"
    assert run_map(model, scenes, out) == 0
    written = read_json(out / "a" / "summary.json")["checksums"]
    assert sorted(written) == ["classes.tif", "overlay.png", "tiles.csv"]
    tif = out / "a" / "classes.tif"
    data = tif.read_bytes()
    if damage == "truncated":
        tif.write_bytes(data[: len(data) // 2])
        reason = f"its classes.tif is truncated ({len(data) // 2:,} of {len(data):,} bytes)"
    else:  # the same size, one byte changed
        tif.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        reason = "its classes.tif was altered since it was written (its sha256 differs)"
    capsys.readouterr()
    predictions.clear()
    assert run_map(model, scenes, out) == 0
    assert predictions == ["a.tif"]
    printed = capsys.readouterr().out
    assert f"remapped (the earlier map was incomplete ({reason}))" in printed
    assert printed.count("skipped (mapped earlier)") == 1 and "b.tif -> " in printed
    assert (
        tif.read_bytes() == data and read_json(out / "a" / "summary.json")["checksums"] == written
    )
    predictions.clear()
    assert run_map(model, scenes, out) == 0
    assert predictions == [] and hidden(out) == []


def test_a_map_without_checksums_is_remapped(
    model: Path, tmp_path: Path, predictions: list[str], capsys
) -> None:
    scenes, out = region_scenes(tmp_path / "scenes"), tmp_path / "out"
    assert run_map(model, scenes, out) == 0
    summary = read_json(out / "b" / "summary.json")
    del summary["checksums"]  # as a map made before they were recorded
    (out / "b" / "summary.json").write_text(json.dumps(summary))
    capsys.readouterr()
    predictions.clear()
    assert run_map(model, scenes, out) == 0
    assert predictions == ["b.tif"]
    reason = "no checksum of its classes.tif was recorded"
    assert f"remapped (the earlier map was incomplete ({reason}))" in capsys.readouterr().out
