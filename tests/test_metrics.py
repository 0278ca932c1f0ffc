"""Metrics on hand-made label images with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from denoiseg_core.metrics import (
    average_precision,
    evaluate_segmentation,
    format_table,
    iou_matrix,
    mean_average_precision,
    psnr,
    seg_score,
)


def _boxes(shape, boxes) -> np.ndarray:
    """A label image with ``label: (slice, slice)`` rectangles painted in order."""
    out = np.zeros(shape, np.int32)
    for label, box in boxes.items():
        out[box] = label
    return out


def test_perfect_match():
    gt = _boxes((20, 20), {1: np.s_[0:5, 0:5], 2: np.s_[10:15, 10:20]})
    assert average_precision(gt, gt) == 1.0
    assert mean_average_precision(gt, gt) == 1.0
    assert seg_score(gt, gt) == 1.0


def test_swapped_label_ids_do_not_matter():
    gt = _boxes((20, 20), {1: np.s_[0:5, 0:5], 2: np.s_[10:15, 10:20]})
    pred = _boxes((20, 20), {77: np.s_[0:5, 0:5], 5: np.s_[10:15, 10:20]})
    assert average_precision(gt, pred) == 1.0
    assert seg_score(gt, pred) == 1.0


def test_iou_matrix_values():
    gt = _boxes((10, 10), {1: np.s_[0:4, 0:5]})  # 20 pixels
    pred = _boxes((10, 10), {3: np.s_[0:4, 0:3], 9: np.s_[0:4, 3:10]})  # 12 and 28 pixels
    matrix = iou_matrix(gt, pred)
    assert matrix.shape == (1, 2)
    np.testing.assert_allclose(matrix, [[12 / 20, 8 / (20 + 28 - 8)]])
    assert iou_matrix(np.zeros((4, 4), int), pred[:4, :4]).shape == (0, 2)


def test_one_gt_two_preds_iou_06():
    # GT 10x10 = 100 px; pred A covers 75 of it with 50 extra px: IoU 75 / 125 = 0.6
    gt = _boxes((40, 40), {1: np.s_[0:10, 0:10]})
    pred = _boxes((40, 40), {1: np.s_[0:5, 0:15], 2: np.s_[30:35, 30:35]})
    pred[5:10, 0:5] = 1  # pred 1: 100 px, 75 of them inside the GT; union 125
    assert iou_matrix(gt, pred)[0, 0] == pytest.approx(0.6)
    # TP 1, FP 1 (the far-away object), FN 0
    assert average_precision(gt, pred, 0.5) == pytest.approx(0.5)
    # above IoU 0.6 nothing matches: TP 0, FP 2, FN 1
    assert average_precision(gt, pred, 0.6) == 0.0


def test_iou_exactly_half_is_not_a_match():
    gt = _boxes((10, 10), {1: np.s_[0:4, 0:4]})  # 16 px
    pred = _boxes((10, 10), {1: np.s_[0:4, 0:8]})  # 32 px, IoU 16/32 = 0.5
    assert iou_matrix(gt, pred)[0, 0] == 0.5
    assert average_precision(gt, pred, 0.5) == 0.0
    assert average_precision(gt, pred, 0.49) == 1.0


def test_empty_images():
    empty = np.zeros((8, 8), np.int32)
    one = _boxes((8, 8), {1: np.s_[1:3, 1:3]})
    assert average_precision(empty, empty) == 1.0
    assert average_precision(one, empty) == 0.0
    assert average_precision(empty, one) == 0.0
    assert math.isnan(seg_score(empty, one))


def test_low_threshold_uses_one_to_one_assignment():
    # Two GT objects both overlap pred 1; only GT 2 overlaps pred 2.
    gt = _boxes((10, 20), {1: np.s_[0:10, 0:4], 2: np.s_[0:10, 4:12]})
    pred = _boxes((10, 20), {1: np.s_[0:10, 0:8], 2: np.s_[0:10, 8:20]})
    matrix = iou_matrix(gt, pred)
    np.testing.assert_allclose(matrix, [[40 / 80, 0.0], [40 / 120, 40 / 160]])  # 0.5, 1/3, 0.25
    # TP 2 at threshold 0.2: GT1-pred1 (0.5) and GT2-pred2 (0.25)
    assert average_precision(gt, pred, 0.2) == 1.0
    # at 0.3 only pairs GT1-pred1 (0.5) and GT2-pred1 (0.33) qualify, and pred 1 can match once
    assert average_precision(gt, pred, 0.3) == pytest.approx(1 / 3)


def test_seg_hand_computed():
    gt = _boxes((20, 20), {1: np.s_[0:10, 0:10], 2: np.s_[12:16, 0:4], 3: np.s_[0:4, 12:20]})
    pred = np.zeros((20, 20), np.int32)
    pred[0:10, 0:6] = 5  # covers 60 of GT 1's 100 px: Jaccard 60/100
    pred[12:16, 0:2] = 6  # covers exactly 50% of GT 2: not > 50%, so 0
    pred[0:4, 12:20] = 7  # exact: 1
    pred[0:4, 10:12] = 7  # ... now 8 extra px: Jaccard 32/40
    expected = (0.6 + 0.0 + 32 / 40) / 3
    assert seg_score(gt, pred) == pytest.approx(expected)


def test_mean_average_precision():
    gt = _boxes((10, 10), {1: np.s_[0:10, 0:10]})
    pred = _boxes((10, 10), {1: np.s_[0:10, 0:8]})  # IoU 0.8
    # thresholds 0.5..0.75 (6 of 10) count, 0.8 and above do not (strictly greater)
    assert mean_average_precision(gt, pred) == pytest.approx(0.6)


def test_3d():
    gt = np.zeros((6, 10, 10), np.int32)
    gt[0:3, 0:5, 0:5] = 1
    gt[3:6, 5:10, 5:10] = 2
    pred = np.zeros_like(gt)
    pred[0:3, 0:5, 0:4] = 4  # IoU 0.8
    pred[3:6, 0:2, 0:2] = 9  # no overlap: FP; GT 2 is FN
    assert average_precision(gt, pred) == pytest.approx(1 / 3)
    assert seg_score(gt, pred) == pytest.approx(0.4)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        average_precision(np.zeros((4, 4), int), np.zeros((4, 5), int))


def test_psnr():
    clean = np.array([0.0, 10.0, 0.0, 10.0])
    noisy = clean + np.array([1.0, -1.0, 1.0, -1.0])  # MSE 1, range 10 -> 20 dB
    assert psnr(clean, noisy) == pytest.approx(20.0)
    assert psnr(clean, noisy, data_range=100.0) == pytest.approx(40.0)
    assert psnr(clean, clean) == math.inf


def test_evaluate_segmentation_and_table():
    gt_a = _boxes((10, 10), {1: np.s_[0:4, 0:4], 2: np.s_[6:10, 6:10]})
    pred_a = gt_a.copy()
    gt_b = _boxes((10, 10), {1: np.s_[0:4, 0:4]})
    pred_b = np.zeros_like(gt_b)
    results = evaluate_segmentation([gt_a, gt_b], [pred_a, pred_b], names=["a.tif", "b.tif"])
    assert results["n_images"] == 2
    assert results["ap50"] == pytest.approx(0.5)
    # SEG as the paper: per-image SEG (1 and 0) averaged over images; pooled over all 3 GT objects
    # it is (1 + 1 + 0) / 3
    assert results["seg"] == pytest.approx(0.5)
    assert results["seg_pooled"] == pytest.approx(2 / 3)
    # an image without GT objects has no SEG and does not count in the mean
    with_empty = evaluate_segmentation([gt_a, gt_b, np.zeros_like(gt_a)], [pred_a, pred_b, pred_b])
    assert with_empty["seg"] == pytest.approx(0.5) and with_empty["seg_pooled"] == pytest.approx(2 / 3)
    assert [r["name"] for r in results["per_image"]] == ["a.tif", "b.tif"]
    assert results["per_image"][1]["n_gt"] == 1 and results["per_image"][1]["n_pred"] == 0
    table = format_table(results)
    assert "a.tif" in table and "AP@0.5" in table and "0.500" in table and "0.667" in table
    assert "SEG pooled over objects" in table and "as the DenoiSeg paper" in table
    with pytest.raises(ValueError):
        evaluate_segmentation([gt_a], [])


def test_iou_matrix_matches_direct_computation():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, size=(30, 30)) * 3  # ids 0, 3, 6, 9, 12
    pred = rng.integers(0, 4, size=(30, 30))
    matrix = iou_matrix(gt, pred)
    for row, g in enumerate([3, 6, 9, 12]):
        for col, p in enumerate([1, 2, 3]):
            a, b = gt == g, pred == p
            assert matrix[row, col] == pytest.approx((a & b).sum() / (a | b).sum())
