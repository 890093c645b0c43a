"""Box losses and target assignment for training the zoo's detector (torch tensors, xyxy boxes)."""

from __future__ import annotations

from typing import Any

import numpy as np


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


def flip_boxes(g: np.ndarray, width: int) -> np.ndarray:
    """Padded boxes ``[B, M, 5]`` of images mirrored left to right."""
    g = g.copy()
    x1 = width - g[..., 2]
    g[..., 2] = width - g[..., 0]
    g[..., 0] = x1
    return g


def assign(gt: Any, pts: Any, strides: Any, center_radius: float) -> tuple[Any, Any]:
    """Anchor points inside a box and within ``center_radius`` strides of its centre are positives; the
    smallest box wins a point claimed by several. ``gt [B, M, 5]`` -> matched box per point ``[B, N, 5]``
    and the positive mask ``[B, N]``."""
    import torch

    x, y = pts[None, :, 0:1], pts[None, :, 1:2]  # [1, N, 1]
    x1, y1, x2, y2, cls = (gt[:, None, :, i] for i in range(5))  # [B, 1, M]
    inside = (x > x1) & (x < x2) & (y > y1) & (y < y2) & (cls >= 0)
    r = center_radius * strides[None, :, None]
    near = ((x - (x1 + x2) / 2).abs() < r) & ((y - (y1 + y2) / 2).abs() < r)
    ok = inside & near  # [B, N, M]
    area = torch.where(ok, ((x2 - x1) * (y2 - y1)).expand_as(ok), torch.full_like(ok, float("inf"), dtype=gt.dtype))
    best = area.argmin(dim=2)  # [B, N]
    matched = torch.gather(gt, 1, best[..., None].expand(-1, -1, 5))
    return matched, ok.any(dim=2)


def detection_loss(scores: Any, dists: Any, gts: np.ndarray, pts: Any, strides: Any, center_radius: float) -> Any:
    """Quality Focal Loss on IoU-valued class targets plus GIoU loss on the positive points."""
    import torch
    from torch.nn import functional as F

    matched, pos = assign(torch.from_numpy(gts), pts, strides, center_radius)
    d = dists * strides[None, :, None]
    pred = torch.cat([pts[None] - d[..., :2], pts[None] + d[..., 2:]], dim=-1)
    pb, gb = pred[pos], matched[pos]
    num_pos = max(int(pos.sum()), 1)
    targets = torch.zeros_like(scores)
    if len(pb):
        quality = iou(pb.detach(), gb[:, :4]).clamp(min=0.01)
        b_idx, n_idx = pos.nonzero(as_tuple=True)
        targets[b_idx, n_idx, gb[:, 4].long()] = quality
        box = giou_loss(pb, gb[:, :4]).sum() / num_pos
    else:
        box = scores.sum() * 0
    p = scores.sigmoid()
    qfl = F.binary_cross_entropy_with_logits(scores, targets, reduction="none") * (p - targets).abs().pow(2)
    return qfl.sum() / num_pos + 2.0 * box
