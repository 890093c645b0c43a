"""Box losses for training the zoo's detector (torch tensors, xyxy, matched pairs)."""

from __future__ import annotations

from typing import Any


def iou(a: Any, b: Any) -> Any:
    """IoU of matched box pairs ``[K, 4]`` and ``[K, 4]`` -> ``[K]``."""
    lt = a[:, :2].maximum(b[:, :2])
    rb = a[:, 2:].minimum(b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


def giou_loss(a: Any, b: Any) -> Any:
    """1 - generalized IoU of matched pairs: still pulls boxes together when they do not overlap."""
    lt = a[:, :2].maximum(b[:, :2])
    rb = a[:, 2:].minimum(b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    union = (area_a + area_b - inter).clamp(min=1e-6)
    hull = (a[:, 2:].maximum(b[:, 2:]) - a[:, :2].minimum(b[:, :2])).clamp(min=0).prod(dim=1).clamp(min=1e-6)
    return 1 - (inter / union - (hull - union) / hull)
