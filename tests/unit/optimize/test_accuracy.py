"""Accuracy metrics and the budget check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kiln.errors import AccuracyBudgetError, AccuracyError
from kiln.optimize import OptimizeConfig
from kiln.optimize.accuracy import AccuracyFigures, check, choose_metric, cosine_rows, max_abs_error, measure, sqnr_db
from kiln.optimize.data import Samples
from kiln.spec import ModelSpec, TensorSpec


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
