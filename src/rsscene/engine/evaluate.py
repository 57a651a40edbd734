"""Batched inference and the metrics a classification report needs."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsscene.data.datasets import BatchLoader, chunks, find_eval_folder, list_images
from rsscene.data.transforms import MEAN, STD, eval_batch, tta_logits
from rsscene.device import autocast
from rsscene.errors import UserError


@dataclass
class Predictions:
    logits: Tensor  # N x C, float32, on the CPU
    labels: Tensor  # N
    rows: Tensor  # indices into the loader's images

    @classmethod
    def concat(cls, parts: list[Predictions]) -> Predictions:
        """One set from several, e.g. every process's share of a held-out split."""
        return cls(
            torch.cat([p.logits for p in parts]),
            torch.cat([p.labels for p in parts]),
            torch.cat([p.rows for p in parts]),
        )


@torch.inference_mode()
def predict(
    model: nn.Module,
    loader: BatchLoader,
    rows: list[int] | None = None,
    *,
    size: int,
    normalize: bool = True,
    mean: list[float] | None = MEAN,
    std: list[float] | None = STD,
    scale: float = 255.0,
    batch_size: int = 128,
    tta: bool = False,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Predictions:
    """Logits for ``rows`` of ``loader`` (all by default) in inference mode, batch by batch,
    standardised by ``mean``/``std`` after dividing by ``scale``."""
    model.eval()
    rows = list(range(len(loader))) if rows is None else rows
    out, labels, index = [], [], []
    for batch in loader.batches(chunks(rows, batch_size)):
        x = eval_batch(batch.images, size, normalize, mean, std, scale)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(loader.device, amp_dtype):
            logits = tta_logits(model, x) if tta else model(x)
        # Kept on the device until the end: a copy to the CPU per batch would wait for the GPU.
        out.append(logits.float())
        labels.append(batch.labels)
        index.append(batch.index)
    if not out:
        return Predictions(
            torch.empty(0, len(loader.classes)),
            torch.empty(0, dtype=torch.long),
            torch.empty(0, dtype=torch.long),
        )
    return Predictions(torch.cat(out).cpu(), torch.cat(labels).cpu(), torch.cat(index).cpu())


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Rows are true classes, columns predicted classes."""
    flat = target.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def kappa(confusion: Tensor) -> float:
    """Cohen's kappa of a confusion matrix: agreement beyond what the row and column totals
    give by chance. NaN when chance agreement is already total (one class only, all right)."""
    cm = confusion.double()
    total = cm.sum()
    if not total:
        return float("nan")
    observed = cm.diag().sum() / total
    chance = (cm.sum(0) * cm.sum(1)).sum() / total**2
    if chance >= 1:
        return float("nan")
    return ((observed - chance) / (1 - chance)).item()


def headline(report: dict[str, Any]) -> dict[str, float]:
    """What scene-classification papers report: overall accuracy, average (per-class)
    accuracy, Cohen's kappa and macro-F1."""
    return {
        "oa": report["accuracy"],
        "aa": report["average_accuracy"],
        "kappa": report["kappa"],
        "macro_f1": report["macro"]["f1"],
    }


def summarize(
    confusion: Tensor,
    classes: list[str],
    loss_sum: float = float("nan"),
    topk_correct: dict[int, int] | None = None,
) -> dict[str, Any]:
    """Accuracy (OA), average accuracy (AA), kappa, top-k, per-class precision/recall/F1/
    support and macro averages."""
    cm = confusion.double()
    total = cm.sum().item()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp)
    )
    per_class = {
        name: {
            "precision": precision[i].item(),
            "recall": recall[i].item(),
            "f1": f1[i].item(),
            "support": int(support[i].item()),
        }
        for i, name in enumerate(classes)
    }
    present = support > 0
    report: dict[str, Any] = {
        "images": int(total),
        "accuracy": tp.sum().item() / total if total else 0.0,
        # AA: the mean recall of the classes present, as remote-sensing papers report it.
        "average_accuracy": recall[present].mean().item() if present.any() else 0.0,
        "kappa": kappa(confusion),
        "loss": loss_sum / total if total else float("nan"),
        "macro": {
            "precision": precision[present].mean().item() if present.any() else 0.0,
            "recall": recall[present].mean().item() if present.any() else 0.0,
            "f1": f1[present].mean().item() if present.any() else 0.0,
        },
        "per_class": per_class,
        "classes": list(classes),
        "confusion": confusion.long().tolist(),
    }
    for k, correct in (topk_correct or {}).items():
        report[f"top{k}"] = correct / total if total else 0.0
    return report


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    out = {}
    for k in ks:
        k_eff = min(k, logits.shape[1])
        top = logits.topk(k_eff, dim=1).indices
        out[k] = int((top == labels.unsqueeze(1)).any(1).sum().item())
    return out


def report_from_predictions(preds: Predictions, classes: list[str]) -> dict[str, Any]:
    loss = (
        F.cross_entropy(preds.logits, preds.labels, reduction="sum").item()
        if len(preds.labels)
        else 0.0
    )
    cm = confusion_matrix(preds.logits.argmax(1), preds.labels, len(classes))
    return summarize(cm, classes, loss, topk_correct(preds.logits, preds.labels))


def format_report(report: dict[str, Any]) -> str:
    """The images left out, a precision/recall/F1 table (one row per class, then the macro
    averages over all images) and the headline line: OA, AA, kappa, macro-F1, top-5 and,
    when it was measured, TTA accuracy."""
    lines = [f"skipped {s['file']}: {s['reason']}" for s in report["skipped"]]
    width = max(len(c) for c in report["classes"])
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    macro = report["macro"]
    rows = [*report["per_class"].items(), ("macro", {**macro, "support": report["images"]})]
    lines += [
        f"{name:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}"
        f"  {m['support']:7d}"
        for name, m in rows
    ]
    line = (
        f"OA {report['accuracy']:.4f}  AA {report['average_accuracy']:.4f}"
        f"  kappa {report['kappa']:.4f}  macro-F1 {macro['f1']:.4f}  top5 {report['top5']:.4f}"
    )
    if "tta_accuracy" in report:
        line += f"  tta_accuracy {report['tta_accuracy']:.4f}"
    lines.append(f"{line}  ({report['images']} images; skipped {len(report['skipped'])})")
    return "\n".join(lines)


def write_reports(
    report: dict[str, Any],
    preds: Predictions,
    paths: list[Path],
    out: Path,
    title: str = "Confusion matrix",
) -> dict[str, Path]:
    """report.json, confusion.json/.png and misclassified.csv in ``out``."""
    from rsscene.plots import plot_confusion

    out.mkdir(parents=True, exist_ok=True)
    classes = report["classes"]
    files = {
        "report": out / "report.json",
        "confusion_json": out / "confusion.json",
        "confusion_png": out / "confusion.png",
        "misclassified": out / "misclassified.csv",
    }
    files["report"].write_text(json.dumps(report, indent=2) + "\n")
    files["confusion_json"].write_text(
        json.dumps({"classes": classes, "matrix": report["confusion"]}, indent=2) + "\n"
    )
    plot_confusion(report["confusion"], classes, files["confusion_png"], title=title)
    probs = preds.logits.softmax(1)
    pred = probs.argmax(1)
    with files["misclassified"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "true", "predicted", "probability"])
        for i in torch.nonzero(pred != preds.labels).flatten().tolist():
            writer.writerow(
                [
                    str(paths[int(preds.rows[i])]),
                    classes[int(preds.labels[i])],
                    classes[int(pred[i])],
                    f"{probs[i, pred[i]].item():.4f}",
                ]
            )
    return files


def evaluate_checkpoint(
    ckpt_path: str | Path,
    data: str | Path,
    *,
    out: str | Path | None = None,
    tta: bool = False,
    batch_size: int = 64,
    device: str = "cpu",
    cache: str = "memory",
    workers: int = 0,
    strict: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a split folder (its test part) or a folder of class folders.

    Writes report.json, confusion.json/.png and misclassified.csv to ``out`` when given.
    With ``tta`` the report also holds ``tta_accuracy`` (8 flips/rotations averaged).
    Unreadable images are left out and listed in ``skipped`` (``strict``: raise instead).
    """
    from rsscene.inference import Predictor

    data = Path(data)
    if not data.is_dir():
        raise UserError(f"{data}: no such folder")
    if any((data / name).is_dir() for name in ("train", "test", "val", "valid", "validation")):
        data = find_eval_folder(data)
    predictor = Predictor(ckpt_path, device=device)
    images = list_images(data, predictor.classes)
    loader = BatchLoader(
        images, predictor.size, cache, workers, predictor.device, strict, bands=predictor.pre.pick
    )
    if not len(loader):
        first = loader.skipped[0] if loader.skipped else ("", "")
        raise UserError(
            f"{data}: none of its {len(images)} images could be read (e.g. {first[0]}: {first[1]})"
        )
    kwargs = dict(size=predictor.size, batch_size=batch_size, **predictor.pre.standardise)
    preds = predict(predictor.model, loader, **kwargs)
    report = report_from_predictions(preds, predictor.classes)
    report.update(
        checkpoint=str(ckpt_path),
        data=str(data),
        skipped=[{"file": f, "reason": r} for f, r in loader.skipped],
    )
    if tta:
        tta_preds = predict(predictor.model, loader, tta=True, **kwargs)
        report["tta_accuracy"] = report_from_predictions(tta_preds, predictor.classes)["accuracy"]
    if out is not None:
        write_reports(
            report,
            preds,
            loader.paths,
            Path(out),
            title=f"{predictor.arch}: accuracy {report['accuracy']:.1%}",
        )
    return report
