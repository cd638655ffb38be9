"""Calibration figures against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from posttrain.ops.calibration import (
    adaptive_calibration_error,
    bin_index,
    brier_score,
    calibration_summary,
    expected_calibration_error,
    reliability_bins,
)

# Six answers. With 15 equal-width bins of width 1/15 = 0.0667:
#   bin 4  (0.267, 0.333]: 0.30 (wrong)
#   bin 9  (0.600, 0.667]: 0.61 (right), 0.63 (wrong)
#   bin 13 (0.867, 0.933]: 0.88 (wrong), 0.90 (right), 0.92 (right)
CONFIDENCE = np.array([0.9, 0.92, 0.88, 0.61, 0.63, 0.3])
CORRECT = np.array([1, 1, 0, 1, 0, 0])


def test_bins_follow_guo_et_al_intervals():
    assert bin_index(np.array([0.0, 1 / 15, 0.07, 0.5, 1.0])).tolist() == [0, 0, 1, 7, 14]
    bins = reliability_bins(CONFIDENCE, CORRECT)
    assert len(bins) == 15 and sum(b.count for b in bins) == 6
    filled = {i: b for i, b in enumerate(bins) if b.count}
    assert sorted(filled) == [4, 9, 13]
    assert filled[13].count == 3
    assert filled[13].mean_confidence == pytest.approx(0.9)  # (0.9 + 0.92 + 0.88) / 3
    assert filled[13].accuracy == pytest.approx(2 / 3)
    assert filled[9].mean_confidence == pytest.approx(0.62) and filled[9].accuracy == 0.5
    assert filled[4].mean_confidence == pytest.approx(0.3) and filled[4].accuracy == 0.0
    assert bins[0].mean_confidence is None and bins[0].accuracy is None
    assert bins[13].lower == pytest.approx(13 / 15) and bins[13].upper == pytest.approx(14 / 15)


def test_expected_calibration_error_by_hand():
    # 3/6·|2/3 − 0.9| + 2/6·|0.5 − 0.62| + 1/6·|0 − 0.3| = 0.116667 + 0.04 + 0.05
    assert expected_calibration_error(CONFIDENCE, CORRECT) == pytest.approx(0.2066667, abs=1e-6)


def test_adaptive_calibration_error_by_hand():
    # 3 equal-mass bins of the sorted answers: {0.30 ✗, 0.61 ✓}, {0.63 ✗, 0.88 ✗}, {0.90 ✓, 0.92 ✓}
    # gaps |0.5 − 0.455| = 0.045, |0 − 0.755| = 0.755, |1 − 0.91| = 0.09; mean = 0.89 / 3
    assert adaptive_calibration_error(CONFIDENCE, CORRECT, n_bins=3) == pytest.approx(0.89 / 3)
    # 15 bins for 6 answers: each answer alone, so the mean of |correct − confidence|
    # (0.1 + 0.08 + 0.88 + 0.39 + 0.63 + 0.3) / 6 = 2.38 / 6
    assert adaptive_calibration_error(CONFIDENCE, CORRECT) == pytest.approx(2.38 / 6)


def test_brier_score_by_hand():
    # 0.1² + 0.08² + 0.88² + 0.39² + 0.63² + 0.3² = 0.01 + 0.0064 + 0.7744 + 0.1521 + 0.3969 + 0.09 = 1.4298
    assert brier_score(CONFIDENCE, CORRECT) == pytest.approx(1.4298 / 6)


def test_perfect_and_worst_calibration():
    sure_and_right = np.ones(4), np.ones(4)
    assert expected_calibration_error(*sure_and_right) == 0 and brier_score(*sure_and_right) == 0
    sure_and_wrong = np.ones(4), np.zeros(4)
    assert expected_calibration_error(*sure_and_wrong) == 1 and adaptive_calibration_error(*sure_and_wrong) == 1


def test_summary_of_nothing_and_bad_input():
    assert calibration_summary(np.array([]), np.array([])) == {
        "n": 0, "ece": None, "ece_adaptive": None, "brier": None, "bins": [],
    }  # fmt: skip
    summary = calibration_summary(CONFIDENCE, CORRECT)
    assert summary["n"] == 6 and summary["ece"] == pytest.approx(0.2066667, abs=1e-6) and len(summary["bins"]) == 15
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier_score(np.array([1.2]), np.array([1]))
    with pytest.raises(ValueError, match="0 or 1"):
        brier_score(np.array([0.5]), np.array([0.5]))
    with pytest.raises(ValueError, match="2 confidences for 1"):
        expected_calibration_error(np.array([0.5, 0.5]), np.array([1]))
