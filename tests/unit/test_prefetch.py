"""The overlapped runner: order, isolation of bad items, real overlap of decode with the engine, and text
batched by length."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from kiln.processing import Pipeline
from kiln.processing.prefetch import predict_overlapped
from kiln.spec import ModelSpec
from tests.fixtures.processing import WORDS, word_tokenizer

SPEC = ModelSpec.model_validate({
    "name": "m",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 2]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}],
})  # fmt: skip
PIPE = Pipeline.from_spec(SPEC)


def double(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"y": feed["x"] * 2}


def load(i: int) -> np.ndarray:
    if i % 7 == 3:
        raise ValueError(f"item {i} is broken")
    if i % 7 == 5:
        return np.zeros(3, np.float32)  # the wrong shape: only this item fails, at collate
    return np.array([i, -i], np.float32)


@pytest.mark.parametrize(("batch_size", "workers", "prefetch"), [(1, 1, 0), (4, 2, 2), (5, 3, 1), (64, 2, 3)])
def test_results_come_in_order_and_bad_items_fail_alone(batch_size: int, workers: int, prefetch: int) -> None:
    results = list(predict_overlapped(range(30), load, PIPE, double, batch_size, workers, prefetch))
    assert [r.item for r in results] == list(range(30))
    for r in results:
        if r.item % 7 == 3:
            assert r.error == f"item {r.item} is broken"
        elif r.item % 7 == 5:
            assert (
                r.error
                == "collate: input 'x' instances must have shape [2] (the spec's shape without the batch dim), got [3]"
            )
        else:
            assert r.ok and r.output == {"y": [2.0 * r.item, -2.0 * r.item]}


def test_batches_never_exceed_the_batch_size() -> None:
    sizes: list[int] = []

    def run(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        sizes.append(len(feed["x"]))
        return double(feed)

    list(predict_overlapped(range(10), lambda i: np.array([i, i], np.float32), PIPE, run, batch_size=4))
    assert sizes == [4, 4, 2]


def test_next_batch_is_decoded_while_the_engine_runs() -> None:
    # The engine's first call waits until an item of the *second* batch has been loaded. Without
    # prefetching that never happens while the engine is busy, so the wait times out and the test fails.
    second_batch_loaded = threading.Event()
    overlapped: list[bool] = []

    def loader(i: int) -> np.ndarray:
        if i >= 2:
            second_batch_loaded.set()
        return np.array([i, i], np.float32)

    def run(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not overlapped:
            overlapped.append(second_batch_loaded.wait(timeout=20))
        return double(feed)

    results = list(predict_overlapped(range(4), loader, PIPE, run, batch_size=2, workers=2, prefetch=1))
    assert overlapped == [True]
    assert all(r.ok for r in results)


def test_without_prefetch_the_engine_waits_for_nothing_ahead() -> None:
    loaded_during_first_run: list[bool] = []
    second = threading.Event()

    def loader(i: int) -> np.ndarray:
        if i >= 2:
            second.set()
        return np.array([i, i], np.float32)

    def run(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not loaded_during_first_run:
            loaded_during_first_run.append(second.is_set())
        return double(feed)

    list(predict_overlapped(range(4), loader, PIPE, run, batch_size=2, workers=2, prefetch=0))
    assert loaded_during_first_run == [False]


def test_engine_errors_fail_the_batch_with_the_message() -> None:
    from kiln.errors import InputError

    def run(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise InputError("x", "dtype", "float32", "int8")

    results = list(predict_overlapped(range(3), lambda i: np.array([i, i], np.float32), PIPE, run, batch_size=2))
    assert [r.error for r in results] == ["input 'x': dtype must be float32, got int8"] * 3


def test_an_engine_failure_is_traced_to_the_instance_that_caused_it() -> None:
    """ONNX Runtime raises its own errors (an id past the vocabulary): the batch is run again one
    instance at a time, so the good instances keep their results and only the bad one fails."""

    def run(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feed["x"]
        if (x > 100).any():
            raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : indices element out of data bounds")
        return {"y": x * 2}

    values = [1.0, 500.0, 3.0, 4.0]
    results = list(predict_overlapped(values, lambda v: np.array([v, v], np.float32), PIPE, run, batch_size=4))
    assert [r.item for r in results] == values  # in order
    assert results[1].error is not None and "out of data bounds" in results[1].error
    assert [r.output for i, r in enumerate(results) if i != 1] == [
        {"y": [2.0, 2.0]},
        {"y": [6.0, 6.0]},
        {"y": [8.0, 8.0]},
    ]


def test_collation_runs_in_the_workers_not_on_the_engine_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A text model's tokenizer runs in collate: it must overlap the engine like decoding does."""
    pipe = Pipeline.from_spec(SPEC)
    threads: list[str] = []
    real = pipe.collate

    def collate(prepared: list) -> object:  # type: ignore[type-arg]
        threads.append(threading.current_thread().name)
        return real(prepared)

    monkeypatch.setattr(pipe, "collate", collate)

    def ok(i: int) -> np.ndarray:
        return np.array([i, -i], np.float32)

    results = list(predict_overlapped(range(12), ok, pipe, double, batch_size=4, workers=2, prefetch=1))
    assert all(r.ok for r in results) and len(threads) == 3
    assert all(name.startswith("kiln-prep") for name in threads), threads


# ---- text: batched by length, results in input order ----------------------------------------------------
@pytest.fixture
def text_pipe(tmp_path: Path) -> Pipeline:
    spec = ModelSpec.model_validate({
        "name": "t",
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [-1, -1]},
                   {"name": "attention_mask", "dtype": "int64", "shape": [-1, -1]}],
        "outputs": [{"name": "n", "dtype": "int64", "shape": [-1]}],
        "preprocess": [{"op": "tokenize", "args": {"tokenizer": "tokenizer.json", "max_length": 64}}],
    })  # fmt: skip
    word_tokenizer(tmp_path / "tokenizer.json")
    return Pipeline.from_spec(spec, root=tmp_path)


def sentence(n: int) -> str:
    return " ".join(WORDS[2 + i % 8] for i in range(n))  # n known words: n tokens


class CountTokens:
    """An engine that answers each row's token count, and records each batch's lengths and padding."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[int], int]] = []

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = feed["attention_mask"].sum(axis=1)
        self.batches.append((counts.tolist(), feed["input_ids"].shape[1]))
        return {"n": counts}


def test_text_is_batched_by_length_and_comes_back_in_input_order(text_pipe: Pipeline) -> None:
    lengths = np.random.default_rng(0).permutation(np.arange(1, 41)).tolist()
    engine = CountTokens()
    results = list(predict_overlapped(lengths, sentence, text_pipe, engine, batch_size=4, workers=2, prefetch=1))
    assert [r.item for r in results] == lengths
    assert [r.output for r in results] == [{"n": n} for n in lengths]  # each result is its own sentence's
    assert [sorted(rows) for rows, _ in engine.batches] == [list(range(k, k + 4)) for k in range(1, 41, 4)]
    for rows, padded in engine.batches:
        assert max(rows) <= padded <= 1.25 * max(rows)
    assert sum(len(rows) * padded for rows, padded in engine.batches) <= 1.2 * sum(lengths)


def test_text_is_sorted_only_within_a_bounded_window(text_pipe: Pipeline) -> None:
    lengths = np.random.default_rng(1).permutation(np.arange(1, 25)).tolist()
    engine = CountTokens()
    results = list(predict_overlapped(lengths, sentence, text_pipe, engine, batch_size=2, sort_window=3))
    assert [r.output for r in results] == [{"n": n} for n in lengths]
    place = {n: i for i, n in enumerate(lengths)}
    windows = [{place[n] // 6 for n in rows} for rows, _ in engine.batches]
    assert all(len(w) == 1 for w in windows)  # a batch never mixes two windows of 3 batches
    assert [w.pop() for w in windows] == [k for k in range(4) for _ in range(3)]  # and windows go in order
    for k in range(4):
        window = [row for rows, _ in engine.batches[3 * k : 3 * k + 3] for row in rows]
        assert window == sorted(lengths[6 * k : 6 * k + 6])


def test_bad_text_fails_alone_when_sorted(text_pipe: Pipeline) -> None:
    values: list[object] = [sentence(5), 7, sentence(1), "pots \ud800", sentence(3), sentence(9)]
    results = list(predict_overlapped(values, lambda v: v, text_pipe, CountTokens(), batch_size=2))
    assert [r.item for r in results] == values
    assert results[1].error == "tokenize: expected a string, got int"
    assert results[3].error is not None and results[3].error.startswith("tokenize: not valid Unicode text")
    assert [r.output for i, r in enumerate(results) if i not in (1, 3)] == [{"n": 5}, {"n": 1}, {"n": 3}, {"n": 9}]


def test_the_next_window_is_prepared_while_the_engine_runs(text_pipe: Pipeline) -> None:
    next_window_loaded = threading.Event()
    overlapped: list[bool] = []

    def loader(i: int) -> str:
        if i >= 4:
            next_window_loaded.set()
        return sentence(i + 1)

    def run(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not overlapped:
            overlapped.append(next_window_loaded.wait(timeout=20))
        return {"n": feed["attention_mask"].sum(axis=1)}

    results = list(predict_overlapped(range(8), loader, text_pipe, run, batch_size=2, prefetch=1, sort_window=2))
    assert overlapped == [True]
    assert [r.output for r in results] == [{"n": i + 1} for i in range(8)]
