"""The detector's synthetic data and untrained model: deterministic, in bounds, and decodable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kiln.processing.detection import anchor_points
from kiln.zoo import detector


def test_data_is_deterministic_and_boxes_lie_inside_the_image() -> None:
    a, b = detector.make_data(20, seed=3), detector.make_data(20, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    assert all(np.array_equal(x, y) for x, y in zip(a.boxes, b.boxes, strict=True))
    assert a.images.shape == (20, detector.IMAGE_SIZE, detector.IMAGE_SIZE, 3) and a.images.dtype == np.uint8
    boxes = np.concatenate(a.boxes)
    assert 20 <= len(boxes) <= 80  # 1-4 shapes per image
    assert (boxes[:, :4] >= 0).all() and (boxes[:, :4] <= detector.IMAGE_SIZE).all()
    sizes = boxes[:, 2] - boxes[:, 0]
    assert sizes.min() >= 12 and sizes.max() <= 28 and (boxes[:, 3] - boxes[:, 1] == sizes).all()
    assert set(boxes[:, 4].astype(int)) <= {0, 1, 2}
    assert not np.array_equal(detector.make_data(1, seed=4).images, a.images[:1])


def test_pngs_round_trip_with_their_ground_truth(tmp_path: Path) -> None:
    from PIL import Image

    data = detector.make_data(3, seed=5)
    paths = detector.write_pngs(data, tmp_path)
    truth = json.loads((tmp_path / "ground_truth.json").read_text())
    assert [p.name for p in paths] == ["000000.png", "000001.png", "000002.png"]
    for p, img, gt in zip(paths, data.images, data.ground_truth(), strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(p)), img)
        assert truth[p.name] == gt


def test_model_emits_one_row_per_anchor_point() -> None:
    model = detector.build_model().eval()
    x = torch.from_numpy(detector.to_input(detector.make_data(2, seed=6).images))
    with torch.inference_mode():
        out = model(x)
    n = len(anchor_points(detector.IMAGE_SIZE, detector.IMAGE_SIZE, detector.STRIDES)[0])
    assert n == 8 * 8 + 4 * 4
    assert out["scores"].shape == (2, n, len(detector.LABELS)) and out["boxes"].shape == (2, n, 4)
    assert (out["boxes"] >= 0).all()  # distances to the box sides
