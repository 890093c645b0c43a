"""mAP@0.5 on hand-made detections with known answers."""

from __future__ import annotations

import pytest

from kiln.task_metrics import average_precision, box_iou, map50

GT = [[{"box": [0, 0, 10, 10], "class_id": 0}, {"box": [20, 20, 30, 30], "class_id": 1}]]


def det(box: list[float], score: float, cls: int) -> dict[str, object]:
    return {"box": box, "score": score, "class_id": cls}


def test_perfect_detections_score_one() -> None:
    preds = [[det([0, 0, 10, 10], 0.9, 0), det([20, 20, 30, 30], 0.8, 1)]]
    assert map50(preds, GT) == 1.0


def test_rows_and_dicts_are_the_same_input() -> None:
    rows_pred = [[[0, 0, 10, 10, 0.9, 0], [21, 21, 31, 31, 0.8, 1]]]
    rows_gt = [[[0, 0, 10, 10, 0], [20, 20, 30, 30, 1]]]
    assert map50(rows_pred, rows_gt) == 1.0  # IoU 81/119 = 0.68 >= 0.5


@pytest.mark.parametrize(
    ("preds", "want"),
    [
        ([], 0.0),  # nothing found
        ([det([0, 0, 10, 10], 0.9, 1), det([20, 20, 30, 30], 0.8, 0)], 0.0),  # right places, wrong classes
        ([det([0, 0, 10, 10], 0.9, 0)], 0.5),  # class 0 AP 1, class 1 AP 0
        # class 0: a false positive ranked above the hit -> precision 1/2 at recall 1 -> AP 0.5
        ([det([50, 50, 60, 60], 0.95, 0), det([0, 0, 10, 10], 0.9, 0), det([20, 20, 30, 30], 0.8, 1)], 0.75),
        # a duplicate of a matched box counts as a false positive, but after the hit it costs nothing
        ([det([0, 0, 10, 10], 0.9, 0), det([0, 0, 10, 10], 0.5, 0), det([20, 20, 30, 30], 0.8, 1)], 1.0),
        ([det([5, 5, 15, 15], 0.9, 0), det([20, 20, 30, 30], 0.8, 1)], 0.5),  # IoU 25/175 < 0.5
    ],
)
def test_known_values(preds: list[dict[str, object]], want: float) -> None:
    assert map50([preds], GT) == pytest.approx(want)


def test_iou_and_ap_helpers() -> None:
    assert box_iou([[0, 0, 2, 2]], [[1, 1, 3, 3], [4, 4, 5, 5]]).tolist() == [[1 / 7, 0.0]]
    assert average_precision([0.5, 1.0], [1.0, 0.5]) == pytest.approx(0.75)


def test_mismatched_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match="2 images of predictions but 1"):
        map50([[], []], GT)
    with pytest.raises(ValueError, match="holds no boxes"):
        map50([[]], [[]])
