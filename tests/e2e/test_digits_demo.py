"""The built-in example end to end: training, import, both engines, the demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.bench.report import pareto_points
from kiln.demo import MIN_ACCURACY, run_demo
from kiln.zoo import digits

pytestmark = pytest.mark.slow


def test_training_reaches_the_target_and_is_cached(digits_trained: digits.TrainedDigits) -> None:
    assert digits_trained.val_accuracy >= 0.97
    assert digits_trained.weights.suffix == ".safetensors"
    again = digits.train()
    assert again.cached and again.weights == digits_trained.weights
    assert again.val_accuracy == pytest.approx(digits_trained.val_accuracy, abs=1e-6)


def test_split_is_fixed() -> None:
    a, b = digits.load_data(), digits.load_data()
    np.testing.assert_array_equal(a.y_val, b.y_val)
    assert len(a.y_val) == 360 and a.x_val.shape[1:] == (1, 8, 8)


def test_both_engines_agree_on_the_validation_set(digits_trained: digits.TrainedDigits, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    kiln.import_model(digits.FACTORY, repo, name="digits", weights=digits_trained.weights,
                      input_shapes=[digits.INPUT_SHAPE], task="classification")  # fmt: skip
    data = digits.load_data()
    ort_logits = kiln.load(repo, "digits", engine="onnxruntime").predict(data.x_val)["output"]
    torch_logits = kiln.load(repo, "digits", engine="torch").predict(data.x_val)["output"]
    np.testing.assert_allclose(ort_logits, torch_logits, rtol=1e-3, atol=1e-4)
    assert digits.accuracy(ort_logits, data.y_val) == pytest.approx(digits_trained.val_accuracy, abs=1e-6)


def test_demo_runs_end_to_end(digits_trained: digits.TrainedDigits, tmp_path: Path) -> None:
    demo = run_demo(tmp_path / "demo")
    engines = {(r.engine, r.precision) for r in demo.engines}
    assert {("onnxruntime", "fp32"), ("torch", "fp32")} <= engines
    assert all(r.accuracy >= MIN_ACCURACY for r in demo.engines)
    assert all(r.p50_ms > 0 for r in demo.engines)
    demo_repo = tmp_path / "demo" / "repo"
    # The server answered what the chosen variant answers in process, over both protocols.
    assert demo.chosen is not None and kiln.Repository(demo_repo).spec("digits").chosen_variant == demo.chosen
    x = digits.load_data().x_val[:4]
    with kiln.load(demo_repo, "digits") as predictor:
        want = predictor.predict(x)["logits"].argmax(axis=1).tolist()
    for protocol in ("http", "grpc"):
        assert [p for proto, p, _ in demo.served if proto == protocol] == want
    assert demo.report.is_file() and demo.report.stat().st_size > 10_000
    # The optimizer's search feeds the report's accuracy-vs-latency plot, its choice marked once.
    points = pareto_points(demo_repo, "digits", 1)
    assert len(points) >= 3
    assert sum(p["chosen"] for p in points) == 1
    assert any(p["frontier"] for p in points)
    assert (tmp_path / "demo" / "report_plots" / "accuracy_pareto.png").is_file()
    # A second run reuses the trained weights and the imported version.
    run_demo(tmp_path / "demo")
    assert kiln.Repository(tmp_path / "demo" / "repo").versions("digits") == [1]
