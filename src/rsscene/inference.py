"""Predict class names for image files or bytes with a trained checkpoint.

:class:`Predictor` loads a checkpoint once and applies exactly the preprocessing the run
was evaluated with (the checkpoint's :class:`~rsscene.data.bands.Preprocess`: bands, size,
per-band normalisation), so ``predict``, ``cam``, ``export`` and the server all agree with
``evaluate``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rsscene.data.bands import refuse_nan
from rsscene.data.images import ImageError, is_image_file
from rsscene.data.transforms import tta_logits
from rsscene.device import autocast
from rsscene.errors import UserError
from rsscene.models import load_model

PREDICTION_FILES = (".csv", ".json")  # what write_predictions writes, by suffix


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, float]]  # (class name, probability), most likely first

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.source,
            "top": [{"class": c, "probability": round(p, 6)} for c, p in self.top],
        }


def collect_images(paths: list[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files named directly, plus image files found recursively in named folders."""
    found: list[Path] = []
    problems: list[tuple[str, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found += sorted(
                q
                for q in p.rglob("*")
                if q.is_file() and is_image_file(q) and not q.name.startswith(".")
            )
        elif p.exists():
            found.append(p)
        else:
            problems.append((str(p), "no such file or folder"))
    return found, problems


def format_predictions(results: list[Prediction]) -> str:
    """One line per image: its name, then its top classes with their probabilities."""
    width = max([len(r.source) for r in results] + [4])
    return "\n".join(
        f"{r.source:<{width}}  " + "  ".join(f"{c} {p:.3f}" for c, p in r.top) for r in results
    )


def write_predictions(
    out: Path, results: list[Prediction], skipped: list[tuple[str, str]], topk: int
) -> None:
    """``out`` as JSON (the predictions and the files skipped, with why) when it ends in
    .json, else as CSV: each file with its ``topk`` classes and probabilities."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        document = {
            "predictions": [r.as_dict() for r in results],
            "skipped": [{"file": f, "reason": r} for f, r in skipped],
        }
        # allow_nan=False: a NaN would be written as a bare NaN, which is not JSON.
        out.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
        return
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["file", *[h for i in range(1, topk + 1) for h in (f"class{i}", f"prob{i}")]]
        )
        for r in results:
            writer.writerow([r.source, *[v for c, p in r.top for v in (c, f"{p:.6f}")]])


class Predictor:
    """A checkpoint's model with its preprocessing, ready for batches of images."""

    def __init__(self, ckpt_path: str | Path, device: str = "cpu") -> None:
        self.source = str(ckpt_path)
        self.model, self.ckpt = load_model(ckpt_path)
        self.classes: list[str] = list(self.ckpt.class_names)
        self.pre = self.ckpt.preprocess
        self.size: int = self.pre.size
        self.device = torch.device(device)
        self.model.to(self.device)

    @property
    def arch(self) -> str:
        return self.ckpt.arch

    def prepare(self, images: list[Tensor]) -> Tensor:
        """Loaded ``C x size x size`` images → the normalised float batch the model expects."""
        return self.pre.input(torch.stack(images).to(self.device))

    @torch.inference_mode()
    def probabilities(
        self, images: list[Tensor], tta: bool = False, amp: torch.dtype | None = None
    ) -> Tensor:
        """Class probabilities, in float32 unless ``amp`` names a faster dtype (then the batch
        is channels_last, the layout the reduced-precision kernels want; convert the model
        once with ``model.to(memory_format=torch.channels_last)`` to match)."""
        x = self.prepare(images)
        if amp is not None:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, amp):
            logits = tta_logits(self.model, x) if tta else self.model(x)
        probs = logits.float().softmax(1).cpu()
        if not bool(probs.isfinite().all()):
            # The input is finite (Preprocess.input): only the weights or a narrow dtype can
            # overflow. Say so rather than print NaN as a probability.
            precision = str(amp or torch.float32).removeprefix("torch.")
            raise UserError(
                "the model gave NaN probabilities for a finite input: its weights hold NaN or"
                f" Inf, or its precision ({precision}) overflowed"
            )
        return probs

    def load(self, source: str | Path | bytes, name: str | None = None) -> Tensor:
        """One image as the model reads it: its bands at the model size, or an ImageError
        (NaN included, so that one file is refused, not the batch it would join)."""
        image = self.pre.load(source, name=name)
        refuse_nan(image[None], [name or ("<bytes>" if isinstance(source, bytes) else str(source))])
        return image

    def top(self, probs: Tensor, k: int) -> list[list[tuple[str, float]]]:
        values, idx = probs.topk(min(k, len(self.classes)), dim=1)
        return [
            [(self.classes[i], float(v)) for v, i in zip(vs.tolist(), ids.tolist(), strict=True)]
            for vs, ids in zip(values, idx, strict=True)
        ]

    def predict_files(
        self, paths: list[Path], topk: int = 5, tta: bool = False, batch_size: int = 64
    ) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """Predictions for every readable file; the others come back as (file, reason)."""
        results: list[Prediction] = []
        errors: list[tuple[str, str]] = []
        for start in range(0, len(paths), batch_size):
            names, images = [], []
            for p in paths[start : start + batch_size]:
                try:
                    images.append(self.load(p))
                    names.append(str(p))
                except ImageError as e:
                    errors.append((str(p), e.reason))
            if images:
                probs = self.probabilities(images, tta=tta)
                results += [
                    Prediction(n, t) for n, t in zip(names, self.top(probs, topk), strict=True)
                ]
        return results, errors
