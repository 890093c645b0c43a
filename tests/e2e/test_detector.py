"""The shapes detector end to end: trained offline by kiln, imported with its processing steps, and
run by `kiln predict` over PNG files, whose boxes must reach mAP@0.5 >= 0.8."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kiln
from kiln.metrics import map50
from kiln.zoo import detector
from tests.integration.test_cli import run


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the session fixture trains the detector first: minutes on 2 shared cores
def test_detector_reaches_map50_through_kiln_predict(
    detector_trained: detector.TrainedDetector, repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert detector_trained.val_map50 >= 0.8, detector_trained
    result = kiln.import_model(
        detector.FACTORY, repo, name="shapes", weights=detector_trained.weights, input_shapes=[detector.INPUT_SHAPE],
        task="detection", labels=detector.LABELS, preprocess=detector.PREPROCESS, postprocess=detector.POSTPROCESS,
    )  # fmt: skip
    assert [t.name for t in result.spec.outputs] == ["scores", "boxes"]
    assert [s.op for s in result.spec.postprocess] == ["yolo_decode", "score_threshold", "nms", "scale_boxes"]

    images = tmp_path / "images"
    detector.write_pngs(detector.make_data(200, seed=2024), images)  # images training never saw
    out = tmp_path / "boxes.jsonl"
    code, _, err = run(["predict", "shapes", str(images), "--repo", str(repo), "-o", str(out)], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    truth = json.loads((images / "ground_truth.json").read_text())
    assert [Path(r["input"]).name for r in records] == sorted(truth)
    assert all(set(d) == {"box", "score", "class_id", "label"} for r in records for d in r["output"])
    score = map50([r["output"] for r in records], [truth[Path(r["input"]).name] for r in records])
    assert score >= 0.8, score
