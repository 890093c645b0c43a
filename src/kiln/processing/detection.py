"""Detection post-processing: anchor-free (YOLO/DAMO-YOLO style) box decode, score threshold,
class-aware NMS, and mapping boxes back to the original image.

The model emits, for every anchor point of every level (row-major per level, levels in ``strides``
order), class logits ``scores [B, N, C]`` and distances to the box sides ``boxes [B, N, 4]`` (left,
top, right, bottom) in units of the level's stride. The numpy helpers here are shared with the zoo's
training code, so the figures training reports are the ones ``kiln predict`` reproduces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from kiln.errors import ProcessingError
from kiln.processing.registry import Batch, OpArgs, PostOp, register_op


def anchor_points(height: int, width: int, strides: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Anchor centres ``[N, 2]`` (x, y in input pixels) and each one's stride ``[N]``."""
    points, point_strides = [], []
    for s in strides:
        gh, gw = math.ceil(height / s), math.ceil(width / s)
        ys, xs = np.meshgrid(np.arange(gh, dtype=np.float32), np.arange(gw, dtype=np.float32), indexing="ij")
        points.append(np.stack([(xs.ravel() + 0.5) * s, (ys.ravel() + 0.5) * s], axis=1))
        point_strides.append(np.full(gh * gw, s, dtype=np.float32))
    return np.concatenate(points), np.concatenate(point_strides)


def decode_distances(distances: np.ndarray, points: np.ndarray, strides: np.ndarray) -> np.ndarray:
    """ltrb distances in stride units ``[..., N, 4]`` -> xyxy boxes in pixels."""
    d = distances * strides[:, None]
    return np.concatenate([points - d[..., :2], points + d[..., 2:]], axis=-1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)), dtype=np.float32)  # overflow-free


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices of the kept boxes, best first."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Class-aware NMS: boxes of different classes never suppress each other (offset trick)."""
    if not len(boxes):
        return np.zeros(0, dtype=np.int64)
    # Each class moved past the span of every box (not just past the largest coordinate: decoded boxes
    # can reach below zero), so boxes of two classes can never overlap.
    span = float(boxes.max()) - float(boxes.min()) + 1.0
    offset = span * class_ids.astype(np.float64)[:, None]
    return nms(boxes.astype(np.float64) + offset, scores, iou_threshold)


@dataclass
class Detections:
    """One image's detections: xyxy ``boxes [K, 4]``, ``scores [K]``, ``class_ids [K]``."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    labels: Sequence[str] | None = None

    def select(self, idx: np.ndarray) -> Detections:
        return Detections(self.boxes[idx], self.scores[idx], self.class_ids[idx], self.labels)

    def to_json(self) -> list[dict[str, Any]]:
        out = []
        for box, score, cls in zip(self.boxes.tolist(), self.scores.tolist(), self.class_ids.tolist(), strict=True):
            item: dict[str, Any] = {"box": [round(v, 2) for v in box], "score": round(score, 5), "class_id": cls}
            if self.labels is not None and 0 <= cls < len(self.labels):
                item["label"] = self.labels[cls]
            out.append(item)
        return out


def decode(
    scores: np.ndarray, distances: np.ndarray, height: int, width: int, strides: Sequence[int], logits: bool = True
) -> list[Detections]:
    """Per image: the best class of every anchor point, its score and its decoded box."""
    points, point_strides = anchor_points(height, width, strides)
    if scores.shape[1] != len(points) or distances.shape[1] != len(points):
        raise ValueError(
            f"the outputs hold {scores.shape[1]} anchor points but a {height}x{width} input with strides "
            f"{list(strides)} has {len(points)}; check the strides"
        )
    probs = sigmoid(scores) if logits else scores
    boxes = decode_distances(distances.astype(np.float32), points, point_strides)
    cls = probs.argmax(axis=-1)
    best = np.take_along_axis(probs, cls[..., None], axis=-1)[..., 0]
    return [Detections(boxes[i], best[i], cls[i]) for i in range(len(scores))]


# ---- ops --------------------------------------------------------------------------------------------
def _as_detections(value: Any, op: str) -> list[Detections]:
    if not isinstance(value, list) or not all(isinstance(v, Detections) for v in value):
        raise ProcessingError(op, "needs detections; put 'yolo_decode' before it in postprocess")
    return value


class YoloDecodeArgs(OpArgs):
    scores: str = Field(default="scores", description="output with class logits [B, N, C]")
    boxes: str = Field(default="boxes", description="output with ltrb distances in stride units [B, N, 4]")
    strides: list[int] = Field(min_length=1)
    input: str | None = Field(default=None, description="image input (NCHW) whose size sets the anchor grid")
    logits: bool = True


@register_op
class YoloDecode(PostOp):
    """Anchor-free box decode: every anchor point's best class, score and xyxy box (model input pixels)."""

    name = "yolo_decode"
    Args = YoloDecodeArgs
    args: YoloDecodeArgs

    def __call__(self, value: Any, batch: Batch) -> Any:
        a = self.args
        if not isinstance(value, dict) or a.scores not in value or a.boxes not in value:
            have = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise ProcessingError(self.name, f"needs outputs {a.scores!r} and {a.boxes!r}; got {have}")
        image = batch.inputs.get(a.input) if a.input else next(iter(batch.inputs.values()), None)
        if image is None:
            raise ProcessingError(self.name, f"needs the model's input image {a.input or ''} to size the anchor grid")
        try:
            dets = decode(value[a.scores], value[a.boxes], image.shape[-2], image.shape[-1], a.strides, a.logits)
        except ValueError as exc:
            raise ProcessingError(self.name, str(exc)) from None
        labels = self.context.spec.labels if self.context.spec else None
        for d in dets:
            d.labels = labels
        return dets


class ScoreThresholdArgs(OpArgs):
    threshold: float = Field(ge=0, le=1)


@register_op
class ScoreThreshold(PostOp):
    """Drop detections scoring below ``threshold``."""

    name = "score_threshold"
    Args = ScoreThresholdArgs
    args: ScoreThresholdArgs

    def __call__(self, value: Any, batch: Batch) -> Any:
        return [d.select(np.nonzero(d.scores >= self.args.threshold)[0]) for d in _as_detections(value, self.name)]


class NmsArgs(OpArgs):
    iou_threshold: float = Field(default=0.5, gt=0, le=1)
    class_aware: bool = True
    max_detections: int = Field(default=100, ge=1)
    pre_nms_top_k: int = Field(default=1000, ge=1)


@register_op
class Nms(PostOp):
    """Non-maximum suppression (class-aware by default), best ``max_detections`` kept."""

    name = "nms"
    Args = NmsArgs
    args: NmsArgs

    def __call__(self, value: Any, batch: Batch) -> Any:
        a = self.args
        out = []
        for d in _as_detections(value, self.name):
            top = np.argsort(-d.scores, kind="stable")[: a.pre_nms_top_k]
            d = d.select(top)
            keep = (
                batched_nms(d.boxes, d.scores, d.class_ids, a.iou_threshold)
                if a.class_aware
                else nms(d.boxes, d.scores, a.iou_threshold)
            )
            out.append(d.select(keep[: a.max_detections]))
        return out


class ScaleBoxesArgs(OpArgs):
    clip: bool = True


@register_op
class ScaleBoxes(PostOp):
    """Map boxes from model input pixels back to the original image (undoing resize, letterbox, crop)."""

    name = "scale_boxes"
    Args = ScaleBoxesArgs
    args: ScaleBoxesArgs

    def __call__(self, value: Any, batch: Batch) -> Any:
        dets = _as_detections(value, self.name)
        out = []
        for i, d in enumerate(dets):
            meta = batch.meta[i] if i < len(batch.meta) else {}
            sx, sy, tx, ty = meta.get("transform", (1.0, 1.0, 0.0, 0.0))
            boxes = (d.boxes - np.array([tx, ty, tx, ty], np.float32)) / np.array([sx, sy, sx, sy], np.float32)
            if self.args.clip and "orig_size" in meta:
                h, w = meta["orig_size"]
                boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32))
            out.append(Detections(boxes, d.scores, d.class_ids, d.labels))
        return out
