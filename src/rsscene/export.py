"""Export a checkpoint to ONNX or TorchScript, then check it against PyTorch.

Both formats take one input, ``image``: float32 ``N x C x S x S`` (any batch size N, C the
checkpoint's bands, S its evaluation size), the pixels divided by the checkpoint's scale
(RGB in 0..1: divided by 255), and return ``probabilities``, ``N x classes``. The
checkpoint's normalisation (ImageNet mean/std for RGB, the per-band mean/std of multi-band
training data, or none) and the softmax are inside the graph, so a consumer only picks the
bands, resizes to S x S and divides by the scale. Class names, architecture, input size,
bands and preprocessing travel inside the file: as JSON under the key ``rsscene`` in ONNX
``metadata_props``, and as the extra file ``rsscene.json`` in TorchScript.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rsscene import __version__
from rsscene.data.bands import Preprocess
from rsscene.data.images import ImageError, to_tensor
from rsscene.data.synthetic import CLASSES, image_rng, render_scene
from rsscene.data.transforms import eval_batch
from rsscene.errors import UserError
from rsscene.inference import Predictor, collect_images

FORMATS = ("onnx", "torchscript")
OPSET = 17
TOLERANCE = 1e-4
EXTRA_FILE = "rsscene.json"


class Exportable(nn.Module):
    """Scaled pixels → (normalise per band) → model → softmax: the whole path from pixels to
    probabilities."""

    def __init__(self, model: nn.Module, pre: Preprocess) -> None:
        super().__init__()
        self.model = model
        self.normalize = pre.normalize
        c = pre.channels
        self.register_buffer("mean", torch.tensor(pre.mean or [0.0] * c).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std or [1.0] * c).view(1, c, 1, 1))

    def forward(self, image: Tensor) -> Tensor:
        if self.normalize:
            image = (image - self.mean) / self.std
        return self.model(image).softmax(1)


@dataclass
class ExportResult:
    path: Path
    format: str
    samples: int
    max_abs_diff: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= TOLERANCE


def metadata(predictor: Predictor) -> dict[str, Any]:
    """What a consumer of the exported file needs to feed it and read its output."""
    pre = predictor.pre
    bands = (
        "RGB"
        if pre.bands is None
        else f"bands {','.join(map(str, pre.bands))} (1-based) of {pre.band_count}-band"
        f" {pre.dtype} files"
    )
    return {
        "format": "rsscene-export",
        "rsscene_version": __version__,
        "arch": predictor.arch,
        "variant": predictor.ckpt.variant,
        "class_names": predictor.classes,
        "input_size": predictor.size,
        "input": f"image: float32 {bands} divided by {pre.scale:g}, N x {pre.channels} x"
        " input_size x input_size",
        "bands": pre.bands,
        "band_count": pre.band_count,
        "band_names": pre.band_names,
        "dtype": pre.dtype,
        "scale": pre.scale,
        "normalization": "inside the graph: (image - mean) / std" if pre.normalize else "none",
        "mean": pre.mean,
        "std": pre.std,
        "output": "probabilities: float32 N x len(class_names), softmax",
    }


def sample_images(predictor: Predictor, paths: list[str | Path] | None = None) -> list[Tensor]:
    """The user's images, or (RGB) one built-in scene per class, or (other bands) random
    images around the training data's mean, as loaded images at the model size."""
    if not paths and predictor.pre.bands is not None:
        return _band_samples(predictor.pre)
    if not paths:
        return [
            to_tensor(render_scene(cls, predictor.size, image_rng(0, i, 0))[0])
            for i, cls in enumerate(CLASSES)
        ]
    files, problems = collect_images(paths)
    images = []
    for f in files:
        try:
            images.append(predictor.load(f))
        except ImageError as e:
            problems.append((str(f), e.reason))
    if not images:
        raise UserError(
            "no readable --sample image"
            + (": " + "; ".join(f"{f}: {r}" for f, r in problems) if problems else "")
        )
    return images


def _band_samples(pre: Preprocess, n: int = 5) -> list[Tensor]:
    """``n`` images of the checkpoint's bands and dtype, drawn around the training data's
    per-band mean with its spread (a multi-band model has no built-in scenes)."""
    g = torch.Generator().manual_seed(0)
    c = pre.channels
    mean = torch.tensor(pre.mean or [0.5] * c).view(c, 1, 1) * pre.scale
    std = torch.tensor(pre.std or [0.1] * c).view(c, 1, 1) * pre.scale
    dtype = getattr(torch, pre.dtype)
    images = []
    for _ in range(n):
        x = mean + std * torch.randn(c, pre.size, pre.size, generator=g)
        if not dtype.is_floating_point:
            info = torch.iinfo(dtype)
            x = x.round().clamp(info.min, info.max)
        images.append(x.to(dtype))
    return images


@contextmanager
def _atomic_target(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out``, renamed over it when the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    # mkstemp makes the file private; an exported model is meant to be shared like any file.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _onnx(wrapper: Exportable, predictor: Predictor, tmp: Path, x: Tensor) -> np.ndarray:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError(
            'ONNX export needs onnx and onnxruntime: pip install "rsscene[export]"'
        ) from None
    with warnings.catch_warnings():
        # The TorchScript-based exporter is chosen on purpose: the newer one needs onnxscript.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            (x[:1],),
            str(tmp),
            dynamo=False,
            opset_version=OPSET,
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
        )
    model = onnx.load(str(tmp))
    entry = model.metadata_props.add()
    entry.key, entry.value = "rsscene", json.dumps(metadata(predictor))
    onnx.save(model, str(tmp))
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"image": x.numpy()})[0]


def _torchscript(wrapper: Exportable, predictor: Predictor, tmp: Path, x: Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream, but it is the format the user asked for.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(wrapper, x[:1])
        torch.jit.save(traced, str(tmp), _extra_files={EXTRA_FILE: json.dumps(metadata(predictor))})
        loaded = torch.jit.load(str(tmp), map_location="cpu")
    with torch.inference_mode():
        return loaded(x).numpy()


def export(
    predictor: Predictor, fmt: str, out: str | Path, samples: list[str | Path] | None = None
) -> ExportResult:
    """Write ``out`` atomically in ``fmt`` and compare its probabilities with PyTorch's on
    ``samples`` (default: built-in scenes); the file is written whatever the comparison says.

    ``predictor`` must be on the CPU, where the file is traced and checked.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    images = sample_images(predictor, samples)
    reference = predictor.probabilities(images).numpy()
    # The exported graph normalises itself, so it is fed scaled pixels resized the same way.
    pre = predictor.pre
    x = eval_batch(torch.stack(images), pre.size, False, scale=pre.scale)
    wrapper = Exportable(predictor.model, pre).eval()
    out = Path(out)
    with _atomic_target(out) as tmp:
        run = _onnx if fmt == "onnx" else _torchscript
        got = run(wrapper, predictor, tmp, x)
    diff = float(np.abs(got - reference).max())
    return ExportResult(out, fmt, len(images), diff)


def format_result(predictor: Predictor, result: ExportResult) -> str:
    """Two lines: the file written with what it takes and returns, and its parity with PyTorch."""
    pre = predictor.pre
    kind = f"onnx, opset {OPSET}" if result.format == "onnx" else "torchscript"
    stats = "ImageNet" if pre.bands is None else "per-band"
    norm = f"{stats} mean/std normalisation inside" if pre.normalize else "no normalisation"
    what = (
        "RGB in 0..1"
        if pre.bands is None
        else f"bands {','.join(map(str, pre.bands))} of {pre.band_count} divided by {pre.scale:g}"
    )
    verdict = "ok" if result.ok else "FAILED"
    return (
        f"wrote {result.path} ({kind}): input 'image' float32 N x {pre.channels} x {pre.size}"
        f" x {pre.size}, {what} ({norm}); output 'probabilities' over"
        f" {len(predictor.classes)} classes\n"
        f"parity with PyTorch on {result.samples} image(s): max abs diff"
        f" {result.max_abs_diff:.2e} ({verdict}, tolerance {TOLERANCE:.0e})"
    )
