"""Figures: training curves and the confusion-matrix heat map."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def plot_curves(history: Sequence[dict], path: str | Path) -> Path:
    """Loss and accuracy per epoch, train and test, side by side."""
    # Figures without pyplot: no display needed, and safe in the Trainer's writes thread.
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, kind, scale in ((ax_loss, "loss", 1), (ax_acc, "acc", 100)):
        for part in ("train", "test"):
            # With --eval-every the test columns are empty between evaluations.
            rows = [h for h in history if h[f"{part}_{kind}"] != ""]
            values = [scale * h[f"{part}_{kind}"] for h in rows]
            ax.plot([h["epoch"] for h in rows], values, marker=".", label=part)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_confusion(
    matrix: Sequence[Sequence[int]],
    classes: Sequence[str],
    path: str | Path,
    title: str = "Confusion matrix",
) -> Path:
    """A labelled heat map: counts in each cell, colour by row-normalised recall."""
    cm = np.asarray(matrix, dtype=np.int64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    side = max(4.0, 0.55 * n + 2)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)
