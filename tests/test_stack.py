"""Bands in separate files at different resolutions read as one scene, and STAC items."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pystac = pytest.importorskip("pystac")

from affine import Affine  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from rsscene.errors import UserError  # noqa: E402
from rsscene.mapping.stack import RESAMPLING, band_files, open_stack, read_stac  # noqa: E402

CRS = "EPSG:32633"
ORIGIN = (500_000.0, 4_600_000.0)


def write_band(path: Path, array: np.ndarray, pixel: float, crs: str | None = CRS, **kw) -> Path:
    """One band on a grid of ``pixel`` metres from the shared origin."""
    profile = {
        "driver": "GTiff",
        "width": array.shape[1],
        "height": array.shape[0],
        "count": 1,
        "dtype": array.dtype.name,
    }
    if crs is not None:
        profile |= {"crs": crs, "transform": Affine(pixel, 0, ORIGIN[0], 0, -pixel, ORIGIN[1])}
    with rasterio.open(path, "w", **profile, **kw) as dst:
        dst.write(array, 1)
    return path


@pytest.fixture
def bands(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A 10 m band (16 x 16) and a 20 m band (8 x 8, a ramp across) over the same ground."""
    fine = np.arange(256, dtype=np.float32).reshape(16, 16)
    coarse = np.tile(np.arange(8, dtype=np.float32) * 10, (8, 1))
    return (
        write_band(tmp_path / "B02.tif", fine, 10),
        write_band(tmp_path / "B05.tif", coarse, 20),
        fine,
        coarse,
    )


def test_a_coarser_band_is_read_on_the_finest_grid_nearest_repeats_its_pixels(bands):
    fine_path, coarse_path, fine, coarse = bands
    reader, names = open_stack(band_files([coarse_path, fine_path], "nearest"))
    try:
        assert reader.count == 2 and names == ["B05", "B02"]
        assert reader.ref.name == str(fine_path)  # the finest file's grid, whatever the order
        pixels = reader.read()
        assert pixels.shape == (2, 16, 16)
        np.testing.assert_array_equal(pixels[0], np.repeat(np.repeat(coarse, 2, 0), 2, 1))
        np.testing.assert_array_equal(pixels[1], fine)
    finally:
        reader.close()


def test_bilinear_interpolates_a_coarser_band_between_its_pixel_centres(bands):
    fine_path, coarse_path, _, coarse = bands
    reader, _ = open_stack(band_files([fine_path, coarse_path]))  # bilinear by default
    try:
        upsampled = reader.read()[1]
    finally:
        reader.close()
    # Fine column j's centre is at coarse column (j + 0.5) / 2 - 0.5: a ramp of 10 per coarse
    # pixel rises 5 per fine pixel, from 2.5 at column 1 (clamped at the edges).
    j = np.arange(1, 15)
    np.testing.assert_allclose(upsampled[:, 1:15], np.tile(5.0 * j - 2.5, (16, 1)), atol=1e-3)
    nearest = np.repeat(np.repeat(coarse, 2, 0), 2, 1)
    assert not np.allclose(upsampled, nearest)


def test_a_window_is_the_same_pixels_as_the_whole_stack_and_nodata_in_any_band_masks(tmp_path):
    fine = np.full((16, 16), 7, dtype=np.uint16)
    coarse = np.full((8, 8), 3, dtype=np.uint16)
    coarse[:2, :2] = 0  # nodata: the top left 4 x 4 fine pixels
    a = write_band(tmp_path / "a.tif", fine, 10)
    b = write_band(tmp_path / "b.tif", coarse, 20, nodata=0)
    reader, _ = open_stack(band_files([a, b], "nearest"))
    try:
        whole = reader.read()
        window = Window(2, 3, 9, 7)
        np.testing.assert_array_equal(reader.read(window=window), whole[:, 3:10, 2:11])
        mask = reader.dataset_mask()
        assert (mask[:4, :4] == 0).all() and (mask[4:, :] > 0).all() and (mask[:, 4:] > 0).all()
        assert reader.read(out_shape=(2, 4, 4)).shape == (2, 4, 4)  # the overlay's preview
    finally:
        reader.close()


def test_band_files_that_cannot_be_stacked_are_refused_in_one_line(tmp_path, bands):
    fine_path, _, fine, _ = bands
    other_crs = write_band(tmp_path / "utm34.tif", fine, 10, crs="EPSG:32634")
    plain = write_band(tmp_path / "plain.tif", fine, 10, crs=None)
    (tmp_path / "broken.tif").write_bytes(b"II*\x00not a tiff")
    far = tmp_path / "far.tif"
    with rasterio.open(
        far,
        "w",
        driver="GTiff",
        width=4,
        height=4,
        count=1,
        dtype="uint8",
        crs=CRS,
        transform=Affine(10, 0, 0, 0, -10, 0),
    ) as dst:
        dst.write(np.zeros((1, 4, 4), dtype=np.uint8))
    cases = {
        other_crs: "different CRSs",
        plain: "has no georeference",
        tmp_path / "broken.tif": "cannot read",
        far: "does not overlap",
    }
    for path, words in cases.items():
        with pytest.raises(UserError, match=words) as e:
            open_stack(band_files([fine_path, path]))
        assert "\n" not in str(e.value) and str(fine_path) in str(e.value)
    with pytest.raises(UserError, match="two or more"):
        band_files([fine_path])


def stac_item(folder: Path, item_id: str, assets: dict[str, tuple[Path, dict]]) -> dict:
    item = pystac.Item(
        id=item_id,
        geometry=None,
        bbox=None,
        datetime=__import__("datetime").datetime(2024, 6, 1),
        properties={},
    )
    for key, (path, extra) in assets.items():
        item.add_asset(
            key,
            pystac.Asset(
                href=path.name, media_type=pystac.MediaType.COG, roles=["data"], extra_fields=extra
            ),
        )
    item.add_asset(
        "thumbnail",
        pystac.Asset(href="t.png", media_type=pystac.MediaType.PNG, roles=["thumbnail"]),
    )
    return item.to_dict(include_self_link=False, transform_hrefs=False)


def test_a_stac_item_s_assets_are_chosen_by_key_or_band_name_in_the_order_asked(tmp_path, bands):
    fine_path, coarse_path, fine, _ = bands
    assets = {
        "blue": (fine_path, {"eo:bands": [{"name": "B02", "common_name": "blue"}]}),
        "rededge1": (coarse_path, {"eo:bands": [{"name": "B05", "common_name": "rededge"}]}),
    }
    path = tmp_path / "item.json"
    path.write_text(json.dumps(stac_item(tmp_path, "S2A_1", assets)))
    (stack,) = read_stac(path, assets=["B05", "blue"], resampling="nearest")
    assert stack.name == "S2A_1" and stack.names == ("B05", "blue")
    # Relative hrefs are the item file's neighbours.
    assert stack.files == (str(coarse_path), str(fine_path))
    reader, _ = open_stack(stack)
    try:
        np.testing.assert_array_equal(reader.read()[1], fine)
    finally:
        reader.close()
    (by_model,) = read_stac(path, wanted=["b02"])  # a model's band names, any case
    assert by_model.files == (str(fine_path),)
    with pytest.raises(UserError, match=r"no asset 'B8A'.*blue, rededge1") as e:
        read_stac(path, assets=["B02", "B8A"])
    assert "thumbnail" not in str(e.value)
    with pytest.raises(UserError, match="choose the item's assets for them with --assets"):
        read_stac(path, bands=13)  # a 13-band model that never named its bands
    with pytest.raises(UserError, match="no asset 'red'; choose them with --assets"):
        read_stac(path)  # an RGB model, and no red/green/blue or visual asset


def test_an_item_collection_is_one_stack_per_item_and_other_json_is_refused(
    tmp_path, bands, monkeypatch
):
    fine_path, coarse_path, _, _ = bands
    monkeypatch.chdir("/")  # relative hrefs are the collection file's neighbours, not cwd's
    items = [
        stac_item(tmp_path, f"tile-{i}", {"B02": (fine_path, {}), "B05": (coarse_path, {})})
        for i in range(2)
    ]
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    stacks = read_stac(path, assets=["B02", "B05"])
    assert [s.name for s in stacks] == ["tile-0", "tile-1"]
    assert all(s.files == (str(fine_path), str(coarse_path)) for s in stacks)
    assert "items.json (item tile-1)" in stacks[1].label
    (tmp_path / "other.json").write_text(json.dumps({"type": "Catalog"}))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.json").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    for name, words in (
        ("other.json", "not a STAC item or item collection"),
        ("bad.json", "not a readable STAC item"),
        ("empty.json", "without items"),
    ):
        with pytest.raises(UserError, match=words):
            read_stac(tmp_path / name, assets=["B02"])


# --------------------------------------------------------------------------- rsscene map
def test_a_band_model_maps_band_files_and_a_stac_item_as_one_file_of_those_bands(tmp_path, capsys):
    from rsscene.cli import main
    from test_mapping import band_model, cells, geotiff

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4000, (13, 64, 64), dtype=np.uint16)
    model = str(band_model(tmp_path / "m.pt", [4, 3, 2, 8], 13, "uint16"))
    common = ["--tile", "32", "--amp", "off"]
    one = tmp_path / "one"
    assert (
        main(["map", model, str(geotiff(tmp_path / "s13.tif", pixels)), "--out", str(one), *common])
        == 0
    )
    files = {f"B0{b}": geotiff(tmp_path / f"B0{b}.tif", pixels[b - 1 : b]) for b in (4, 3, 2, 8)}
    stacked = tmp_path / "stacked"
    argv = ["map", model, "--band-files", *map(str, files.values()), "--out", str(stacked)]
    assert main([*argv, *common]) == 0
    assert cells(stacked) == cells(one)  # the same classes and probabilities, cell for cell

    item = tmp_path / "item.json"
    item.write_text(json.dumps(stac_item(tmp_path, "S2", {k: (p, {}) for k, p in files.items()})))
    by_item = tmp_path / "item-map"
    argv = ["map", model, str(item), "--assets", "B04", "B03", "B02", "B08", "--out", str(by_item)]
    assert main([*argv, *common]) == 0
    assert cells(by_item) == cells(one)
    summary = json.loads((by_item / "summary.json").read_text())
    assert summary["rsscene_map"]["settings"]["bands"]["names"] == ["B04", "B03", "B02", "B08"]
    capsys.readouterr()
    # Another order of the same assets is another map: not taken for the earlier one (one
    # scene's --out is replaced only with --force).
    argv = ["map", model, str(item), "--assets", "B03", "B04", "B02", "B08", "--out", str(by_item)]
    assert main([*argv, *common]) == 2
    err = capsys.readouterr().err
    assert "bands.names ['B04', 'B03', 'B02', 'B08'] -> ['B03', 'B04'," in err
    assert len(err.splitlines()) == 1 and len(err) < 400
    assert main([*argv, *common, "--force"]) == 0
    assert cells(by_item) != cells(one)
    # A model whose bands were never named needs --assets.
    assert main(["map", model, str(item), "--out", str(tmp_path / "x"), *common]) == 2
    err = capsys.readouterr().err
    assert "choose the item's assets for them with --assets" in err and len(err.splitlines()) == 1
    assert main(["map", model, "--out", str(tmp_path / "x")]) == 2
    assert "give a SCENE" in capsys.readouterr().err


def test_a_coarser_band_file_maps_on_the_finest_grid_and_resampling_is_a_setting(tmp_path):
    from rsscene.cli import main
    from test_mapping import band_model, cells

    rng = np.random.default_rng(1)
    model = str(band_model(tmp_path / "m.pt", [1, 2], 2, "uint16"))
    fine = write_band(tmp_path / "fine.tif", rng.integers(0, 4000, (64, 64), dtype=np.uint16), 10)
    coarse = write_band(
        tmp_path / "coarse.tif", rng.integers(0, 4000, (32, 32), dtype=np.uint16), 20
    )
    runs = {}
    for how in RESAMPLING:
        out = tmp_path / how
        argv = ["map", model, "--band-files", str(fine), str(coarse), "--out", str(out)]
        assert main([*argv, "--tile", "32", "--resampling", how, "--amp", "off"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["size"] == [64, 64]  # the 10 m grid
        assert summary["rsscene_map"]["settings"]["bands"]["resampling"] == how
        runs[how] = [float(r["probability"]) for r in cells(out)]
    assert runs["nearest"] != runs["bilinear"]


def test_an_item_collection_maps_as_a_region_one_folder_per_item(tmp_path, capsys):
    from rsscene.cli import main
    from test_mapping import band_model

    rng = np.random.default_rng(2)
    model = str(band_model(tmp_path / "m.pt", [1, 2], 2, "uint16"))
    items = []
    for i in range(2):
        folder = tmp_path / f"scene{i}"
        folder.mkdir()
        a = write_band(folder / "a.tif", rng.integers(0, 4000, (64, 64), dtype=np.uint16), 10)
        b = write_band(folder / "b.tif", rng.integers(0, 4000, (32, 32), dtype=np.uint16), 20)
        item = stac_item(folder, f"S2-{i}", {"a": (a, {}), "b": (b, {})})
        for asset in item["assets"].values():
            asset["href"] = f"scene{i}/{asset['href']}"  # relative to the collection file
        items.append(item)
    collection = tmp_path / "items.json"
    collection.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    out = tmp_path / "region"
    argv = ["map", model, str(collection), "--assets", "a", "b", "--out", str(out), "--tile", "32"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["S2-0", "S2-1"]
    region = json.loads((out / "region.json").read_text())
    assert [s["bands"]["item"] for s in region["scenes"]] == ["S2-0", "S2-1"]
    assert "items.json (item S2-1)" in capsys.readouterr().out
    assert main(argv) == 0  # the same command again: both kept
    assert capsys.readouterr().out.count("skipped (mapped earlier)") == 2


def test_stacks_get_folders_of_their_own_and_one_given_twice_is_refused(tmp_path, bands):
    from rsscene.mapping.region import collect_scenes, folder_names
    from rsscene.mapping.stack import Stack

    fine_path, coarse_path, _, _ = bands
    files = (str(fine_path), str(coarse_path))
    one = Stack(tmp_path / "a.json", "S2", files, ("x", "y"))
    other = Stack(tmp_path / "b.json", "S2", files, ("x", "y"))  # another collection, same id
    stacked = band_files([fine_path, coarse_path])  # beside B02.tif, named for it
    names = folder_names(collect_scenes([one, other, stacked, str(fine_path)]))
    assert len(set(names)) == 4 and names[:2] == ["a-S2", "b-S2"], names
    again = Stack(tmp_path / "x" / ".." / "a.json", "S2", files, ("x", "y"))
    with pytest.raises(
        UserError, match=r"a.json \(item S2\) and .*a.json \(item S2\) are the same"
    ):
        collect_scenes([one, again])
