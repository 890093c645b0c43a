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


def test_each_size_names_its_widths_in_its_recipe() -> None:
    """The recipe is the cache key: widths that changed without it would load stale weights."""
    for size in detector.SIZES.values():
        widths = "-".join(map(str, size.widths))
        assert size.recipe["arch"].startswith(f"csp{widths}/pan{size.neck}"), size.name
    assert detector.recipe_key("small") != detector.recipe_key("large")
    assert detector.weights_path(size="small") != detector.weights_path(size="large")


def test_large_model_emits_one_row_per_anchor_point_at_256_px() -> None:
    large = detector.LARGE
    assert large.factory == "kiln.zoo.detector:build_large_model" and large.input_shape == (1, 3, 256, 256)
    assert large.preprocess[1]["args"]["size"] == [256, 256]
    model = detector.build_large_model().eval()
    small_params = sum(p.numel() for p in detector.build_model().parameters())
    assert sum(p.numel() for p in model.parameters()) > 3 * small_params
    x = torch.from_numpy(detector.to_input(detector.make_data(2, seed=6, size="large").images))
    assert x.shape == (2, 3, 256, 256)
    with torch.inference_mode():
        out = model(x)
    n = len(anchor_points(256, 256, detector.STRIDES)[0])
    assert n == 32 * 32 + 16 * 16
    assert out["scores"].shape == (2, n, len(detector.LABELS)) and out["boxes"].shape == (2, n, 4)


def test_large_data_holds_more_and_larger_shapes_and_trains_on_smaller_images() -> None:
    data = detector.make_data(10, seed=3, size="large")
    assert data.images.shape == (10, 256, 256, 3)
    lo, hi = detector.LARGE.recipe["shapes"]
    assert all(len(b) <= hi for b in data.boxes) and np.mean([len(b) for b in data.boxes]) >= lo
    boxes = np.concatenate(data.boxes)
    sizes = boxes[:, 2] - boxes[:, 0]
    assert sizes.min() >= 16 and sizes.max() <= 40 and (boxes[:, :4] <= 256).all()
    train = detector.training_images("large", n=4)
    assert train.images.shape == (4, 128, 128, 3)


def test_training_and_optimize_splits_are_inputs_and_padded_boxes() -> None:
    inputs, labels = detector.large_train_data(images=6)
    assert inputs[detector.INPUT_NAME].shape == (6, 3, 256, 256) and inputs[detector.INPUT_NAME].dtype == np.float32
    assert labels.ndim == 3 and labels.shape[0] == 6 and labels.shape[2] == 5
    (calib_x, calib_y), (val_x, val_y) = detector.large_optimize_data(calibration_images=4)
    assert calib_x[detector.INPUT_NAME].shape == (4, 3, 256, 256) and len(calib_y) == 4
    assert val_x[detector.INPUT_NAME].shape == (detector.LARGE.recipe["val_images"], 3, 256, 256)
    assert len(val_y) == len(val_x[detector.INPUT_NAME])
    # The small split is the training set itself, unchanged (1-4 shapes per 64 px image).
    inputs, labels = detector.train_data()
    assert inputs[detector.INPUT_NAME].shape == (detector.RECIPE["train_images"], 3, 64, 64)
    assert labels.shape[1] <= 4


def test_a_short_large_schedule_trains_caches_under_its_own_key_and_loads(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    short = {"train_images": 64, "val_images": 4, "epochs": 1, "batch_size": 16}
    epochs: list[tuple[int, int]] = []
    first = detector.train(tmp_path, size="large", overrides=short, progress=lambda e, n: epochs.append((e, n)))
    assert not first.cached and epochs == [(1, 1)] and 0.0 <= first.val_map50 <= 1.0
    assert first.weights != detector.weights_path(tmp_path, size="large")  # never the recipe's own weights
    again = detector.train(tmp_path, size="large", overrides=short)
    assert again.cached and again.weights == first.weights
    detector.build_large_model().load_state_dict(load_file(str(first.weights)))
