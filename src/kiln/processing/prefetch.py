"""Keep the engine busy: load and pre-process the next batches in worker threads while the engine runs
the current one, and post-process finished batches there too.

The engine runs on the calling thread (ONNX Runtime and PyTorch release the GIL while they compute);
instance loading and decoding (Pillow releases the GIL while it inflates a PNG) and collation (where a
text model's tokenizer runs) happen in a thread pool, up to ``prefetch`` batches ahead. A bad instance
fails alone: its result carries the error and the rest of its batch goes on.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from kiln.errors import ProcessingError, first_line
from kiln.processing.pipeline import Pipeline, Prepared
from kiln.processing.registry import Batch

T = TypeVar("T")
RunFn = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass
class Result(Generic[T]):
    """What became of one item: ``output`` (JSON-able) or ``error`` (a one-line reason)."""

    item: T
    output: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def one_line(exc: BaseException) -> str:
    """The reason, without the in-batch instance index (the result names its item already)."""
    if isinstance(exc, ProcessingError):
        return f"{exc.op}: {exc.reason}"
    return first_line(exc)


@dataclass
class _Collated(Generic[T]):
    """A chunk ready for the engine: a result per item (failed ones already say why), and the batch of
    the good ones (None when none is left)."""

    results: list[Result[T]]
    good: list[int]
    prepared: list[Prepared]
    batch: Batch | None


def predict_overlapped(
    items: Iterable[T],
    load: Callable[[T], Any],
    pipeline: Pipeline,
    run: RunFn,
    batch_size: int = 32,
    workers: int = 2,
    prefetch: int = 2,
) -> Iterator[Result[T]]:
    """Yield one :class:`Result` per item, in order.

    ``load(item)`` reads a raw instance (file bytes, a sentence, an array) in a worker thread; the
    pipeline's per-instance steps follow it there; ``run`` (the engine) gets each collated batch on
    this thread; post-processing goes back to the workers.
    """
    if batch_size < 1 or workers < 1 or prefetch < 0:
        raise ValueError("batch_size and workers must be at least 1 and prefetch at least 0")
    source = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kiln-prep") as pool:

        def prepare(item: T, index: int) -> Prepared:
            return pipeline.preprocess_instance(load(item), index)

        def submit_next() -> Future[_Collated[T]] | None:
            chunk = list(itertools.islice(source, batch_size))
            if not chunk:
                return None
            futures = [pool.submit(prepare, item, i) for i, item in enumerate(chunk)]
            # Queued after its own instances (the pool is first in, first out), so it only ever waits on
            # work already running: no deadlock, whatever the number of workers.
            return pool.submit(collate, chunk, futures, pipeline)

        pending: collections.deque[Future[_Collated[T]]] = collections.deque()
        posts: collections.deque[Future[list[Result[T]]]] = collections.deque()
        exhausted = False
        while True:
            while not exhausted and len(pending) <= prefetch:
                chunk = submit_next()
                if chunk is None:
                    exhausted = True
                else:
                    pending.append(chunk)
            if not pending:
                break
            current = pending.popleft()
            posts.append(run_collated(current.result(), pipeline, run, pool))
            while posts and (posts[0].done() or len(posts) > prefetch + 1):
                yield from posts.popleft().result()
        while posts:
            yield from posts.popleft().result()


def _run_one_by_one(
    results: list[Result[T]], good: list[int], prepared: list[Prepared], pipeline: Pipeline, run: RunFn
) -> None:
    for i, p in zip(good, prepared, strict=True):
        try:
            single = pipeline.collate([p])
            results[i].output = pipeline.postprocess(run(single.inputs), single)[0]
        except Exception as exc:
            results[i].error = one_line(exc)


def collate(items: list[T], futures: list[Future[Prepared]], pipeline: Pipeline) -> _Collated[T]:
    """Collate a chunk's good instances (in a worker); an instance that does not fit is dropped alone."""
    results: list[Result[T]] = [Result(item) for item in items]
    good: list[int] = []
    prepared: list[Prepared] = []
    for i, fut in enumerate(futures):
        try:
            prepared.append(fut.result())
            good.append(i)
        except Exception as exc:  # a bad file, an undecodable image: this item only
            results[i].error = one_line(exc)
    batch = None
    while good:
        try:
            batch = pipeline.collate(prepared)
            break
        except ProcessingError as exc:
            if exc.index is None or not 0 <= exc.index < len(good):
                for i in good:
                    results[i].error = one_line(exc)
                good = []
                break
            results[good[exc.index]].error = one_line(exc)  # drop the instance that does not fit, retry
            del good[exc.index], prepared[exc.index]
        except Exception as exc:  # a library failing on the batch: its instances fail, the run goes on
            for i in good:
                results[i].error = one_line(exc)
            good = []
    return _Collated(results, good, prepared, batch if good else None)


def run_collated(c: _Collated[T], pipeline: Pipeline, run: RunFn, pool: ThreadPoolExecutor) -> Future[list[Result[T]]]:
    """Run the engine here on a collated chunk, and post-process it in the pool."""
    results, good, prepared, batch = c.results, c.good, c.prepared, c.batch
    if batch is None:
        done: Future[list[Result[T]]] = Future()
        done.set_result(results)
        return done
    try:
        outputs = run(batch.inputs)
    except Exception as exc:  # the engine's own errors too (an id past the vocabulary, a NaN check …)
        if len(good) == 1:
            results[good[0]].error = one_line(exc)
        else:  # find the instance at fault: one at a time, so a bad one costs only itself
            _run_one_by_one(results, good, prepared, pipeline, run)
        done = Future()
        done.set_result(results)
        return done

    def post() -> list[Result[T]]:
        try:
            values = pipeline.postprocess(outputs, batch)
        except Exception as exc:
            for i in good:
                results[i].error = one_line(exc)
            return results
        for i, value in zip(good, values, strict=True):
            results[i].output = value
        return results

    return pool.submit(post)
