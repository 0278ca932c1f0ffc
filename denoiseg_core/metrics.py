"""Evaluation metrics: instance matching (AP as in DenoiSeg/StarDist, CTC SEG) and PSNR.

Overlaps between objects come from a sparse contingency table of (GT label, predicted label)
pixel pairs, so cost is linear in the number of pixels, never in pixel pairs. Label 0 is
background in both images; label ids need not be consecutive and their values don't matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment

if TYPE_CHECKING:
    from denoiseg_core.components import InstanceSettings, SegmentationHead

# rounded so that e.g. 0.65 is exactly 0.65 and not 0.6499999 (IoU must be strictly above it)
DEFAULT_THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


@dataclass(frozen=True)
class _Overlaps:
    """Every (GT object, predicted object) pair that shares at least one pixel."""

    n_gt: int
    n_pred: int
    gt_index: np.ndarray  # row of each overlapping pair (0..n_gt-1)
    pred_index: np.ndarray  # column of each pair (0..n_pred-1)
    intersection: np.ndarray  # pixels shared by the pair
    gt_area: np.ndarray  # (n_gt,)
    pred_area: np.ndarray  # (n_pred,)

    @property
    def iou(self) -> np.ndarray:
        union = self.gt_area[self.gt_index] + self.pred_area[self.pred_index] - self.intersection
        return self.intersection / union

    def dense_iou(self) -> np.ndarray:
        matrix = np.zeros((self.n_gt, self.n_pred))
        matrix[self.gt_index, self.pred_index] = self.iou
        return matrix


def _overlaps(gt: np.ndarray, pred: np.ndarray) -> _Overlaps:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} differs from prediction shape {pred.shape}")
    if (gt.size and gt.min() < 0) or (pred.size and pred.min() < 0):
        raise ValueError("label images must not contain negative values")
    # Map label ids to 0..n (0 stays background whether or not it occurs).
    gt_ids, gt_inv = np.unique(np.concatenate([[0], gt.ravel()]), return_inverse=True)
    pred_ids, pred_inv = np.unique(np.concatenate([[0], pred.ravel()]), return_inverse=True)
    gt_inv, pred_inv = gt_inv[1:], pred_inv[1:]
    table = sparse.coo_matrix(
        (np.ones(gt_inv.size, dtype=np.int64), (gt_inv, pred_inv)), shape=(gt_ids.size, pred_ids.size)
    ).tocsr()  # duplicates are summed: table[i, j] = pixels with gt label i and pred label j
    gt_area = np.bincount(gt_inv, minlength=gt_ids.size)[1:].astype(np.float64)
    pred_area = np.bincount(pred_inv, minlength=pred_ids.size)[1:].astype(np.float64)
    objects = table[1:, 1:].tocoo()
    return _Overlaps(
        n_gt=gt_ids.size - 1,
        n_pred=pred_ids.size - 1,
        gt_index=objects.row.astype(np.int64),
        pred_index=objects.col.astype(np.int64),
        intersection=objects.data.astype(np.float64),
        gt_area=gt_area,
        pred_area=pred_area,
    )


def iou_matrix(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU of every GT object (rows, by increasing label id) with every predicted object (columns)."""
    return _overlaps(gt, pred).dense_iou()


def _true_positives(overlaps: _Overlaps, iou_threshold: float) -> int:
    """Number of one-to-one matched pairs with IoU strictly above the threshold."""
    iou = overlaps.iou
    above = iou > iou_threshold
    if iou_threshold >= 0.5:
        # IoU > 0.5 with two different objects is impossible, so such pairs are already unique.
        return int(above.sum())
    if not above.any():
        return 0
    valid = np.zeros((overlaps.n_gt, overlaps.n_pred))
    valid[overlaps.gt_index[above], overlaps.pred_index[above]] = 1.0
    dense = overlaps.dense_iou()
    # Maximise the number of matches first; the IoU bonus (< 1 in total) only breaks ties.
    weight = valid * (1.0 + dense / (min(overlaps.n_gt, overlaps.n_pred) + 1))
    rows, cols = linear_sum_assignment(weight, maximize=True)
    return int(valid[rows, cols].sum())


def _ap_from(overlaps: _Overlaps, iou_threshold: float) -> float:
    if overlaps.n_gt == 0 and overlaps.n_pred == 0:
        return 1.0
    tp = _true_positives(overlaps, iou_threshold)
    fp, fn = overlaps.n_pred - tp, overlaps.n_gt - tp
    return tp / (tp + fp + fn)


def average_precision(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> float:
    """DenoiSeg's AP: TP / (TP + FP + FN), objects matched one-to-one with IoU > threshold.

    1.0 when both images have no objects.
    """
    return _ap_from(_overlaps(gt, pred), iou_threshold)


def mean_average_precision(gt: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> float:
    """Mean of :func:`average_precision` over IoU thresholds (default 0.5, 0.55, ..., 0.95)."""
    overlaps = _overlaps(gt, pred)
    return float(np.mean([_ap_from(overlaps, float(t)) for t in thresholds]))


def _seg_jaccards(overlaps: _Overlaps) -> np.ndarray:
    """Per GT object: Jaccard with the predicted object covering more than half of it, else 0."""
    jaccard = np.zeros(overlaps.n_gt)
    covers = overlaps.intersection > 0.5 * overlaps.gt_area[overlaps.gt_index]
    jaccard[overlaps.gt_index[covers]] = overlaps.iou[covers]
    return jaccard


def seg_score(gt: np.ndarray, pred: np.ndarray) -> float:
    """Cell Tracking Challenge SEG: mean over GT objects of the Jaccard index with the predicted
    object that covers more than 50% of it (0 if there is none).

    NaN when the ground truth has no objects (SEG is undefined there).
    """
    jaccard = _seg_jaccards(_overlaps(gt, pred))
    return float(jaccard.mean()) if jaccard.size else float("nan")


def psnr(clean: np.ndarray, estimate: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; ``data_range`` defaults to ``clean.max() - clean.min()``."""
    clean = np.asarray(clean, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    if clean.shape != estimate.shape:
        raise ValueError(f"clean shape {clean.shape} differs from estimate shape {estimate.shape}")
    if data_range is None:
        data_range = float(clean.max() - clean.min())
    if data_range <= 0:
        raise ValueError("data_range must be positive (the clean image is constant; pass data_range)")
    mse = float(np.mean((clean - estimate) ** 2))
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def evaluate_segmentation(
    gts: Sequence[np.ndarray], preds: Sequence[np.ndarray], names: Sequence[str] | None = None
) -> dict:
    """AP@0.5, mAP@[0.5:0.95] and SEG for pairs of label images.

    ``ap50`` and ``map`` are means over images. ``seg`` is each image's CTC SEG averaged over the
    images that have GT objects, as the DenoiSeg paper and its code report it; ``seg_pooled``
    averages the CTC Jaccards over all GT objects of all images instead (so images with many
    objects weigh more). Both are NaN without GT objects. ``per_image`` holds each image's values
    and object counts.
    """
    if len(gts) != len(preds):
        raise ValueError(f"{len(gts)} ground-truth images but {len(preds)} predictions")
    if names is not None and len(names) != len(gts):
        raise ValueError(f"{len(names)} names for {len(gts)} images")
    per_image = []
    all_jaccards = []
    for i, (gt, pred) in enumerate(zip(gts, preds)):
        overlaps = _overlaps(gt, pred)
        jaccards = _seg_jaccards(overlaps)
        all_jaccards.append(jaccards)
        per_image.append(
            {
                "name": names[i] if names is not None else str(i),
                "ap50": _ap_from(overlaps, 0.5),
                "map": float(np.mean([_ap_from(overlaps, float(t)) for t in DEFAULT_THRESHOLDS])),
                "seg": float(jaccards.mean()) if jaccards.size else float("nan"),
                "n_gt": overlaps.n_gt,
                "n_pred": overlaps.n_pred,
            }
        )
    pooled = np.concatenate(all_jaccards) if all_jaccards else np.zeros(0)
    per_image_seg = [r["seg"] for r in per_image if r["n_gt"] > 0]
    return {
        "ap50": float(np.mean([r["ap50"] for r in per_image])) if per_image else float("nan"),
        "map": float(np.mean([r["map"] for r in per_image])) if per_image else float("nan"),
        "seg": float(np.mean(per_image_seg)) if per_image_seg else float("nan"),
        "seg_pooled": float(pooled.mean()) if pooled.size else float("nan"),
        "n_images": len(per_image),
        "per_image": per_image,
    }


def format_table(results: dict) -> str:
    """A plain-text table of :func:`evaluate_segmentation` results (per image, then the summary)."""
    header = ("image", "AP@0.5", "mAP", "SEG", "GT", "pred")
    rows = [
        (r["name"], f"{r['ap50']:.3f}", f"{r['map']:.3f}", f"{r['seg']:.3f}", str(r["n_gt"]), str(r["n_pred"]))
        for r in results.get("per_image", [])
    ]
    summary = (
        f"mean ({results['n_images']} images)",
        f"{results['ap50']:.3f}",
        f"{results['map']:.3f}",
        f"{results['seg']:.3f}",
        "",
        "",
    )
    pooled = ("SEG pooled over objects", "", "", f"{results.get('seg_pooled', float('nan')):.3f}", "", "")
    widths = [max(len(row[c]) for row in [header, summary, pooled, *rows]) for c in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(header))
    note = "SEG: mean over images with objects of each image's CTC SEG (as the DenoiSeg paper); pooled: over all objects"
    return "\n".join([line(header), rule, *map(line, rows), rule, line(summary), line(pooled), note])


@dataclass(frozen=True)
class Tuning:
    """What tuning found: the best ``settings``, their ``score`` (mean AP@0.5) and every
    candidate tried with its score (``table``: ``(settings, score)`` pairs, in order)."""

    settings: InstanceSettings
    score: float
    table: tuple[tuple[InstanceSettings, float], ...]

    def summary(self) -> dict:
        """A JSON-ready record (e.g. a checkpoint's validation entry)."""
        return {
            "ap50": self.score,
            "settings": self.settings.model_dump(mode="json"),
            "candidates": [s.model_dump(mode="json") for s, _ in self.table],
            "ap50_per_candidate": [score for _, score in self.table],
        }


def mean_ap50(
    head: SegmentationHead, settings: InstanceSettings, outputs: Sequence[np.ndarray], labels: Sequence[np.ndarray]
) -> float:
    """Mean AP@0.5 of the head's instances with ``settings`` over images with known ``labels``."""
    return float(np.mean([average_precision(truth, head.instances(out, settings)) for out, truth in zip(outputs, labels)]))


def tune_by_grid(
    head: SegmentationHead,
    candidates: Sequence[InstanceSettings],
    outputs: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
) -> Tuning:
    """The candidate settings with the highest mean AP@0.5 of ``head.instances`` over the
    images (the first one on a tie), for a head's ``tune``."""
    if not candidates or not outputs or len(outputs) != len(labels):
        raise ValueError(f"tuning needs candidates and one label image per output ({len(outputs)} outputs, {len(labels)} labels)")
    scores = [mean_ap50(head, settings, outputs, labels) for settings in candidates]
    best = int(np.argmax(scores))
    return Tuning(settings=candidates[best], score=scores[best], table=tuple(zip(candidates, scores)))
