"""Finite in, finite out: a float32 pixel at 3e38 (finite, but past what standardising can
hold in float32) gives finite probabilities and valid JSON through predict, serve and map;
NaN that reaches the model's input is refused naming the file."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from rsscene import checkpoint
from rsscene.checkpoint import Checkpoint, Preprocess
from rsscene.cli import main
from rsscene.data import transforms
from rsscene.data.images import ImageError
from rsscene.data.synthetic import CLASSES
from rsscene.data.transforms import normalize
from rsscene.errors import UserError
from rsscene.inference import Prediction, Predictor, write_predictions
from rsscene.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

HUGE = 3e38  # finite in float32 (whose largest value is 3.4e38)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def strict_json(text: str) -> object:
    """``text`` parsed as JSON proper: Python's parser would take NaN and Infinity too."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def band_model(path: Path, bands: int, dtype: str = "float32") -> Path:
    """A random-init ResNet-18 reading ``bands``-band ``dtype`` files at 32 px; a standard
    deviation under 1, so that 3e38 overflows float32 when standardised."""
    torch.manual_seed(0)
    weights = create_model("resnet18", num_classes=len(CLASSES), in_channels=bands)
    pre = Preprocess(
        32, [0.3] * bands, [0.2] * bands, list(range(1, bands + 1)), bands, dtype=dtype
    )
    record = Checkpoint(weights.state_dict(), "resnet18", list(CLASSES), preprocess=pre)
    return checkpoint.save(record, path)


def tiff(path: Path, pixels: np.ndarray) -> Path:
    """``pixels`` (C x H x W) as a plain pixel-interleaved TIFF."""
    tifffile.imwrite(
        path, np.moveaxis(pixels, 0, -1), photometric="minisblack", planarconfig="contig"
    )
    return path


def huge_pixel(shape: tuple[int, int, int] = (4, 40, 40)) -> np.ndarray:
    pixels = np.random.default_rng(0).random(shape, dtype=np.float32)
    pixels[2, 7, 9] = HUGE
    return pixels


def limit_rows() -> np.ndarray:
    """Rows of +3.4e38 and -3.4e38, float32's limits: they overflow and cancel out as NaN
    when resized (a common unmarked nodata value, at its worst)."""
    pixels = np.full((4, 40, 40), FLOAT32_MAX, np.float32)
    pixels[:, ::2] = -FLOAT32_MAX
    return pixels


@pytest.fixture(scope="module")
def model4(tmp_path_factory) -> Path:
    return band_model(tmp_path_factory.mktemp("finite") / "m4.pt", 4)


def _check_probabilities(top: list[dict]) -> None:
    probs = [t["probability"] for t in top]
    assert all(isinstance(p, float) and math.isfinite(p) for p in probs), probs
    assert sum(probs) == pytest.approx(1, abs=1e-4)


def test_normalize_gives_a_finite_input() -> None:
    x = torch.tensor([[[[0.5, HUGE, -HUGE, FLOAT32_MAX, float("inf"), -float("inf")]]]])
    out = normalize(x.clone(), mean=[0.3], std=[0.2], scale=1.0)
    assert torch.isfinite(out).all()
    limit = transforms.INPUT_LIMIT
    assert out[0, 0, 0].tolist() == pytest.approx([1.0, limit, -limit, limit, limit, -limit])
    # Ordinary pixels are standardised exactly as before: the bound never touches them.
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    before = pixels.float().div_(255).sub_(torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
    before = before.div_(torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))
    assert torch.equal(normalize(pixels, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3]), before)
    # NaN has no value to clip: it stays, for Preprocess.input to refuse.
    assert normalize(torch.tensor([[[[float("nan")]]]]), mean=[0.0], std=[1.0]).isnan().all()


def test_predict_a_huge_pixel_gives_finite_probabilities(model4: Path, tmp_path: Path, capsys):
    image = tiff(tmp_path / "huge.tif", huge_pixel())
    out = tmp_path / "preds.json"
    assert main(["predict", str(model4), str(image), "--topk", "5", "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert "nan" not in table.lower()
    printed = [float(v) for v in re.findall(r" (\d\.\d{3})", table)]
    assert len(printed) == 5 and sum(printed) == pytest.approx(1, abs=0.01)
    document = strict_json(out.read_text())
    _check_probabilities(document["predictions"][0]["top"])
    assert document["skipped"] == []
    # The same through the Python API, as a tile already read: the same finite input.
    predictor = Predictor(model4)
    x = predictor.pre.to_input(huge_pixel())
    assert torch.isfinite(x).all() and x.abs().max() == transforms.INPUT_LIMIT
    assert torch.equal(x, predictor.prepare([predictor.load(image)]))


def test_serve_answers_a_huge_pixel_with_finite_json(model4: Path) -> None:
    pytest.importorskip("fastapi", reason="serving needs the serve extra (rsscene[serve])")
    from fastapi.testclient import TestClient

    from rsscene.serve.app import create_app

    buf = io.BytesIO()
    tiff(buf, huge_pixel())
    data = buf.getvalue()
    with TestClient(create_app(model4, batch_wait_ms=1)) as client:
        r = client.post("/predict", files={"file": ("huge.tif", data)})
        assert r.status_code == 200, r.text
        _check_probabilities(strict_json(r.text)["predictions"][0]["top"])
        r = client.post("/cam?format=json", files={"file": ("huge.tif", data)})
        assert r.status_code == 200, r.text
        body = strict_json(r.text)
        assert math.isfinite(body["probability"]) and 0 <= body["probability"] <= 1
        assert client.post("/cam", files={"file": ("huge.tif", data)}).status_code == 200
        # NaN once resized (rows of +-3.4e38): refused by name, a 422 and not the batch's 500.
        buf = io.BytesIO()
        tiff(buf, limit_rows())
        r = client.post("/predict", files={"file": ("limit.tif", buf.getvalue())})
        assert r.status_code == 422 and r.json()["error"].startswith("limit.tif: pixel values")


def test_map_a_scene_with_a_huge_pixel(model4: Path, tmp_path: Path) -> None:
    # A plain float32 TIFF: read window by window through rasterio where it is installed,
    # decoded whole otherwise; the model's input is finite either way.
    scene = tiff(tmp_path / "scene.tif", huge_pixel((4, 64, 96)))
    out = tmp_path / "map"
    assert main(["map", str(model4), str(scene), "--out", str(out), "--tile", "32"]) == 0
    summary = strict_json((out / "summary.json").read_text())
    assert summary["windows"] == 6 and summary["windows_skipped_nodata"] == 0
    with (out / "tiles.csv").open() as f:
        probs = [float(row["probability"]) for row in csv.DictReader(f)]
    assert len(probs) == 6 and all(math.isfinite(p) and 0 < p <= 1 for p in probs)


def test_nan_reaching_the_input_is_refused_naming_the_file(model4: Path, tmp_path: Path, capsys):
    # Rows of +-3.4e38 (float32's limit, a common unmarked nodata value) overflow when resized
    # and cancel out as NaN: nothing is left to clip, so the file is refused by name.
    image = tiff(tmp_path / "limit.tif", limit_rows())
    assert main(["predict", str(model4), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{image}: pixel values near float32's limit" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    # A good file beside it is predicted; this one is listed as skipped.
    good = tiff(tmp_path / "good.tif", huge_pixel())
    assert main(["predict", str(model4), str(good), str(image)]) == 0
    assert f"skipped {image}: pixel values near float32's limit" in capsys.readouterr().err
    # An array handed over directly must come filled, as a file's NaN/Inf are when read.
    pre = Predictor(model4).pre
    for bad in (float("nan"), float("inf")):
        tile = huge_pixel()
        tile[1, 3, 3] = bad
        with pytest.raises(ImageError, match=r"^tile\.tif: holds NaN or infinite pixel values"):
            pre.to_input(tile, "tile.tif")
    batch = torch.zeros(3, 4, 32, 32)
    batch[1, 0, 0, 0] = float("nan")
    with pytest.raises(ImageError, match=r"^b\.tif: pixel values near"):
        pre.input(batch, ["a.tif", "b.tif", "c.tif"])
    with pytest.raises(ImageError, match=r"^image 2 of 3 in the batch: "):
        pre.input(batch)


def test_nan_probabilities_are_refused_not_printed(model4: Path, tmp_path: Path) -> None:
    predictor = Predictor(model4)
    with torch.no_grad():
        predictor.model.fc.bias.fill_(float("nan"))  # weights that went bad
    image = tiff(tmp_path / "ok.tif", huge_pixel())
    with pytest.raises(UserError, match="NaN probabilities for a finite input"):
        predictor.predict_files([image])
    # And JSON is never written with a bare NaN in it.
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_predictions(tmp_path / "p.json", [Prediction("x", [("a", math.nan)])], [], 1)
