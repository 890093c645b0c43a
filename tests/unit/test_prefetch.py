"""The overlapped runner: order, isolation of bad items, and real overlap of decode with the engine."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
import pytest

from kiln.processing import Pipeline
from kiln.processing.prefetch import predict_overlapped
from kiln.spec import ModelSpec

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
