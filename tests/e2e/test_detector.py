"""The shapes detector end to end: trained offline by kiln, imported with its processing steps, and
run by `kiln predict` over PNG files, whose boxes must reach mAP@0.5 >= 0.8; then `kiln optimize`
with an mAP budget picks a faster variant, and `kiln predict` through it still reaches 0.8."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kiln
from kiln.task_metrics import map50
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

    # The optimizer holds mAP@0.5 on the zoo's validation split to a 0.02 drop and picks a faster variant.
    code, out, err = run(["optimize", "shapes", "--repo", str(repo), "--max-drop", "0.02", "--preset", "quick",
                          "--json"], capsys)  # fmt: skip
    assert code == 0, err
    search = json.loads(out)
    assert search["metric"] == "map50" and search["budget"] == "mAP@0.5 drop ≤ 0.02"
    chosen = next(v for v in search["variants"] if v["status"] == "chosen")
    acc = chosen["accuracy"]
    assert acc["reference_value"] >= 0.8 and acc["reference_value"] - acc["value"] <= 0.02, acc
    assert chosen["speedup"] > 1.0 and chosen["recipe"] != {"engine": "torch"}, chosen
    dropped = [v for v in search["variants"] if v["status"] == "rejected" and "out of budget" in v["reason"]]
    assert all("mAP@0.5 drop" in v["reason"] for v in dropped)

    again = tmp_path / "boxes-optimized.jsonl"
    code, _, err = run(["predict", "shapes", str(images), "--repo", str(repo), "-o", str(again)], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in again.read_text().splitlines()]
    score = map50([r["output"] for r in records], [truth[Path(r["input"]).name] for r in records])
    assert score >= 0.8, score
