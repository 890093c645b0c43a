"""Accuracy checks: a variant's outputs on validation data against the original model's.

Always the output drift (max abs error and SQNR in dB over every output), plus the task metric:
top-1 accuracy with labels (classification), top-1 agreement with the original without labels,
cosine similarity of embeddings, mAP@0.5 of the boxes that the spec's post-processing makes
(detection, with ground-truth boxes). A variant outside the budget raises
:class:`AccuracyBudgetError`, so callers decide what is fatal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kiln.errors import AccuracyBudgetError, DataError
from kiln.optimize.config import OptimizeConfig
from kiln.optimize.data import Samples
from kiln.spec import ModelSpec
from kiln.task_metrics import is_padded_boxes, map50, unpad_boxes

Outputs = dict[str, np.ndarray]
Detect = Callable[[Outputs], list[Any]]  # outputs -> per-image detections (the spec's post-processing)


def run_all(run: Callable[[Mapping[str, np.ndarray]], Outputs], samples: Samples, batch: int) -> Outputs:
    """Run every validation sample through ``run`` in batches and concatenate the outputs."""
    parts: dict[str, list[np.ndarray]] = {}
    for feed in samples.batches(batch):
        for name, arr in run(feed).items():
            parts.setdefault(name, []).append(arr)
    return {k: np.concatenate(v) for k, v in parts.items()}


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio: 10·log10(Σref² / Σ(ref−cand)²); inf when identical."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - candidate.astype(np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def max_abs_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    if reference.size == 0:
        return 0.0
    return float(np.max(np.abs(reference.astype(np.float64) - candidate.astype(np.float64))))


def cosine_rows(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity per sample (each sample's output flattened)."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = candidate.reshape(len(candidate), -1).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    return np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), np.where(np.all(a == b, axis=1), 1.0, 0.0))


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.reshape(len(logits), -1).argmax(axis=1) == labels.reshape(-1)))


@dataclass(frozen=True)
class AccuracyFigures:
    """What one variant scored. ``value`` is the budgeted metric (higher is better except max-abs)."""

    metric: str
    value: float
    reference_value: float
    max_abs_error: float
    sqnr_db: float
    cosine_mean: float
    samples: int
    top1: float | None = None
    agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def quality(self) -> float:
        """Higher is better, for the Pareto frontier."""
        return -self.value if self.metric == "max-abs" else self.value


def choose_metric(config: OptimizeConfig, spec: ModelSpec, samples: Samples) -> str:
    if config.metric == "map50" and not is_padded_boxes(samples.labels):
        got = "none" if samples.labels is None else f"shape {list(samples.labels.shape)}"
        raise DataError("labels", f"the map50 metric needs ground-truth boxes shaped [N, M, 5] (x1, y1, x2, y2, "
                                  f"class_id; class -1 pads), got {got}")  # fmt: skip
    if config.metric != "auto":
        return config.metric
    if spec.task == "classification":
        return "top1" if samples.labels is not None else "agreement"
    if spec.task == "embedding":
        return "cosine"
    if spec.task == "detection" and is_padded_boxes(samples.labels) and spec.postprocess:
        return "map50"
    return "sqnr"


def measure(
    metric: str,
    spec: ModelSpec,
    reference: Outputs,
    candidate: Outputs,
    labels: np.ndarray | None,
    detect: Detect | None = None,
) -> AccuracyFigures:
    """Compare ``candidate`` with ``reference`` outputs (same samples, same order). ``detect`` turns
    outputs into boxes for the map50 metric."""
    names = [t.name for t in spec.outputs if t.name in reference]
    floats = [n for n in names if reference[n].dtype.kind in "fc"]
    mae = max((max_abs_error(reference[n], candidate[n]) for n in floats), default=0.0)
    sqnr = min((sqnr_db(reference[n], candidate[n]) for n in floats), default=float("inf"))
    main = names[0]
    cos = float(np.mean(cosine_rows(reference[main], candidate[main]))) if main in floats else 1.0
    acc = ref_acc = agree = None
    if labels is not None and spec.task == "classification":
        acc, ref_acc = top1(candidate[main], labels), top1(reference[main], labels)
    if spec.task == "classification" or metric == "agreement":
        r = reference[main].reshape(len(reference[main]), -1).argmax(axis=1)
        agree = float(np.mean(candidate[main].reshape(len(r), -1).argmax(axis=1) == r))
    if metric == "top1":
        if acc is None or ref_acc is None:
            raise AccuracyBudgetError(main, "top1", float("nan"), 0.0, "needs labels and a classification model:")
        value, ref_value = acc, ref_acc
    elif metric == "agreement":
        value, ref_value = float(agree if agree is not None else 0.0), 1.0
    elif metric == "cosine":
        value, ref_value = cos, 1.0
    elif metric == "map50":
        if detect is None or labels is None or not is_padded_boxes(labels):
            raise AccuracyBudgetError(main, "map50", float("nan"), 0.0, "needs ground-truth boxes and post-processing:")
        truth = unpad_boxes(labels)
        value, ref_value = map50(detect(candidate), truth), map50(detect(reference), truth)
    elif metric == "sqnr":
        value, ref_value = sqnr, float("inf")
    else:
        value, ref_value = mae, 0.0
    return AccuracyFigures(metric, value, ref_value, mae, sqnr, cos, len(reference[main]), acc, agree)


def check(variant: str, figures: AccuracyFigures, config: OptimizeConfig) -> None:
    """Raise :class:`AccuracyBudgetError` when ``figures`` fall outside ``config``'s budget."""
    m, v = figures.metric, figures.value
    if m in ("top1", "map50") and figures.reference_value - v > config.max_drop + 1e-12:
        what = "top-1 drop" if m == "top1" else "mAP@0.5 drop"
        raise AccuracyBudgetError(variant, what, figures.reference_value - v, config.max_drop, "≤")
    if m in ("agreement", "cosine") and v < 1 - config.max_drop - 1e-12:
        raise AccuracyBudgetError(variant, "top-1 agreement" if m == "agreement" else "mean cosine", v,
                                  1 - config.max_drop, "≥")  # fmt: skip
    if m == "sqnr" and v < config.min_sqnr_db:
        raise AccuracyBudgetError(variant, "SQNR (dB)", v, config.min_sqnr_db, "≥")
    if config.max_abs_error is not None and figures.max_abs_error > config.max_abs_error:
        raise AccuracyBudgetError(variant, "max abs error", figures.max_abs_error, config.max_abs_error, "≤")
