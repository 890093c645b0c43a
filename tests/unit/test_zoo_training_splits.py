"""Every zoo model that kiln trains registers its optimizer split and its training split, and the
training split holds the training images only, as ``(inputs, labels)``."""

from __future__ import annotations

import numpy as np

from kiln.convert.factory import resolve
from kiln.optimize.data import ZOO_DATA, ZOO_TRAIN
from kiln.zoo import detector, digits


def test_each_trained_zoo_model_registers_both_splits() -> None:
    factories = [digits.FACTORY, *(size.factory for size in detector.SIZES.values())]
    for factory in factories:
        assert callable(resolve(factory)), factory
        assert callable(resolve(ZOO_DATA[factory])) and callable(resolve(ZOO_TRAIN[factory])), factory
    assert set(ZOO_TRAIN) <= set(ZOO_DATA)


def test_digits_training_split_is_the_training_images_with_their_labels() -> None:
    inputs, labels = digits.train_data()
    (calib, calib_labels), (val, _) = digits.optimize_data()
    x = inputs[digits.INPUT_NAME]
    assert x.shape[1:] == digits.INPUT_SHAPE[1:] and x.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(x, calib[digits.INPUT_NAME])
    np.testing.assert_array_equal(labels, calib_labels)
    assert len(x) + len(val[digits.INPUT_NAME]) == 1797
