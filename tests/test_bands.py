"""Multi-band images: reading, --bands, per-band statistics, weights across band counts, and
13-band and 4-band uint16 GeoTIFFs (made on the fly) through every command."""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torchvision

from conftest import shared_data
from rsscene import checkpoint
from rsscene.cli import main
from rsscene.data.bands import Preprocess, band_stats, parse_band_spec, resolve_bands
from rsscene.data.datasets import BatchLoader, DecodedCache, list_images, resolve_cache_mode
from rsscene.data.images import BandPick, ImageError, load_tensor, read_image
from rsscene.data.prepare import prepare
from rsscene.errors import UserError
from rsscene.models import adapt_first_conv, clean_state_dict, create_model, load_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("crop", "lake", "town")
TINY = ["--epochs", "2", "--batch-size", "8", "--img-size", "32", "--device", "cpu"]
TINY += ["--workers", "0", "--amp", "off", "--seed", "0"]


def geotiff(
    arr: np.ndarray,
    planar: str = "contig",
    compression: str | None = None,
    names: list[str] | None = None,
) -> bytes:
    """``arr`` (C x H x W) as GeoTIFF bytes: pixel- or band-interleaved, with a georeference
    (pixel scale and tie point) and GDAL band descriptions when ``names`` are given."""
    tags = [
        (33550, "d", 3, (10.0, 10.0, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0), True),
    ]
    if names:
        items = "".join(
            f'<Item name="DESCRIPTION" sample="{i}" role="description">{n}</Item>'
            for i, n in enumerate(names)
        )
        tags.append((42112, "s", 0, f"<GDALMetadata>{items}</GDALMetadata>", True))
    data = arr if planar == "separate" or arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    buf = io.BytesIO()
    tifffile.imwrite(
        buf,
        data if arr.shape[0] > 1 else arr[0],
        photometric="minisblack",
        planarconfig=planar if arr.shape[0] > 1 else None,
        compression=compression,
        extratags=tags,
    )
    return buf.getvalue()


def patch_tag(data: bytes, name: str, value: int) -> bytes:
    """``data`` with the TIFF tag ``name`` set to ``value`` (a header that lies)."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        tag = tif.pages.first.tags[name]
        fmt = "<H" if tag.dtype == 3 else "<I"
        at = tag.valueoffset
    return data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt) :]


def write_raw(root: Path, bands: int, per_class: int = 8, size: int = 32) -> Path:
    """Class folders of uint16 GeoTIFFs whose class is which band is bright, in every layout
    rsscene must read: pixel- and band-interleaved, uncompressed, deflate and LZW."""
    rng = np.random.default_rng(bands)
    names = [f"B{i + 1:02d}" for i in range(bands)]
    layouts = [("contig", None), ("separate", "zlib"), ("contig", "lzw"), ("separate", None)]
    for k, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(800, 1600, (bands, size, size)).astype(np.uint16)
            arr[k] += 20000
            planar, compression = layouts[i % len(layouts)]
            data = geotiff(arr, planar, compression, names)
            (root / cls / f"{cls}_{i}.tif").write_bytes(data)
    return root


@pytest.fixture(scope="module")
def split13(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("bands13")
    raw = write_raw(base / "raw", 13)
    assert main(["prepare", str(raw), str(base / "split"), "--test-ratio", "0.25"]) == 0
    return base / "split"


@pytest.fixture(scope="module")
def run13(split13: Path) -> Path:
    out = split13.parent / "run"
    assert main(["train", str(split13), "--bands", "all", "--out", str(out), *TINY]) == 0
    return out


# --------------------------------------------------------------------------- reading
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
@pytest.mark.parametrize(
    "planar,compression", [("contig", None), ("separate", "zlib"), ("contig", "lzw")]
)
def test_band_images_read_as_c_h_w_in_their_own_dtype(dtype, planar, compression) -> None:
    arr = (np.arange(13 * 20 * 24).reshape(13, 20, 24) % 200).astype(dtype)
    raster = read_image(geotiff(arr, planar, compression, [f"b{i}" for i in range(13)]))
    assert raster.array.dtype == np.dtype(dtype)
    assert np.array_equal(raster.array, arr)
    assert raster.names == [f"b{i}" for i in range(13)]
    one = read_image(geotiff(arr[:1]))
    assert one.array.shape == (1, 20, 24) and one.names is None


def test_jpeg_and_png_read_as_before(tmp_path: Path) -> None:
    from test_images import encode, noise

    for fmt in ("JPEG", "PNG"):
        data = encode(noise(), fmt)
        assert torch.equal(torch.from_numpy(read_image(data).array), load_tensor(data))


def test_band_images_keep_the_bad_input_rules() -> None:
    arr = np.ones((13, 16, 16), np.uint16)
    good = geotiff(arr)
    bad = {
        "header claiming 50000x50000": patch_tag(
            patch_tag(good, "ImageWidth", 50_000), "ImageLength", 50_000
        ),
        "truncated": good[: len(good) // 3],
        "4 px": geotiff(np.ones((13, 4, 4), np.uint16)),
        "float64": geotiff(np.ones((3, 16, 16), np.float64)),
    }
    reasons = ["decompression bomb", "corrupt or truncated", "too small", "not supported"]
    for (case, data), reason in zip(bad.items(), reasons, strict=True):
        with pytest.raises(ImageError, match=reason):
            read_image(data, name=case)
    # Within the pixel limit, 13 bands of uint16 still count their decoded bytes.
    with pytest.raises(ImageError, match=r"13 bands of uint16 .* decompression bomb"):
        read_image(good, max_pixels=400)


def test_nan_float_bands() -> None:
    nan = np.full((4, 16, 16), np.nan, np.float32)
    with pytest.raises(ImageError, match="no finite pixel values"):
        read_image(geotiff(nan), name="nan.tif")
    part = np.arange(4 * 16 * 16, dtype=np.float32).reshape(4, 16, 16)
    part[:, 0, 0] = np.nan
    out = read_image(geotiff(part)).array
    assert np.isfinite(out).all()
    assert np.allclose(out[:, 0, 0], np.nanmean(part, axis=(1, 2)))  # each band's mean


def test_rgb_models_refuse_band_images_instead_of_dropping_bands() -> None:
    with pytest.raises(ImageError, match=r"has 13 bands \(uint16\), but this reads 8-bit RGB"):
        load_tensor(geotiff(np.ones((13, 16, 16), np.uint16)), 32)
    # RGB + near-infrared in uint8, its 4th band tagged as alpha (as NAIP's files are) but
    # described by GDAL as "Undefined": Pillow would take the infrared for transparency.
    rgbn = np.full((16, 16, 4), 100, np.uint8)
    buf = io.BytesIO()
    meta = "".join(
        f'<Item name="COLORINTERP" sample="{i}" role="colorinterp">{c}</Item>'
        for i, c in enumerate(["Red", "Green", "Blue", "Undefined"])
    )
    tifffile.imwrite(
        buf,
        rgbn,
        photometric="rgb",
        extrasamples=[2],
        extratags=[(42112, "s", 0, f"<GDALMetadata>{meta}</GDALMetadata>", True)],
    )
    with pytest.raises(ImageError, match="has 4 bands"):
        load_tensor(buf.getvalue(), 32)


def test_band_pick_names_both_counts_and_dtypes() -> None:
    pick = BandPick((4, 3, 2), 13, "uint16")
    x = load_tensor(geotiff(np.arange(13 * 64).reshape(13, 8, 8).astype(np.uint16)), None, pick)
    assert x.dtype == torch.uint16 and x.shape == (3, 8, 8) and int(x[0, 0, 0]) == 3 * 64
    with pytest.raises(ImageError, match="has 3 bands, but the model was trained on files with 13"):
        load_tensor(geotiff(np.ones((3, 8, 8), np.uint16)), 32, pick, name="rgb.tif")
    with pytest.raises(ImageError, match="holds uint8 values, but the model was trained on uint16"):
        load_tensor(geotiff(np.ones((13, 8, 8), np.uint8)), 32, pick)


def test_band_spec_parsing_and_resolution() -> None:
    assert parse_band_spec(" 4, 3,2 ") == "4,3,2" and parse_band_spec("all") == "all"
    for bad, reason in [("0,1", "start at 1"), ("", "expected"), ("B1,b1", "named twice")]:
        with pytest.raises(ValueError, match=reason):
            parse_band_spec(bad)
    raster = read_image(geotiff(np.ones((4, 8, 8), np.uint16), names=["R", "G", "B", "NIR"]))
    pick, names = resolve_bands("nir,r", raster, "f.tif")
    assert pick == BandPick((4, 1), 4, "uint16") and names == ["NIR", "R"]
    with pytest.raises(UserError, match=r"band 5 does not exist: f.tif has 4 bands \(1..4\)"):
        resolve_bands("5,1", raster, "f.tif")
    with pytest.raises(UserError, match="no band named 'swir'; its bands are R, G, B, NIR"):
        resolve_bands("swir", raster, "f.tif")
    unnamed = read_image(geotiff(np.ones((4, 8, 8), np.uint16)))
    with pytest.raises(UserError, match="carries no band descriptions"):
        resolve_bands("NIR", unnamed, "g.tif")


def test_band_statistics_are_exact_over_16_bit_values() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 65535, (10, 4, 16, 16), generator=g).to(torch.uint16)
    mean, std = band_stats([x[:6], x[6:]], 65535.0)
    ref = x.double().div(65535).transpose(0, 1).reshape(4, -1)
    assert np.allclose(mean, ref.mean(1), atol=1e-12)
    assert np.allclose(std, ref.std(1, unbiased=False), atol=1e-9)
    _, flat = band_stats([torch.full((2, 1, 8, 8), 7, dtype=torch.uint16)], 65535.0)
    assert flat == [1.0]  # a constant band standardises to 0, not to inf


def test_cache_stores_the_bands_in_their_dtype_and_counts_them(split13: Path) -> None:
    images = list_images(split13 / "test")
    pick = BandPick(tuple(range(1, 14)), 13, "uint16")
    for mode in ("memory", "disk"):
        cache = DecodedCache(images, 32, mode, bands=pick)
        assert cache.images.dtype == torch.uint16 and cache.images.shape[1:] == (13, 32, 32)
        for row in (0, len(images) - 1):
            assert torch.equal(cache.images[row], load_tensor(images.paths[row], 32, pick))
    loader = BatchLoader(images, 32, "none", bands=pick, progress=False)
    (batch,) = loader.batches([[0, 1]])
    assert batch.images.dtype == torch.uint16 and batch.images.shape == (2, 13, 32, 32)
    # 13 uint16 bands need 26 bytes a pixel where RGB needs 3.
    free = 4 * 1000 * 26 * 64 * 64
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("rsscene.data.datasets._available_memory", lambda: free)
        assert resolve_cache_mode("auto", 1000, 64) == "memory"
        assert resolve_cache_mode("auto", 1001, 64, bytes_per_pixel=26) == "disk"


# --------------------------------------------------------------------------- weights
def test_rgb_weights_adapt_to_any_band_count() -> None:
    rgb = torch.randn(64, 3, 7, 7)
    assert torch.equal(adapt_first_conv(rgb, 3), rgb)
    assert torch.allclose(adapt_first_conv(rgb, 1), rgb.sum(1, keepdim=True))
    w13 = adapt_first_conv(rgb, 13)
    assert w13.shape == (64, 13, 7, 7)
    assert torch.allclose(w13[:, 3:6], rgb * 3 / 13) and torch.allclose(
        w13[:, 12], rgb[:, 0] * 3 / 13
    )
    # With a multiple of 3 bands, an image whose bands all equal one grey plane gives exactly
    # the RGB filters' response to grey: the scale keeps the activations' size.
    grey = torch.rand(1, 1, 32, 32)
    conv = torch.nn.functional.conv2d
    got = conv(grey.expand(1, 12, -1, -1), adapt_first_conv(rgb, 12))
    assert torch.allclose(got, conv(grey.expand(1, 3, -1, -1), rgb), atol=1e-4)


def test_ddp_and_self_supervised_state_dicts_load() -> None:
    source = torchvision.models.resnet18(weights=None).state_dict()
    backbone = {k: v for k, v in source.items() if not k.startswith("fc.")}
    moco = {f"module.encoder_q.{k}": v for k, v in backbone.items()}
    moco |= {"module.encoder_q.fc.0.weight": torch.zeros(512, 512), "module.queue": torch.zeros(4)}
    moco |= {f"module.encoder_k.{k}": v for k, v in backbone.items()}
    for state in (backbone, {f"backbone.{k}": v for k, v in backbone.items()}, moco):
        model = create_model("resnet18", num_classes=5, in_channels=4)
        assert load_backbone(model, state) == ["fc.weight", "fc.bias"]
        assert torch.equal(model.layer4[1].conv2.weight, source["layer4.1.conv2.weight"])
        assert torch.allclose(model.conv1.weight, adapt_first_conv(source["conv1.weight"], 4))
    assert set(clean_state_dict(moco)) == set(backbone) | {"fc.0.weight"}


def test_train_with_rgb_weights_on_four_bands_says_what_changed(tmp_path: Path, capsys) -> None:
    raw = write_raw(tmp_path / "raw", 4, per_class=4)
    prepare(raw, tmp_path / "split", test_ratio=0.25, seed=0)
    weights = tmp_path / "resnet18-imagenet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    args = ["train", str(tmp_path / "split"), "--bands", "all", "--weights", str(weights)]
    assert main([*args, "--out", str(tmp_path / "run"), *TINY[:1], "1", *TINY[2:]]) == 0
    out = capsys.readouterr().out
    assert "re-initialised fc.weight, fc.bias for 3 classes" in out
    assert "adapted conv1 from 3 to 4 bands (repeated over the bands, x 3/4)" in out
    pre = checkpoint.load(tmp_path / "run" / "last.pt").preprocess
    assert (pre.bands, pre.band_count, pre.dtype) == ([1, 2, 3, 4], 4, "uint16")


# --------------------------------------------------------------------------- commands
def test_thirteen_bands_through_every_command(run13: Path, split13: Path, tmp_path, capsys) -> None:
    ckpt = checkpoint.load(run13 / "last.pt")
    pre = ckpt.preprocess
    assert pre.bands == list(range(1, 14)) and pre.band_names == [f"B{i:02d}" for i in range(1, 14)]
    assert ckpt.model["conv1.weight"].shape[1] == 13
    # The statistics are the training split's, per band: the bright band of each class shows.
    assert len(pre.mean) == 13 and pre.mean[0] > 5 * pre.mean[5]
    assert pre.source_size == 32  # the side of the 13-band training files: map's default tile
    assert main(["evaluate", str(run13), str(split13), "-o", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["images"] == 6
    assert "\nOA " in capsys.readouterr().out
    test_file = sorted((split13 / "test" / "lake").iterdir())[0]
    assert main(["predict", str(run13), str(test_file), "-o", str(tmp_path / "p.json")]) == 0
    preds = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert preds[0]["file"] == str(test_file)
    args = ["cam", str(run13), str(test_file), "--out", str(tmp_path / "cams")]
    assert main([*args, "--show-bands", "4,3,2"]) == 0
    assert (tmp_path / "cams" / f"{test_file.stem}_cam.png").stat().st_size > 1000
    # The shared reader turns an array already read (a tile of a scene) into the same input.
    raster = read_image(test_file)
    from rsscene.inference import Predictor

    predictor = Predictor(run13)
    assert torch.equal(pre.to_input(raster.array), predictor.prepare([predictor.load(test_file)]))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_puts_the_band_normalisation_in_the_graph(run13, split13, tmp_path, fmt, capsys):
    out = tmp_path / f"model.{fmt}"
    assert (
        main(
            [
                "export",
                str(run13),
                "--format",
                fmt,
                "--out",
                str(out),
                "--sample",
                str(split13 / "test"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "N x 13 x 32 x 32" in printed and "(ok," in printed
    if fmt == "onnx":
        import onnx

        meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["rsscene"])
        assert meta["bands"] == list(range(1, 14)) and meta["scale"] == 65535.0
        assert len(meta["mean"]) == 13 and meta["dtype"] == "uint16"


def test_band_mistakes_are_one_line_exit_2(run13, split13, tmp_path, capsys) -> None:
    three = tmp_path / "rgb.tif"
    three.write_bytes(geotiff(np.ones((3, 32, 32), np.uint16)))
    nan = tmp_path / "nan.tif"
    nan.write_bytes(geotiff(np.full((13, 32, 32), np.nan, np.float32)))
    cases = [
        (["train", str(split13), "--bands", "14,2", *TINY], "band 14 does not exist"),
        (["train", str(split13), "--bands", "0", *TINY], "band indexes start at 1"),
        (
            ["predict", str(run13), str(three)],
            "has 3 bands, but the model was trained on files with 13",
        ),
        (["predict", str(run13), str(nan)], "no finite pixel values"),
        (["cam", str(run13), str(three), "--out", str(tmp_path / "c")], "has 3 bands"),
    ]
    for argv, reason in cases:
        try:
            status = main(argv)
        except SystemExit as e:  # a usage mistake, refused by the argument parser
            status = e.code
        assert status == 2
        err = capsys.readouterr().err.strip()
        assert reason in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_serve_takes_tiff_uploads(run13, split13) -> None:
    pytest.importorskip("fastapi", reason="serving needs the serve extra (rsscene[serve])")
    from fastapi.testclient import TestClient

    from rsscene.serve.app import create_app

    test_file = sorted((split13 / "test" / "town").iterdir())[0]
    with TestClient(create_app(run13, batch_wait_ms=1)) as client:
        assert client.get("/health").json()["bands"] == list(range(1, 14))
        r = client.post("/predict", files={"file": ("t.tif", test_file.read_bytes())})
        assert r.status_code == 200 and r.json()["predictions"][0]["top"]
        r = client.post(
            "/cam?format=json&show=4,3,2", files={"file": ("t.tif", test_file.read_bytes())}
        )
        assert r.status_code == 200
        assert base64.b64decode(r.json()["image"]).startswith(b"\x89PNG")
        three = geotiff(np.ones((3, 32, 32), np.uint16))
        r = client.post("/predict", files={"file": ("rgb.tif", three)})
        assert r.status_code == 422 and "has 3 bands" in r.json()["error"]
        nan = geotiff(np.full((13, 32, 32), np.nan, np.float32))
        assert client.post("/predict", files={"file": ("n.tif", nan)}).status_code == 422
        r = client.post("/cam?show=1,2,99", files={"file": ("t.tif", test_file.read_bytes())})
        assert r.status_code == 422


def test_version_1_checkpoints_read_as_rgb(tmp_path: Path) -> None:
    record = checkpoint.Checkpoint(
        create_model("resnet18", num_classes=2).state_dict(), "resnet18", ["a", "b"]
    )
    payload = checkpoint.to_payload(record)
    payload["format_version"] = 1
    payload["preprocess"] = {"size": 64, "mean": [0.5] * 3, "std": [0.2] * 3}
    torch.save(payload, tmp_path / "v1.pt")
    pre = checkpoint.load(tmp_path / "v1.pt").preprocess
    assert pre == Preprocess(64, [0.5] * 3, [0.2] * 3) and pre.pick is None and pre.channels == 3


# --------------------------------------------------------------------------- real images
def test_real_eurosat_and_naip_files() -> None:
    eurosat = shared_data("eurosat-ms")
    raster = read_image(next((eurosat / "Forest").iterdir()))
    assert raster.array.shape == (13, 64, 64) and raster.array.dtype == np.uint16
    naip = shared_data("scenes") / "naip-rgbn-2010.tif"
    assert read_image(naip).array.shape == (4, 723, 934)
    with pytest.raises(ImageError, match="has 4 bands"):
        load_tensor(naip, 64)


def test_a_resume_cannot_change_the_bands(run13: Path, capsys) -> None:
    assert main(["train", "--resume", str(run13), "--bands", "4,3,2"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "--bands all, this run asks for 4,3,2" in err
    assert len(err.splitlines()) == 1


def test_bands_are_matched_by_name_when_the_files_carry_names(
    run13: Path, split13: Path, tmp_path: Path, caplog
) -> None:
    from rsscene.data import images
    from rsscene.inference import Predictor

    predictor = Predictor(run13 / "last.pt")
    assert predictor.pre.named_bands == tuple(f"B{i + 1:02d}" for i in range(13))
    original = sorted((split13 / "test" / "lake").glob("*.tif"))[0]
    raster = read_image(original)
    order = list(reversed(range(13)))
    stored = tmp_path / "reversed.tif"  # the same pixels, bands stored in another order
    stored.write_bytes(geotiff(raster.array[order], names=[raster.names[i] for i in order]))
    a, b = (predictor.probabilities([predictor.load(p)]) for p in (original, stored))
    assert torch.equal(a, b)
    # A scene's windows are read by the same rule (rsscene map).
    from rsscene.mapping.scenes import window_image

    reversed_names = [raster.names[i] for i in order]
    w1 = window_image(raster.array, predictor.pre.pick, predictor.pre.size, "scene", raster.names)
    w2 = window_image(
        raster.array[order], predictor.pre.pick, predictor.pre.size, "scene", reversed_names
    )
    assert torch.equal(w1, w2)
    renamed = tmp_path / "renamed.tif"
    renamed.write_bytes(geotiff(raster.array, names=[f"X{i}" for i in range(13)]))
    with pytest.raises(ImageError, match=r"renamed.tif: has no band named 'B01' \(its bands: X0"):
        predictor.load(renamed)
    # A file without names falls back to the bands' positions, and says so once.
    unnamed = tmp_path / "unnamed.tif"
    unnamed.write_bytes(geotiff(raster.array))
    images._SAID_BY_POSITION.clear()  # said once per process: earlier tests may have said it
    with caplog.at_level("WARNING", logger="rsscene"):
        c = predictor.probabilities([predictor.load(unnamed), predictor.load(unnamed)])
    # Read as the named file was; a batch of two may round apart from a batch of one.
    torch.testing.assert_close(c[0], a[0])
    said = [r.getMessage() for r in caplog.records if "carries no band names" in r.getMessage()]
    assert len(said) == 1 and "read by position as B01,B02" in said[0]
