"""VOC07 classification AP against hand-computed values."""

import math

import numpy as np
import pytest

from core.voc_ap import average_precision, mean_ap, voc07_classification_ap


def test_eleven_point_ap_by_hand():
    # ranking: +, -, +, -  -> precision at the hits: 1 (r=.5), 2/3 (r=1)
    # 11-point: t=0..0.5 (6 points) max prec = 1; t=0.6..1 (5 points) = 2/3 -> (6 + 5*2/3)/11
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    pos = np.array([1, 0, 1, 0], bool)
    assert average_precision(scores, pos, "11points") == pytest.approx((6 + 5 * 2 / 3) / 11)
    # area (non-interpolated): mean precision at the hits = (1 + 2/3) / 2
    assert average_precision(scores, pos, "area") == pytest.approx((1 + 2 / 3) / 2)


def test_difficult_only_entries_are_ignored():
    # class 0: image 1 holds it only as difficult and has the top score; dropping it leaves
    # + - (AP 1.0). Counting it as a negative would give (1/2 + ...) < 1.
    scores = np.array([[0.5], [0.95], [0.2]])
    labels = np.array([[1.0], [0.0], [0.0]])
    difficult = np.array([[0.0], [1.0], [0.0]])
    assert voc07_classification_ap(scores, labels, difficult)[0] == pytest.approx(1.0)
    assert voc07_classification_ap(scores, labels, np.zeros_like(difficult))[0] < 0.7


def test_class_without_positives_is_left_out_of_the_mean():
    scores = np.array([[0.9, 0.1], [0.1, 0.2]])
    labels = np.array([[1.0, 0.0], [0.0, 0.0]])
    per_class = voc07_classification_ap(scores, labels, np.zeros_like(labels))
    assert per_class[0] == pytest.approx(1.0) and math.isnan(per_class[1])
    assert mean_ap(per_class) == pytest.approx(1.0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="expected three"):
        voc07_classification_ap(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((2, 3)))
