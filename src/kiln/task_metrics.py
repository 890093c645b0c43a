"""Task metrics that later stages hold accuracy budgets on, as plain functions of plain data.

Kept free of kiln internals (numpy only) so that the optimizer, the bench and tests can import them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BoxLike = Mapping[str, Any] | Sequence[float]
Boxes = Sequence[BoxLike] | np.ndarray  # one image's boxes: dicts, rows, or an array of rows


def _pred_rows(dets: Boxes) -> np.ndarray:
    """Predictions as rows ``[x1, y1, x2, y2, score, class_id]``."""
    rows = []
    for d in dets:
        if isinstance(d, Mapping):
            rows.append([*d["box"], float(d["score"]), int(d["class_id"])])
        else:
            if len(d) != 6:
                raise ValueError(f"a prediction row needs 6 values [x1, y1, x2, y2, score, class_id], got {len(d)}")
            rows.append(list(d))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 6)


def _gt_rows(gts: Boxes) -> np.ndarray:
    """Ground truth as rows ``[x1, y1, x2, y2, class_id]``."""
    rows = []
    for g in gts:
        if isinstance(g, Mapping):
            rows.append([*g["box"], int(g["class_id"])])
        else:
            if len(g) != 5:
                raise ValueError(f"a ground-truth row needs 5 values [x1, y1, x2, y2, class_id], got {len(g)}")
            rows.append(list(g))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``[N, 4]`` and ``[M, 4]`` xyxy boxes -> ``[N, M]``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision-recall curve with all-point interpolation (VOC 2010+ and COCO style)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    idx = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[idx + 1] - r[idx]) * p[idx + 1]))


def map50(pred_boxes: Sequence[Boxes], gt_boxes: Sequence[Boxes], iou: float = 0.5) -> float:
    """Mean average precision at IoU ``iou`` (0.5 by default) over the classes present in the ground truth.

    ``pred_boxes[i]`` holds image *i*'s detections, each ``{"box": [x1, y1, x2, y2], "score": s,
    "class_id": c}`` (what the ``nms`` post-processing op returns) or a row ``[x1, y1, x2, y2, s, c]``;
    ``gt_boxes[i]`` holds its objects as ``{"box": [...], "class_id": c}`` or rows ``[x1, y1, x2, y2, c]``.
    Each ground-truth box matches at most one detection, highest score first.
    """
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"{len(pred_boxes)} images of predictions but {len(gt_boxes)} of ground truth")
    preds = [_pred_rows(p) for p in pred_boxes]
    gts = [_gt_rows(g) for g in gt_boxes]
    classes = sorted({int(c) for g in gts for c in g[:, 4]})
    if not classes:
        raise ValueError("the ground truth holds no boxes; mAP is undefined")
    aps = []
    for cls in classes:
        n_gt = sum(int((g[:, 4] == cls).sum()) for g in gts)
        scores: list[float] = []
        hits: list[bool] = []
        for p, g in zip(preds, gts, strict=True):
            pc = p[p[:, 5] == cls]
            gc = g[g[:, 4] == cls]
            pc = pc[np.argsort(-pc[:, 4], kind="stable")]
            taken = np.zeros(len(gc), dtype=bool)
            ious = box_iou(pc[:, :4], gc[:, :4]) if len(gc) else np.zeros((len(pc), 0))
            for k in range(len(pc)):
                scores.append(float(pc[k, 4]))
                if ious.shape[1]:
                    cand = np.where(taken, -1.0, ious[k])
                    j = int(np.argmax(cand))
                    if cand[j] >= iou:
                        taken[j] = True
                        hits.append(True)
                        continue
                hits.append(False)
        if not scores:
            aps.append(0.0)
            continue
        order = np.argsort(-np.asarray(scores), kind="stable")
        tp = np.asarray(hits, dtype=np.float64)[order]
        ctp, cfp = np.cumsum(tp), np.cumsum(1.0 - tp)
        aps.append(average_precision(ctp / n_gt, ctp / np.maximum(ctp + cfp, 1e-12)))
    return float(np.mean(aps))


def pad_boxes(boxes: Sequence[np.ndarray]) -> np.ndarray:
    """Per-image ground truth ``[K_i, 5]`` (x1, y1, x2, y2, class_id) -> one ``[N, M, 5]`` float32 array,
    padded with rows of class -1: the ``labels`` array a detection model's validation data carries."""
    m = max((len(b) for b in boxes), default=0) or 1
    out = np.zeros((len(boxes), m, 5), np.float32)
    out[..., 4] = -1
    for i, b in enumerate(boxes):
        out[i, : len(b)] = np.asarray(b, dtype=np.float32).reshape(-1, 5)
    return out


def unpad_boxes(labels: np.ndarray) -> list[np.ndarray]:
    """The inverse of :func:`pad_boxes`: one ``[K_i, 5]`` array of real boxes per image."""
    return [rows[rows[:, 4] >= 0] for rows in np.asarray(labels, dtype=np.float64)]


def is_padded_boxes(labels: np.ndarray | None) -> bool:
    """Whether ``labels`` has the shape :func:`pad_boxes` gives: ``[N, M, 5]``."""
    return labels is not None and labels.ndim == 3 and labels.shape[-1] == 5
