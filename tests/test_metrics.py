"""OA, AA, Cohen's kappa and macro-F1 against confusion matrices worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rsscene.engine.evaluate import confusion_matrix, headline, kappa, summarize

CLASSES3 = ["a", "b", "c"]


def test_a_class_never_predicted_counts_zero_recall_in_aa() -> None:
    # True class c (2 images) is never predicted: its column is empty.
    cm = torch.tensor([[5, 1, 0], [2, 3, 0], [1, 1, 0]])
    report = summarize(cm, CLASSES3)
    # Rows 6, 5, 2; columns 8, 5, 0; 13 images, 8 right.
    assert report["accuracy"] == pytest.approx(8 / 13)
    assert report["average_accuracy"] == pytest.approx((5 / 6 + 3 / 5 + 0) / 3)
    # p_o = 104/169, p_e = (6*8 + 5*5 + 2*0)/169 = 73/169: kappa = 31/96.
    assert report["kappa"] == pytest.approx(31 / 96)
    f1 = [2 * (5 / 8) * (5 / 6) / (5 / 8 + 5 / 6), 2 * (3 / 5) * (3 / 5) / (6 / 5), 0.0]
    assert report["macro"]["f1"] == pytest.approx(sum(f1) / 3)
    assert headline(report) == {
        "oa": report["accuracy"],
        "aa": report["average_accuracy"],
        "kappa": report["kappa"],
        "macro_f1": report["macro"]["f1"],
    }


def test_two_classes() -> None:
    cm = torch.tensor([[20, 5], [10, 15]])
    # p_o = 0.7; p_e = (25*30 + 25*20)/2500 = 0.5; kappa = 0.2/0.5.
    assert kappa(cm) == pytest.approx(0.4)
    assert summarize(cm, ["x", "y"])["average_accuracy"] == pytest.approx((20 / 25 + 15 / 25) / 2)


def test_a_class_absent_from_the_test_set_is_left_out_of_aa_but_not_kappa() -> None:
    cm = torch.tensor([[3, 0, 1], [0, 2, 0], [0, 0, 0]])
    report = summarize(cm, CLASSES3)
    assert report["average_accuracy"] == pytest.approx((3 / 4 + 2 / 2) / 2)
    # p_o = 5/6; p_e = (4*3 + 2*2 + 0*1)/36 = 16/36; kappa = (30 - 16)/(36 - 16).
    assert report["kappa"] == pytest.approx(14 / 20)


def test_perfect_chance_and_degenerate_agreement() -> None:
    assert kappa(torch.diag(torch.tensor([4, 3, 2]))) == pytest.approx(1.0)
    # Predictions independent of the truth: observed agreement equals chance, kappa 0.
    assert kappa(torch.tensor([[2, 2], [2, 2]])) == pytest.approx(0.0)
    # One class only, all right: chance agreement is total, kappa undefined.
    assert math.isnan(kappa(torch.tensor([[5, 0], [0, 0]])))
    assert math.isnan(kappa(torch.zeros(3, 3, dtype=torch.long)))


def test_the_confusion_matrix_puts_truth_in_rows() -> None:
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]), 3)
    assert cm.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
