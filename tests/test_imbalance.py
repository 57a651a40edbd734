"""Class weights and the class-balanced sampler: their values, and reproducible epochs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rsscene.config import build
from rsscene.engine.recipe import class_weights, epoch_batches
from rsscene.errors import UserError

CLASSES = ["a", "b", "c"]
LABELS = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)


def test_balanced_weights_give_every_class_the_same_total_weight() -> None:
    weights = class_weights("balanced", CLASSES, LABELS)
    # n / (classes x n_class): 10/18, 10/9, 10/3.
    assert weights.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    totals = weights * torch.bincount(LABELS)
    assert torch.allclose(totals, totals[0].expand(3))
    assert class_weights("none", CLASSES, LABELS) is None


def test_weights_from_a_file(tmp_path: Path) -> None:
    good = tmp_path / "w.yaml"
    good.write_text("a: 1\nb: 2.5\nc: 4\n")
    assert class_weights(str(good), CLASSES, LABELS).tolist() == [1.0, 2.5, 4.0]
    for text, error in (
        ("a: 1\nb: 2\n", "exactly the classes"),
        ('{"a": 1, "b": 2, "c": 0}', "weight of 'c' is not a positive number"),
        ("a: 1\nb: yes\nc: 1\n", "weight of 'b'"),
    ):
        good.write_text(text)
        with pytest.raises(UserError, match=error):
            class_weights(str(good), CLASSES, LABELS)
    with pytest.raises(UserError, match=r"--class-weights absent\.yaml: no such file"):
        build({"class_weights": "absent.yaml"})


def test_the_balanced_sampler_draws_every_class_alike_and_repeats_for_a_seed() -> None:
    labels = torch.tensor([0] * 90 + [1] * 10)
    drawn = [i for e in range(20) for b in epoch_batches(100, 10, 0, e, labels=labels) for i in b]
    counts = torch.bincount(labels[drawn])
    assert len(drawn) == 2000 and abs(counts[0] - counts[1]) < 200  # 1000 each expected
    # A function of (seed, epoch): a resumed run draws the same batches.
    assert epoch_batches(100, 10, 0, 3, labels=labels) == epoch_batches(
        100, 10, 0, 3, labels=labels
    )
    assert epoch_batches(100, 10, 0, 3, labels=labels) != epoch_batches(
        100, 10, 0, 4, labels=labels
    )
    assert epoch_batches(100, 10, 0, 3, labels=labels) != epoch_batches(
        100, 10, 1, 3, labels=labels
    )
    # Two ranks share each global batch, as with the uniform order.
    whole = epoch_batches(100, 10, 0, 3, labels=labels)
    halves = [epoch_batches(100, 10, 0, 3, r, 2, labels=labels) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves, strict=True)] == whole
