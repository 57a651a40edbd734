"""Bad and unusual image files: decoding rules, and what predict, evaluate and train do with them."""

from __future__ import annotations

import io
import json
import logging
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from rsscene import checkpoint
from rsscene.checkpoint import Checkpoint, Preprocess
from rsscene.cli import main
from rsscene.data.images import ImageError, image_size, load_tensor, open_image
from rsscene.data.prepare import prepare
from rsscene.data.synthetic import generate
from rsscene.inference import Predictor
from rsscene.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["bridge", "forest", "lake"]


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def noise(w: int = 48, h: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A small 1-bit PNG whose header (with a valid CRC) claims ``width`` x ``height``."""
    data = bytearray(encode(Image.new("1", (16, 16)), "PNG"))
    ihdr = bytearray(data[12:29])  # chunk type + 13 bytes of IHDR fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def rotated_exif() -> bytes:
    """EXIF orientation 6: "rotate 90 degrees clockwise to display"."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


def tiny_checkpoint(path: Path, classes: list[str] = CLASSES) -> Path:
    """A random-init ResNet-18 checkpoint that predicts at 32 px."""
    model = create_model("resnet18", num_classes=len(classes))
    record = Checkpoint(model.state_dict(), "resnet18", list(classes), preprocess=Preprocess(32))
    return checkpoint.save(record, path)


# --------------------------------------------------------------------------- open_image
JPEG = encode(noise(), "JPEG")

BAD = {
    "zero-byte": (b"", "empty file"),
    "truncated JPEG": (JPEG[: len(JPEG) // 2], "truncated"),
    "text": (b"class,file\nlake,a.jpg\n" * 8, "not an image"),
    "50000x50000 header": (png_claiming(50_000, 50_000), "decompression bomb"),
    "110 MP header": (png_claiming(11_000, 10_000), "decompression bomb"),
    "4x4 pixels": (encode(noise(4, 4), "PNG"), "too small"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_bytes_and_files_raise_image_error_with_the_reason(case: str, tmp_path: Path) -> None:
    data, reason = BAD[case]
    path = tmp_path / "scene.jpg"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(ImageError, match=reason) as info:
            load_tensor(source, 32)
    assert info.value.source == str(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "absent.png")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    with pytest.raises(ImageError, match="is a directory"):
        open_image(folder)


def test_an_image_between_pillows_warning_and_the_limit_decodes() -> None:
    # 90.25 MP: over Pillow's 89 MP warning, under rsscene's 100 MP limit; nothing patched.
    assert Image.MAX_IMAGE_PIXELS < 9_500 * 9_500 < 100_000_000
    data = encode(Image.new("1", (9_500, 9_500), 1), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's bomb warning would now be an error
        img = open_image(data)
    assert img.size == (9_500, 9_500) and img.getpixel((9_499, 9_499)) == (255, 255, 255)


def test_the_pixel_limit_is_rsscenes_not_pillows(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(noise(), "PNG")  # 1920 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above 1000, errs at 2000
    assert open_image(data).size == (48, 40)
    with pytest.raises(ImageError, match=r"too large .* decompression bomb"):
        open_image(data, max_pixels=1000)


def test_png_named_jpg_decodes(tmp_path: Path) -> None:
    img = noise()
    path = tmp_path / "scene.jpg"
    path.write_bytes(encode(img, "PNG"))
    assert np.array_equal(np.asarray(open_image(path)), np.asarray(img))


def test_one_bit_becomes_black_and_white() -> None:
    bits = np.indices((40, 48)).sum(0) % 2 == 1
    out = np.asarray(open_image(encode(Image.fromarray(bits), "PNG")))
    assert out.shape == (40, 48, 3)
    assert np.array_equal(out[..., 0], bits * 255) and (out[..., 0] == out[..., 2]).all()


# A PNG's 16-bit samples are big-endian whatever the mode they come from (and Pillow before
# 10.1 writes no I;16B PNG); a TIFF keeps the byte order it is given.
SIXTEEN_BIT = [("PNG", "I;16"), ("TIFF", "I;16"), ("TIFF", "I;16B")]


@pytest.mark.parametrize("fmt, mode", SIXTEEN_BIT)
def test_16_bit_grey_is_scaled_not_clipped(fmt: str, mode: str) -> None:
    ramp = np.tile(np.linspace(0, 65535, 48).round().astype(np.uint16), (40, 1))
    dtype = ">u2" if mode.endswith("B") else "<u2"
    img = Image.frombytes(mode, (48, 40), ramp.astype(dtype).tobytes())
    out = np.asarray(open_image(encode(img, fmt)))[..., 0].astype(int)
    assert np.abs(out - ramp // 257).max() <= 1
    assert (out == 255).mean() < 0.1  # clipping would turn almost all of it white


@pytest.mark.parametrize("fmt, mode", SIXTEEN_BIT)
def test_16_bit_grey_is_converted_without_float64_copies(fmt: str, mode: str) -> None:
    side = 1000
    data = encode(Image.new(mode, (side, side), 40_000), fmt)
    tracemalloc.start()  # numpy's arrays are counted; Pillow's own buffers are not
    try:
        out = np.asarray(open_image(data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (out == 40_000 // 257).all()
    # One float64 copy of the image alone would be 8 bytes a pixel.
    assert peak < 8 * side * side, f"{peak / side / side:.1f} bytes a pixel"


def test_image_size_reads_only_the_header() -> None:
    assert image_size(png_claiming(9_000, 10_000)) == (9_000, 10_000)  # 90 MP of no data
    with pytest.raises(ImageError, match="decompression bomb"):
        image_size(png_claiming(11_000, 10_000))
    with pytest.raises(ImageError, match="not an image"):
        image_size(b"hello " * 10, name="notes.txt")


def test_cmyk_jpeg_keeps_its_colour() -> None:
    img = Image.new("RGB", (40, 40), (200, 100, 50)).convert("CMYK")
    out = np.asarray(open_image(encode(img, "JPEG"))).astype(int)
    assert np.abs(out - [200, 100, 50]).max() <= 4


def test_palette_transparency_and_la_composite_on_black() -> None:
    pal = Image.new("P", (40, 40), 0)
    pal.putpalette([250, 250, 250, 10, 200, 30])
    pal.paste(1, (0, 0, 20, 40))
    out = np.asarray(open_image(encode(pal, "PNG", transparency=0)))
    assert out[0, 0].tolist() == [10, 200, 30] and out[0, 39].tolist() == [0, 0, 0]
    la = np.asarray(open_image(encode(Image.new("LA", (40, 40), (200, 128)), "PNG")))
    assert np.abs(la.astype(int) - 100).max() <= 1


def test_rgba_composites_on_black() -> None:
    arr = np.zeros((40, 40, 4), np.uint8)
    arr[:, :10] = (10, 200, 30, 255)  # opaque: keeps its colour
    arr[:, 10:20] = (250, 250, 250, 0)  # transparent: black, whatever colour it hides
    arr[:, 20:30] = (200, 100, 50, 128)  # half: half its colour
    arr[:, 30:] = (0, 0, 255, 64)  # a quarter
    out = np.asarray(open_image(encode(Image.fromarray(arr, "RGBA"), "PNG"))).astype(int)
    assert (out[:, :10] == [10, 200, 30]).all() and (out[:, 10:20] == 0).all()
    assert np.abs(out[:, 20:30] - [100, 50, 25]).max() <= 1
    assert np.abs(out[:, 30:] - [0, 0, 64]).max() <= 1


def test_animated_gif_gives_its_first_frame() -> None:
    red, blue = Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert (np.asarray(open_image(data)) == [255, 0, 0]).all()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_6_is_applied(fmt: str) -> None:
    arr = np.zeros((32, 48, 3), np.uint8)
    arr[:, :24] = (255, 0, 0)  # left half red, right half blue
    arr[:, 24:] = (0, 0, 255)
    out = np.asarray(open_image(encode(Image.fromarray(arr), fmt, exif=rotated_exif())))
    assert out.shape == (48, 32, 3)
    assert np.abs(out[4, 16].astype(int) - [255, 0, 0]).max() < 30  # the left edge is now on top
    assert np.abs(out[43, 16].astype(int) - [0, 0, 255]).max() < 30


def test_load_tensor_is_uint8_3_x_size_x_size() -> None:
    x = load_tensor(encode(noise(), "WEBP"), 32)
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)


# --------------------------------------------------------------------------- fuzzing
SEEDS = {
    fmt: encode(noise(20, 16, seed=i).convert(mode), fmt, **options)
    for i, (fmt, mode, options) in enumerate(
        [
            ("PNG", "RGB", {}),
            ("JPEG", "RGB", {"exif": rotated_exif()}),
            ("GIF", "P", {}),
            ("TIFF", "RGB", {"compression": "tiff_lzw"}),
            ("BMP", "RGB", {}),
            ("WEBP", "RGB", {}),
        ]
    )
}
EDITS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "truncate"]),
        st.floats(0, 1),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, edits: list[tuple[str, float, int]]) -> bytes:
    out = bytearray(data)
    for op, where, value in edits:
        at = min(int(where * len(out)), max(len(out) - 1, 0))
        if op == "flip" and out:
            out[at] ^= value or 0xFF
        elif op == "insert":
            out.insert(at, value)
        elif op == "delete" and out:
            del out[at]
        elif op == "truncate":
            del out[at:]
    return bytes(out)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor(tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt"))


@pytest.mark.filterwarnings("ignore::UserWarning:PIL.*")  # Pillow notes on mangled tags
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(sorted(SEEDS)), edits=EDITS)
def test_mutated_files_raise_only_image_error(
    fmt: str, edits: list[tuple[str, float, int]], predictor: Predictor, tmp_path_factory
) -> None:
    data = mutate(SEEDS[fmt], edits)
    try:
        x = load_tensor(data)
    except ImageError:
        pass
    else:
        assert x.dtype == torch.uint8 and x.ndim == 3 and x.shape[0] == 3
    path = tmp_path_factory.getbasetemp() / f"fuzz.{fmt.lower()}"
    path.write_bytes(data)
    results, errors = predictor.predict_files([path], topk=2)
    assert len(results) + len(errors) == 1
    if results:
        assert [c for c, _ in results[0].top] and all(0 <= p <= 1 for _, p in results[0].top)


# --------------------------------------------------------------------------- commands
@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """Class folders with two good images each, plus a text file and an empty file."""
    root = tmp_path / "mixed"
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            (root / cls / f"{i}.png").write_bytes(encode(noise(seed=10 * c + i), "PNG"))
    (root / "lake" / "notes.jpg").write_text("not a picture\n")
    (root / "forest" / "empty.png").write_bytes(b"")
    return root


def test_predict_reports_and_counts_skipped_files(mixed: Path, tmp_path: Path, capsys) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "pred.json"
    assert main(["predict", str(ckpt), str(mixed), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 6
    assert "notes.jpg: not an image" in captured.err and "empty.png: empty file" in captured.err
    assert "predicted 6 image(s), skipped 2" in captured.err
    assert len(json.loads(out.read_text())["skipped"]) == 2

    assert main(["predict", str(ckpt), str(mixed), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsscene predict: error: unreadable:") and len(err.splitlines()) == 1

    bad = [str(mixed / "lake" / "notes.jpg"), str(mixed / "absent.png")]
    assert main(["predict", str(ckpt), *bad]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("rsscene predict: error: nothing to predict") and len(err.splitlines()) == 1
    )


def test_evaluate_reports_and_counts_skipped_files(mixed: Path, tmp_path: Path, capsys) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    assert main(["evaluate", str(ckpt), str(mixed), "-o", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "(6 images; skipped 2)" in out and "notes.jpg" in out and "empty.png" in out
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["images"] == 6 and len(report["skipped"]) == 2

    assert main(["evaluate", str(ckpt), str(mixed), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsscene evaluate: error:") and len(err.splitlines()) == 1

    for image in mixed.glob("*/*.png"):
        image.write_bytes(image.read_bytes()[:60])
    assert main(["evaluate", str(ckpt), str(mixed)]) == 2
    err = capsys.readouterr().err
    assert "none of its 8 images could be read" in err and len(err.splitlines()) == 1


def split_with_a_file_broken_after_prepare(tmp_path: Path) -> tuple[Path, Path]:
    """A split of 8 training and 4 test images, one training image truncated since."""
    generate(tmp_path / "raw", per_class=6, size=32, classes=["airplane", "ship"])
    data = tmp_path / "data"
    prepare(tmp_path / "raw", data, train_per_class=4, test_per_class=2)
    bad = sorted((data / "train" / "ship").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:100])  # truncated after prepare checked it
    return data, bad


def test_a_file_corrupted_after_prepare_is_replaced_in_training(
    tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    data, bad = split_with_a_file_broken_after_prepare(tmp_path)
    flags = ["--epochs", "1", "--batch-size", "4", "--img-size", "32", "--eval-size", "32"]
    flags += ["--cache", "none", "--workers", "0", "--device", "cpu", "--amp", "off"]
    with caplog.at_level(logging.WARNING, logger="rsscene"):
        assert main(["train", str(data), *flags, "--out", str(tmp_path / "run")]) == 0
    warnings = [r.getMessage() for r in caplog.records if "replaced by another" in r.getMessage()]
    assert len(warnings) == 1 and str(bad) in warnings[0]  # 8 images, batch 4: all are drawn
    assert "replaced 1 training sample(s)" in capsys.readouterr().out
    checkpoint.load(tmp_path / "run" / "last.pt")

    # A worker process cannot pass the error on as it is: the main process raises it instead.
    strict = [*flags, "--strict", "--workers", "1", "--out", str(tmp_path / "strict")]
    assert main(["train", str(data), *strict]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rsscene train: error: {bad}") and len(err.splitlines()) == 1


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_strict_training_stops_on_an_unreadable_file_with_either_cache(
    cache: str, tmp_path: Path, capsys
) -> None:
    data, bad = split_with_a_file_broken_after_prepare(tmp_path)
    flags = ["--epochs", "1", "--batch-size", "4", "--img-size", "32", "--eval-size", "32"]
    flags += ["--cache", cache, "--workers", "0", "--device", "cpu", "--amp", "off"]
    out = tmp_path / "run"
    assert main(["train", str(data), *flags, "--strict", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rsscene train: error:") and len(err.splitlines()) == 1, err
    assert str(bad) in err and "truncated" in err
    assert not (out / "last.pt").exists()
