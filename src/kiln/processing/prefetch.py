"""Keep the engine busy: load and pre-process the next batches in worker threads while the engine runs
the current one, and post-process finished batches there too.

The engine runs on the calling thread (ONNX Runtime and PyTorch release the GIL while they compute);
instance loading and decoding (Pillow releases the GIL while it inflates a PNG) and collation (where a
text model's tokenizer runs) happen in a thread pool, up to ``prefetch`` batches ahead. A bad instance
fails alone: its result carries the error and the rest of its batch goes on. Text is batched by length
within a bounded window (a batch is padded to its longest sentence), and results come in input order.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
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


SORT_WINDOW = 16
"""How many batches of text are sorted by length together: enough to find similar lengths, few enough
that memory stays bounded and results keep streaming."""


@dataclass
class _Chunk(Generic[T]):
    """Up to a batch of items on their way: their places in the input, and their ``prepare`` futures."""

    places: list[int]
    items: list[T]
    futures: list[Future[Prepared]]


@dataclass
class _Window(Generic[T]):
    """Items of several batches being prepared, and each one's length once prepared (the sort key)."""

    start: int
    items: list[T] = field(default_factory=list)
    futures: list[Future[Prepared]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


class _InOrder(Generic[T]):
    """Results that may finish out of order, given back in input order as soon as they can be."""

    def __init__(self) -> None:
        self.waiting: dict[int, Result[T]] = {}
        self.next = 0

    def add(self, places: list[int], results: list[Result[T]]) -> Iterator[Result[T]]:
        self.waiting.update(zip(places, results, strict=True))
        while self.next in self.waiting:
            yield self.waiting.pop(self.next)
            self.next += 1


def predict_overlapped(
    items: Iterable[T],
    load: Callable[[T], Any],
    pipeline: Pipeline,
    run: RunFn,
    batch_size: int = 32,
    workers: int = 2,
    prefetch: int = 2,
    sort_window: int = SORT_WINDOW,
) -> Iterator[Result[T]]:
    """Yield one :class:`Result` per item, in order.

    ``load(item)`` reads a raw instance (file bytes, a sentence, an array) in a worker thread; the
    pipeline's per-instance steps follow it there; ``run`` (the engine) gets each collated batch on
    this thread; post-processing goes back to the workers.

    When the pipeline pads a batch to its longest instance (:attr:`Pipeline.sorts_by_length`: text),
    the items of each ``sort_window`` batches are batched by length (a sentence's token count), so that
    a batch holds sentences of similar length and pads little; results still come in input order.
    """
    if batch_size < 1 or workers < 1 or prefetch < 0 or sort_window < 1:
        raise ValueError("batch_size, workers and sort_window must be at least 1 and prefetch at least 0")
    source = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kiln-prep") as pool:

        def prepare(item: T, index: int) -> Prepared:
            return pipeline.preprocess_instance(load(item), index)

        def prepare_sized(item: T, index: int, lengths: list[int]) -> Prepared:
            prepared = prepare(item, index)
            lengths[index] = pipeline.length(prepared.value)  # its own slot: no lock needed
            return prepared

        def in_order() -> Iterator[_Chunk[T]]:
            start = 0
            while chunk := list(itertools.islice(source, batch_size)):
                futures = [pool.submit(prepare, item, i) for i, item in enumerate(chunk)]
                yield _Chunk(list(range(start, start + len(chunk))), chunk, futures)
                start += len(chunk)

        def extend(window: _Window[T], n: int) -> None:
            for item in itertools.islice(source, n):
                window.lengths.append(0)  # a failed instance keeps 0: collation reports it
                window.futures.append(pool.submit(prepare_sized, item, len(window.items), window.lengths))
                window.items.append(item)

        def by_length() -> Iterator[_Chunk[T]]:
            size = batch_size * sort_window
            current: _Window[T] = _Window(0)
            extend(current, size)
            while current.items:
                following: _Window[T] = _Window(current.start + len(current.items))
                wait(current.futures)
                order = sorted(range(len(current.items)), key=current.lengths.__getitem__)
                for at in range(0, len(order), batch_size):
                    # The next window is read a batch at a time, so its instances are prepared while this
                    # window runs and each collation waits behind one batch's worth of them at most.
                    extend(following, batch_size)
                    part = order[at : at + batch_size]
                    yield _Chunk(
                        [current.start + i for i in part],
                        [current.items[i] for i in part],
                        [current.futures[i] for i in part],
                    )
                extend(following, size - len(following.items))
                current = following

        def submit_next() -> tuple[list[int], Future[_Collated[T]]] | None:
            chunk = next(chunks, None)
            if chunk is None:
                return None
            # Queued after its own instances (the pool is first in, first out), so it only ever waits on
            # work already running: no deadlock, whatever the number of workers.
            return chunk.places, pool.submit(collate, chunk.items, chunk.futures, pipeline)

        chunks = by_length() if pipeline.sorts_by_length else in_order()
        pending: collections.deque[tuple[list[int], Future[_Collated[T]]]] = collections.deque()
        posts: collections.deque[tuple[list[int], Future[list[Result[T]]]]] = collections.deque()
        ordered: _InOrder[T] = _InOrder()
        exhausted = False
        while True:
            while not exhausted and len(pending) <= prefetch:
                submitted = submit_next()
                if submitted is None:
                    exhausted = True
                else:
                    pending.append(submitted)
            if not pending:
                break
            places, collated = pending.popleft()
            posts.append((places, run_collated(collated.result(), pipeline, run, pool)))
            while posts and (posts[0][1].done() or len(posts) > prefetch + 1):
                places, post = posts.popleft()
                yield from ordered.add(places, post.result())
        while posts:
            places, post = posts.popleft()
            yield from ordered.add(places, post.result())


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
