"""``rsscene export``: ONNX and TorchScript agree with PyTorch, carry their metadata, any batch."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rsscene.export
from rsscene import checkpoint
from rsscene.checkpoint import Checkpoint, Preprocess
from rsscene.cli import main
from rsscene.data.synthetic import CLASSES
from rsscene.data.transforms import MEAN, eval_batch
from rsscene.errors import UserError
from rsscene.export import EXTRA_FILE, TOLERANCE, export, sample_images
from rsscene.inference import Predictor
from rsscene.models import create_model

SIZE = 64


def _checkpoint(path: Path, arch: str) -> Path:
    """A random-init checkpoint with everything ``checkpoint.load`` and Predictor need."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=len(CLASSES))
    record = Checkpoint(model.state_dict(), arch, list(CLASSES), preprocess=Preprocess(SIZE))
    return checkpoint.save(record, path)


@pytest.fixture(scope="module", params=["resnet18", "resnet50"])
def ckpt(request, tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp(request.param) / "model.pt", request.param)


def _batch(predictor: Predictor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(0..1 input the export takes, PyTorch's probabilities) for ``n`` built-in scenes."""
    images = (sample_images(predictor) * n)[:n]
    x = eval_batch(torch.stack(images), predictor.size, normalize_input=False).numpy()
    return x, predictor.probabilities(images).numpy()


def test_onnx_matches_pytorch_for_any_batch(ckpt, tmp_path, capsys):
    onnx = pytest.importorskip("onnx", reason="ONNX export needs the export extra")
    ort = pytest.importorskip("onnxruntime", reason="ONNX export needs the export extra")
    out = tmp_path / "deep" / "model.onnx"  # the parent does not exist yet
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "RGB in 0..1" in printed and "max abs diff" in printed and "(ok" in printed
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]  # no temporary file left

    model = onnx.load(str(out))
    assert model.opset_import[0].version >= 17
    meta = json.loads({p.key: p.value for p in model.metadata_props}["rsscene"])
    predictor = Predictor(ckpt)
    assert meta["class_names"] == list(CLASSES) and meta["input_size"] == SIZE
    assert meta["arch"] == predictor.arch and meta["mean"] == list(MEAN)

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x, expected = _batch(predictor, n)
        (got,) = session.run(["probabilities"], {"image": x})
        assert got.shape == (n, len(CLASSES))
        assert np.abs(got - expected).max() < TOLERANCE


def test_torchscript_matches_pytorch_for_any_batch(ckpt, tmp_path):
    out = tmp_path / "model.ts"
    predictor = Predictor(ckpt)
    result = export(predictor, "torchscript", out)
    assert result.ok and result.samples == len(CLASSES) and result.max_abs_diff < TOLERANCE

    extra = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra[EXTRA_FILE])
    assert meta["class_names"] == list(CLASSES) and meta["arch"] == predictor.arch
    for n in (1, 3):
        x, expected = _batch(predictor, n)
        with torch.inference_mode():
            got = module(torch.from_numpy(x)).numpy()
        assert got.shape == (n, len(CLASSES))
        assert np.abs(got - expected).max() < TOLERANCE


def test_export_with_user_samples_and_mistakes(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "model.pt", "resnet18")
    samples = tmp_path / "samples"
    samples.mkdir()
    Image.new("RGB", (40, 30), (120, 80, 40)).save(samples / "a.png")
    (samples / "bad.png").write_bytes(b"nope")
    out = tmp_path / "m.ts"
    args = ["export", str(ckpt), "--format", "torchscript", "--out", str(out)]
    assert main([*args, "--sample", str(samples)]) == 0
    assert "on 1 image(s)" in capsys.readouterr().out
    assert main([*args, "--sample", str(samples / "bad.png")]) == 2
    assert "no readable --sample image" in capsys.readouterr().err

    predictor = Predictor(ckpt)
    with pytest.raises(UserError, match="unknown export format"):
        export(predictor, "tflite", out)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(UserError, match=r'pip install "rsscene\[export\]"'):
        export(predictor, "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_parity_failure_exits_1_and_keeps_the_file(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "model.pt", "resnet18")
    real = rsscene.export._torchscript

    def off_by_a_little(*args):  # an exported graph that disagrees with PyTorch by 1e-3
        return real(*args) + 1e-3

    monkeypatch.setattr(rsscene.export, "_torchscript", off_by_a_little)
    out = tmp_path / "m.ts"
    assert main(["export", str(ckpt), "--format", "torchscript", "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "max abs diff 1.00e-03 (FAILED, tolerance 1e-04)" in printed
    assert out.is_file()  # written all the same, so that it can be looked into
