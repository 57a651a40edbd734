"""rsscene map on remote rasters: a URL is read window by window with HTTP range requests
(GDAL's /vsicurl/), from a small range-capable server on 127.0.0.1; the map equals the local
file's, one window of a large COG costs a small part of its bytes, a server that fails gives
one line and no complete-looking output, and a region resumes past its remote scene."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from range_server import LAST_MODIFIED
from rsscene.cli import main
from rsscene.data.synthetic import CLASSES
from rsscene.inference import Predictor
from rsscene.mapping import map_scene
from rsscene.mapping.remote import RemoteName, remote_failure, remote_record
from test_images import tiny_checkpoint

rasterio = pytest.importorskip("rasterio", reason="remote scenes are read by GDAL (rasterio)")
from rasterio.shutil import copy as copy_raster  # noqa: E402 - after the skip
from rasterio.transform import from_origin  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the server
class Server:
    """tests/range_server.py in a process of its own, serving the files put in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root, self.rules = root, {}
        script = Path(__file__).with_name("range_server.py")
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True
        )
        self.base = f"http://127.0.0.1:{self.process.stdout.readline().strip()}"

    def put(self, name: str, path: Path) -> str:
        """``path`` served as ``/name``: its URL."""
        (self.root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, self.root / name)
        return f"{self.base}/{name}"

    def rule(self, name: str, **how: object) -> None:
        """How ``/name`` is answered: ``status``, ``cut_after`` (bytes), ``etag``."""
        self.rules[f"/{name}"] = how
        request = urllib.request.Request(
            f"{self.base}/_rules", data=json.dumps(self.rules).encode(), method="PUT"
        )
        urllib.request.urlopen(request, timeout=10).close()

    def log(self) -> dict:
        """Body bytes sent per path (``sent``) and every path asked for (``asked``)."""
        with urllib.request.urlopen(f"{self.base}/_log", timeout=10) as answer:
            return json.load(answer)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("served"))
    yield running
    running.close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch) -> None:
    """GDAL retries a 5xx 3 times, 1, 2 and 4 s apart: here 0.05 s apart."""
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return tiny_checkpoint(tmp_path_factory.mktemp("remote") / "model.pt", classes=list(CLASSES))


def cog(path: Path, pixels: np.ndarray, block: int = 64) -> Path:
    """``pixels`` (C x H x W uint8) as a cloud-optimised GeoTIFF of 10 m pixels in UTM 33N,
    tiled ``block`` px and deflated, with overviews (GDAL's COG driver)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = path.with_name(f"plain-{path.name}")
    count, height, width = pixels.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "count": count}
    profile |= {"dtype": "uint8", "crs": "EPSG:32633"}
    with rasterio.open(plain, "w", transform=from_origin(5e5, 42e5, 10, 10), **profile) as dst:
        dst.write(pixels)
    copy_raster(plain, path, driver="COG", compress="DEFLATE", blocksize=block)
    plain.unlink()
    return path


def scene_pixels(seed: int, size: int = 96) -> np.ndarray:
    """Blocks of colour with noise: windows the model tells apart."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (3, size // 32, size // 32), dtype=np.uint8)
    blocks = np.kron(base, np.ones((1, 32, 32), dtype=np.uint8))
    return np.clip(blocks + rng.integers(0, 40, blocks.shape), 0, 255).astype(np.uint8)


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def band(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


# --------------------------------------------------------------------------- the map
def test_a_remote_scene_maps_as_its_local_file(model: Path, server: Server, tmp_path: Path):
    local = cog(tmp_path / "scene.tif", scene_pixels(0))
    url = server.put("same/scene.tif", local)
    predictor = Predictor(model)
    options = {"tile": 32, "probabilities": True}
    here = map_scene(predictor, local, tmp_path / "here", **options)
    there = map_scene(predictor, url, tmp_path / "there", **options)
    for name in ("classes.tif", "probabilities.tif"):
        assert np.array_equal(band(tmp_path / "there" / name), band(tmp_path / "here" / name))
    assert rows(tmp_path / "there" / "tiles.csv") == rows(tmp_path / "here" / "tiles.csv")
    assert len({r["class"] for r in rows(tmp_path / "here" / "tiles.csv")}) > 1
    assert there["per_class"] == here["per_class"] and there["crs"] == "EPSG:32633"
    # The URL as given, not as a Path would spell it (http:/...), and what tells it changed.
    assert there["scene"] == url
    record = json.loads((tmp_path / "there" / "summary.json").read_text())["rsscene_map"]
    assert record["scene"] == {
        "path": url,
        "bytes": local.stat().st_size,
        "etag": '"1"',
        "last_modified": LAST_MODIFIED,
    }
    # GDAL's own name for the URL reads the same file.
    map_scene(predictor, f"/vsicurl/{url}", tmp_path / "vsi", **options)
    assert np.array_equal(
        band(tmp_path / "vsi" / "classes.tif"), band(tmp_path / "here" / "classes.tif")
    )


def test_one_window_of_a_large_remote_cog_reads_a_small_part_of_it(
    model: Path, server: Server, tmp_path: Path
) -> None:
    """A VRT on the server names a 64 px window of a 2048 px COG (4 MB of noise in 256 px
    tiles): mapping it must fetch the COG's header and that window's tile, not the file."""
    pixels = np.random.default_rng(1).integers(0, 255, (1, 2048, 2048), dtype=np.uint8)
    big = cog(tmp_path / "big.tif", pixels, block=256)
    server.put("large/big.tif", big)
    vrt = tmp_path / "part.vrt"
    vrt.write_text(
        """<VRTDataset rasterXSize="64" rasterYSize="64">
  <VRTRasterBand dataType="Byte" band="1">
    <SimpleSource>
      <SourceFilename relativeToVRT="1">big.tif</SourceFilename>
      <SourceBand>1</SourceBand>
      <SrcRect xOff="1040" yOff="1040" xSize="64" ySize="64"/>
      <DstRect xOff="0" yOff="0" xSize="64" ySize="64"/>
    </SimpleSource>
  </VRTRasterBand>
</VRTDataset>"""
    )
    url = server.put("large/part.vrt", vrt)
    summary = map_scene(Predictor(model), url, tmp_path / "out", tile=32)
    assert summary["windows"] == 4
    log, size = server.log(), big.stat().st_size
    assert log["sent"]["/large/big.tif"] > 0  # the window was read from the COG
    sent = log["sent"]["/large/big.tif"] + log["sent"]["/large/part.vrt"]
    assert sent < 0.1 * size, f"{sent:,} of {size:,} bytes sent for one window"
    # No folder listed, no side-car file (.ovr, .aux.xml) asked for: GDAL_DISABLE_READDIR_ON_OPEN,
    # also when the VRT opens its source as the windows are read.
    asked = {p for p in log["asked"] if p.startswith("/large")}
    assert asked == {"/large/big.tif", "/large/part.vrt"}


# --------------------------------------------------------------------------- failures
@pytest.fixture
def refused_port() -> int:
    """A port on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "case, said",
    [
        ("404", "HTTP 404 not found"),
        ("500", "HTTP 500 internal server error"),
        ("refused", "connection refused"),
        ("dropped", "reading failed part way: the connection dropped"),
    ],
)
def test_a_failing_server_is_one_line_and_no_output(
    case: str, said: str, model: Path, server: Server, refused_port: int, tmp_path: Path, capsys
) -> None:
    name = f"{case}/scene.tif"
    url = f"{server.base}/{name}"
    if case in ("500", "dropped"):
        server.put(name, cog(tmp_path / "scene.tif", scene_pixels(2, 256)))
    if case == "500":
        server.rule(name, status=500)
    elif case == "dropped":  # the header arrives, the tiles' bytes do not
        server.rule(name, cut_after=40_000)
    elif case == "refused":
        url = f"http://127.0.0.1:{refused_port}/scene.tif"
    out = tmp_path / "maps" / "out"
    code = main(["map", str(model), url, "--out", str(out), "--tile", "32"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"rsscene map: error: {url}: {said}"), err
    assert not (tmp_path / "maps").exists()  # nothing written, not even a staging folder


def test_a_scene_cut_off_mid_region_leaves_no_region_json(
    model: Path, server: Server, tmp_path: Path, capsys
) -> None:
    local = cog(tmp_path / "a.tif", scene_pixels(3))
    url = server.put("cut/b.tif", cog(tmp_path / "b.tif", scene_pixels(4, 256)))
    server.rule("cut/b.tif", cut_after=40_000)
    out = tmp_path / "out"
    assert main(["map", str(model), str(local), url, "--out", str(out), "--tile", "32"]) == 2
    assert "reading failed part way" in capsys.readouterr().err
    # a's map is complete and kept (a rerun skips it); b has none; there is no region.json.
    assert sorted(os.listdir(out)) == ["a"] and (out / "a" / "summary.json").is_file()


# --------------------------------------------------------------------------- a region
def test_a_region_of_a_remote_and_a_local_scene_resumes(
    model: Path, server: Server, tmp_path: Path, capsys
) -> None:
    local = cog(tmp_path / "local" / "a.tif", scene_pixels(5))
    url = server.put("region/x/scene.tif", cog(tmp_path / "scene.tif", scene_pixels(6)))
    out = tmp_path / "out"
    command = ["map", str(model), url, str(local), "--out", str(out), "--tile", "32"]
    assert main(command) == 0
    assert sorted(os.listdir(out)) == ["a", "classes.vrt", "region.json", "scene", "tiles.csv"]
    region = json.loads((out / "region.json").read_text())
    assert [s["scene"] for s in region["scenes"]] == [url, str(local.resolve())]
    assert region["cells"] == 18 and region["mosaic"]["file"] == "classes.vrt"
    capsys.readouterr()
    before = server.log()["sent"]["/region/x/scene.tif"]
    assert main(command) == 0
    assert capsys.readouterr().out.count("skipped (mapped earlier)") == 2
    # The rerun opened the scene (its header, in GDAL's cache) and asked for its headers.
    assert server.log()["sent"]["/region/x/scene.tif"] - before < 1000
    server.rule("region/x/scene.tif", etag='"2"')  # the server has a new version of the file
    assert main(command) == 0
    printed = capsys.readouterr().out
    changed = "remapped (the scene file changed since it was mapped)"
    assert f"{url} -> {out / 'scene'}: {changed}" in printed
    assert f"{local} -> {out / 'a'}: skipped (mapped earlier)" in printed


# --------------------------------------------------------------------------- names
def test_a_server_that_refuses_head_gives_the_size_to_a_ranged_get(
    server: Server, tmp_path: Path
) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"0123456789")
    url = server.put("nohead/x.bin", path)
    server.rule("nohead/x.bin", head=403, etag='"7"')
    record = remote_record(RemoteName(url))
    assert record == {"path": url, "bytes": 10, "etag": '"7"', "last_modified": LAST_MODIFIED}
    assert remote_record(RemoteName("/vsis3/bucket/x.tif"))["path"] == "/vsis3/bucket/x.tif"
    gone = remote_record(RemoteName(f"{server.base}/nohead/missing.bin"))
    assert gone["changes"].startswith("not checked (HTTP Error 404")


def test_a_remote_name_keeps_its_url_and_names_its_file() -> None:
    name = RemoteName("https://host.example/x/my%20scene.tif?sig=abc")
    assert name.gdal == "/vsicurl/https://host.example/x/my%20scene.tif?sig=abc"
    assert (name.name, name.stem, name.suffix) == ("my scene.tif", "my scene", ".tif")
    assert str(name.where) == "/https/host.example/x/my scene.tif"
    store = RemoteName("/vsis3/bucket/k/scene.tif")
    assert store.gdal == store and store.url is None and store.stem == "scene"


def test_gdal_words_become_what_happened() -> None:
    class Cause(Exception):
        pass

    def failure(text: str) -> Exception:
        error = RuntimeError("Read failed. See previous exception for details.")
        error.__cause__ = Cause(text)
        return error

    assert remote_failure(failure("HTTP response code: 403"), True) == "HTTP 403 forbidden"
    assert remote_failure(failure("HTTP response code: 599"), True) == "HTTP 599"
    timed_out = "CURL error: Operation timed out after 30001 milliseconds"
    assert remote_failure(failure(timed_out), True).startswith("network error (Operation timed")
    assert "header" in remote_failure(failure("not recognized as a supported format"), False)


def test_remote_band_files_and_a_remote_stac_item_map_as_the_local_file(
    model: Path, server: Server, tmp_path: Path
):
    pixels = scene_pixels(3)
    local = cog(tmp_path / "rgb.tif", pixels)
    urls = [
        server.put(f"bands/{c}.tif", cog(tmp_path / f"{c}.tif", pixels[i : i + 1]))
        for i, c in enumerate("rgb")
    ]
    common = ["--tile", "32", "--amp", "off"]
    assert main(["map", str(model), str(local), "--out", str(tmp_path / "local"), *common]) == 0
    out = tmp_path / "by-url"
    assert main(["map", str(model), "--band-files", *urls, "--out", str(out), *common]) == 0
    assert rows(out / "tiles.csv") == rows(tmp_path / "local" / "tiles.csv")
    record = json.loads((out / "summary.json").read_text())["rsscene_map"]
    assert record["scene"]["path"] == urls[0]  # the URL, its // kept
    assert record["settings"]["bands"]["files"][1]["etag"]  # each band file's HEAD answer
    item = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": "remote-item",
        "geometry": None,
        "properties": {"datetime": "2024-06-01T00:00:00Z"},
        "links": [],
        "assets": {
            c: {"href": f"{c}.tif", "type": "image/tiff; application=geotiff"} for c in "rgb"
        },
    }
    (tmp_path / "item.json").write_text(json.dumps(item))
    item_url = server.put("bands/item.json", tmp_path / "item.json")  # hrefs beside it, remote
    by_item = tmp_path / "by-item"
    argv = ["map", str(model), item_url, "--assets", "r", "g", "b", "--out", str(by_item)]
    assert main([*argv, *common]) == 0
    assert rows(by_item / "tiles.csv") == rows(tmp_path / "local" / "tiles.csv")
