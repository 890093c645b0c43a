"""Accuracy metrics and the budget check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kiln.errors import AccuracyBudgetError, AccuracyError, DataError
from kiln.optimize.accuracy import AccuracyFigures, check, choose_metric, cosine_rows, max_abs_error, measure, sqnr_db
from kiln.optimize.config import OptimizeConfig
from kiln.optimize.data import Samples
from kiln.spec import ModelSpec, ProcessingStep, TensorSpec
from kiln.task_metrics import pad_boxes, unpad_boxes


def _spec(task: str) -> ModelSpec:
    return ModelSpec(name="m", task=task, inputs=[TensorSpec(name="x", dtype="float32", shape=(-1, 4))],  # type: ignore[arg-type]
                     outputs=[TensorSpec(name="y", dtype="float32", shape=(-1, 3))])  # fmt: skip


def test_sqnr_matches_its_definition() -> None:
    ref = np.array([3.0, 4.0])
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(ref, ref + np.array([0.3, 0.4])) == pytest.approx(20.0)  # noise power 1 % of signal
    assert max_abs_error(ref, ref + np.array([0.3, -0.5])) == pytest.approx(0.5)


def test_cosine_per_row() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [1.0, -1.0], [0.0, 0.0]])
    np.testing.assert_allclose(cosine_rows(a, b), [1.0, 0.0, 1.0])


def test_measure_top1_drop_against_reference() -> None:
    ref = np.array([[3.0, 1, 0], [0, 2, 1], [0, 0, 1], [1, 0, 0]], dtype=np.float32)
    cand = ref.copy()
    cand[1] = [5, 0, 0]  # one flipped prediction
    labels = np.array([0, 1, 2, 0])
    fig = measure("top1", _spec("classification"), {"y": ref}, {"y": cand}, labels)
    assert (fig.reference_value, fig.value, fig.agreement) == (1.0, 0.75, 0.75)
    with pytest.raises(AccuracyBudgetError, match="top-1 drop") as info:
        check("v", fig, OptimizeConfig(max_drop=0.2))
    assert isinstance(info.value, AccuracyError) and info.value.value == pytest.approx(0.25)
    check("v", fig, OptimizeConfig(max_drop=0.25))


@pytest.mark.parametrize(
    ("metric", "config", "fails"),
    [
        ("cosine", {"max_drop": 0.01}, True),
        ("cosine", {"max_drop": 0.5}, False),
        ("sqnr", {"min_sqnr_db": 30}, True),
        ("sqnr", {"min_sqnr_db": 5}, False),
        ("max-abs", {"max_abs_error": 0.1}, True),
        ("max-abs", {"max_abs_error": 2.0}, False),
    ],
)
def test_budget_per_metric(metric: str, config: dict[str, float], fails: bool) -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((32, 3)).astype(np.float32)
    cand = ref + rng.normal(0, 0.3, ref.shape).astype(np.float32)
    fig = measure(metric, _spec("embedding"), {"y": ref}, {"y": cand}, None)
    cfg = OptimizeConfig(metric=metric, **config)  # type: ignore[arg-type]
    if fails:
        with pytest.raises(AccuracyBudgetError):
            check("v", fig, cfg)
    else:
        check("v", fig, cfg)


def test_metric_follows_task_and_labels() -> None:
    with_labels = Samples({"x": np.zeros((2, 4), np.float32)}, np.array([0, 1]))
    without = Samples({"x": np.zeros((2, 4), np.float32)})
    auto = OptimizeConfig()
    assert choose_metric(auto, _spec("classification"), with_labels) == "top1"
    assert choose_metric(auto, _spec("classification"), without) == "agreement"
    assert choose_metric(auto, _spec("embedding"), without) == "cosine"
    assert choose_metric(auto, _spec("generic"), without) == "sqnr"
    assert choose_metric(OptimizeConfig(metric="sqnr"), _spec("classification"), with_labels) == "sqnr"


def test_quality_is_higher_is_better_for_every_metric() -> None:
    base = {"reference_value": 0.0, "max_abs_error": 0.0, "sqnr_db": 0.0, "cosine_mean": 1.0, "samples": 1}
    assert AccuracyFigures("max-abs", 0.1, **base).quality > AccuracyFigures("max-abs", 0.2, **base).quality
    assert AccuracyFigures("top1", 0.9, **base).quality > AccuracyFigures("top1", 0.8, **base).quality


def _detection_spec() -> ModelSpec:
    return ModelSpec(name="d", task="detection", inputs=[TensorSpec(name="x", dtype="float32", shape=(-1, 4))],
                     outputs=[TensorSpec(name="boxes", dtype="float32", shape=(-1, 2, 6))],
                     postprocess=[ProcessingStep(op="nms")])  # fmt: skip


def _rows_as_detections(outputs: dict[str, np.ndarray]) -> list[list[list[float]]]:
    """A stand-in for the spec's post-processing: each image's rows [x1, y1, x2, y2, score, class]."""
    return [[list(r) for r in img if r[4] > 0] for img in outputs["boxes"]]


GT = [np.array([[0, 0, 10, 10, 0]]), np.array([[20, 20, 30, 30, 1], [0, 0, 5, 5, 0]])]


def test_padded_boxes_round_trip() -> None:
    labels = pad_boxes(GT)
    assert labels.shape == (2, 2, 5) and labels[0, 1, 4] == -1
    back = unpad_boxes(labels)
    assert [b.tolist() for b in back] == [g.tolist() for g in GT]


def test_map50_drop_is_measured_on_the_spec_post_processing_and_budgeted() -> None:
    perfect = np.array([[[0, 0, 10, 10, 0.9, 0], [0, 0, 0, 0, 0, 0]],
                        [[20, 20, 30, 30, 0.8, 1], [0, 0, 5, 5, 0.7, 0]]], dtype=np.float32)  # fmt: skip
    missed = perfect.copy()
    missed[1, 0] = [50, 50, 60, 60, 0.8, 1]  # the class-1 box is now in the wrong place
    labels = pad_boxes(GT)
    fig = measure("map50", _detection_spec(), {"boxes": perfect}, {"boxes": missed}, labels, _rows_as_detections)
    assert fig.reference_value == 1.0 and fig.value == pytest.approx(0.5)  # class 0 AP 1, class 1 AP 0
    with pytest.raises(AccuracyBudgetError, match=r"mAP@0\.5 drop"):
        check("v", fig, OptimizeConfig(max_drop=0.02))
    check("v", fig, OptimizeConfig(max_drop=0.5))
    same = measure("map50", _detection_spec(), {"boxes": perfect}, {"boxes": perfect}, labels, _rows_as_detections)
    check("v", same, OptimizeConfig(max_drop=0.0))


def test_detection_with_boxes_budgets_map50_and_asking_without_boxes_is_a_data_error() -> None:
    x = np.zeros((2, 4), np.float32)
    assert choose_metric(OptimizeConfig(), _detection_spec(), Samples({"x": x}, pad_boxes(GT))) == "map50"
    assert choose_metric(OptimizeConfig(), _detection_spec(), Samples({"x": x})) == "sqnr"
    with pytest.raises(DataError, match=r"map50 metric needs ground-truth boxes shaped \[N, M, 5\]"):
        choose_metric(OptimizeConfig(metric="map50"), _detection_spec(), Samples({"x": x}, np.array([0, 1])))
