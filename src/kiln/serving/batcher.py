"""The dynamic batcher: one bounded queue per served model version, drained by its instances.

:class:`BatchQueue` holds the policy and no threads, and takes the time as an argument, so tests
drive it with a fake clock. :class:`Batcher` runs it: one worker thread per instance pulls the next
batch, concatenates the inputs once, runs the engine and hands each caller a view of its rows.

Policy (Triton's, with a zero default delay): a request runs at once when an instance is free; the
requests that arrive while every instance is busy wait in the queue and leave together as the next
batch (up to ``max_batch_size`` rows, cut at the largest preferred size when one is set). With a
``max_queue_delay`` a batch smaller than the preferred (or maximum) size waits up to that long for
more rows, unless no more can join (the next queued request would pass ``max_batch_size``): a full
batch leaves at once, as in Triton. The queue is bounded: a full queue refuses at once
(:class:`QueueFullError`). Each batch runs with the request ids of its requests in the log context.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from kiln.errors import QueueFullError, RequestTimeoutError, ShuttingDownError
from kiln.serving import logs

log = logging.getLogger("kiln.serving")

Clock = Callable[[], float]
Outputs = dict[str, np.ndarray]
Done = Callable[[Outputs | None, BaseException | None], None]


class BatcherClosedError(ShuttingDownError):
    """The batcher of a version being retired (reload or unload); the caller may retry on the new one."""


class Runner(Protocol):
    """What an instance runs a batch on (a :class:`~kiln.serving.runner.ModelRunner`, or a fake)."""

    def run(self, inputs: Mapping[str, np.ndarray]) -> Outputs: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class Pending:
    """One request in the queue."""

    inputs: Mapping[str, np.ndarray]
    rows: int
    enqueued: float
    done: Done
    deadline: float | None = None
    timeout_s: float = 0.0
    cancelled: bool = False
    started: float = 0.0
    request_id: str = ""  # the submitter's log context, carried into the worker thread


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 0  # 0: the model has no batch dimension; requests run one at a time
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 256


@dataclass
class Take:
    """What :meth:`BatchQueue.take` decided: a batch to run now, requests that expired, or a wait."""

    batch: list[Pending] = field(default_factory=list)
    expired: list[Pending] = field(default_factory=list)
    wait_s: float | None = None  # None: nothing queued, wait for a put


class BatchQueue:
    """The batching policy over a FIFO of :class:`Pending` requests. Not thread-safe; no clock of its own."""

    def __init__(self, model: str, policy: BatchPolicy) -> None:
        self.model = model
        self.policy = policy
        self._q: deque[Pending] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def put(self, item: Pending) -> None:
        if len(self._q) >= self.policy.max_queue_size:
            raise QueueFullError(self.model, len(self._q), self.policy.max_queue_size)
        self._q.append(item)

    def take(self, now: float) -> Take:
        out = Take()
        while self._q and (self._q[0].cancelled or (self._q[0].deadline is not None and self._q[0].deadline <= now)):
            head = self._q.popleft()
            if not head.cancelled:
                out.expired.append(head)
        if not self._q:
            return out
        p = self.policy
        if p.max_batch_size == 0:
            out.batch.append(self._q.popleft())
            return out
        # The FIFO prefix that fits in one batch, skipping cancelled and expired requests, and requests
        # whose non-batch dims differ from the head's (padded texts, other image sizes): they go next.
        prefix: list[Pending] = []
        rows = 0
        full = False  # the next request does not fit: waiting cannot make this batch larger
        head_dims: tuple[tuple[int, ...], ...] = ()
        for item in self._q:
            if item.cancelled or (item.deadline is not None and item.deadline <= now):
                continue
            if prefix and rows + item.rows > p.max_batch_size:
                full = True
                break
            if not prefix:
                head_dims = _row_dims(item)
            elif _row_dims(item) != head_dims:
                continue
            prefix.append(item)
            rows += item.rows
        target = max(p.preferred_batch_sizes) if p.preferred_batch_sizes else p.max_batch_size
        oldest = self._q[0].enqueued
        if rows < target and not full and p.max_queue_delay_s > 0 and now < oldest + p.max_queue_delay_s:
            out.wait_s = oldest + p.max_queue_delay_s - now
            return out
        if p.preferred_batch_sizes and rows > min(p.preferred_batch_sizes):
            # Cut at the largest preferred size the prefix reaches exactly, if any.
            acc, best = 0, 0
            for n, item in enumerate(prefix, 1):
                acc += item.rows
                if acc in p.preferred_batch_sizes:
                    best = n
            if best:
                prefix = prefix[:best]
        chosen = set(map(id, prefix))
        rest: deque[Pending] = deque()
        for item in self._q:
            if id(item) in chosen:
                continue
            if item.cancelled:
                continue
            if item.deadline is not None and item.deadline <= now:
                out.expired.append(item)
                continue
            rest.append(item)
        self._q = rest
        out.batch = prefix
        return out

    def drain_all(self) -> list[Pending]:
        items = [i for i in self._q if not i.cancelled]
        self._q.clear()
        return items


def _row_dims(item: Pending) -> tuple[tuple[int, ...], ...]:
    """Each input's shape without the batch dim: only requests that agree on it can be concatenated."""
    return tuple(a.shape[1:] for a in item.inputs.values())


def concat_inputs(batch: Sequence[Pending], batched: bool) -> dict[str, np.ndarray]:
    """One request passes through untouched; several are concatenated once along the batch axis."""
    if len(batch) == 1 or not batched:
        return dict(batch[0].inputs)
    names = batch[0].inputs.keys()
    return {n: np.concatenate([b.inputs[n] for b in batch], axis=0) for n in names}


def split_outputs(outputs: Outputs, batch: Sequence[Pending], batched: bool) -> list[Outputs]:
    """Each request's rows as views of the batch outputs."""
    if len(batch) == 1 or not batched:
        return [outputs]
    total = sum(b.rows for b in batch)
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != total:
            raise RuntimeError(f"output {name!r} has shape {list(arr.shape)}, not {total} rows for the batch")
    parts: list[Outputs] = []
    start = 0
    for b in batch:
        parts.append({n: a[start : start + b.rows] for n, a in outputs.items()})
        start += b.rows
    return parts


class BatchObserver(Protocol):
    def batch_done(self, size: int, rows: int, queue_s: Sequence[float], compute_s: float) -> None: ...


class Batcher:
    """Runs a :class:`BatchQueue` on ``len(runners)`` instances, one worker thread each."""

    def __init__(
        self,
        model: str,
        runners: Sequence[Runner],
        policy: BatchPolicy,
        *,
        observer: BatchObserver | None = None,
        clock: Clock = time.monotonic,
        name: str | None = None,
    ) -> None:
        if not runners:
            raise ValueError("a batcher needs at least one runner")
        self.model = model
        self.runners = list(runners)
        self.policy = policy
        self.queue = BatchQueue(model, policy)
        self.clock = clock
        self.observer = observer
        self._cond = threading.Condition()
        self._closing = False
        self._busy = 0
        self._lent: Runner | None = None
        self.row_seconds = float("inf")  # engine time per row, averaged; unknown until a batch is timed
        self._threads: list[threading.Thread] = []
        self._name = name or model

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        for i, runner in enumerate(self.runners):
            t = threading.Thread(target=self._work, args=(runner,), name=f"kiln-batch-{self._name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish the queued ones (``drain``) or fail them; join the workers."""
        with self._cond:
            self._closing = True
            dropped = [] if drain else self.queue.drain_all()
            self._cond.notify_all()
        for p in dropped:
            _finish(p, None, ShuttingDownError(f"model {self.model!r} is unloading; the request was not run"))
        for t in self._threads:
            t.join(timeout)
        for r in self.runners:
            r.close()

    @property
    def idle(self) -> bool:
        with self._cond:
            return self._busy == 0 and not len(self.queue)

    @property
    def depth(self) -> int:
        return len(self.queue)

    @property
    def busy(self) -> int:
        """Instances running a batch now."""
        return self._busy

    # ---- the hot path -------------------------------------------------------------------------------------
    def submit(
        self, inputs: Mapping[str, np.ndarray], rows: int, done: Done, timeout_s: float | None = None
    ) -> Pending:
        """Queue a request; ``done(outputs, error)`` is called from a worker thread when it finishes."""
        now = self.clock()
        deadline = None if timeout_s is None else now + timeout_s
        item = Pending(inputs, rows, now, done, deadline, timeout_s or 0.0, request_id=logs.request_id.get())
        with self._cond:
            if self._closing:
                raise BatcherClosedError(f"model {self.model!r} is unloading; retry to reach its new version")
            self.queue.put(item)
            if self._lent is None:
                self._cond.notify()
            else:  # the lent instance's worker may be the one a single notify() would wake
                self._cond.notify_all()
        return item

    def lend(self) -> Runner | None:
        """An instance to run one request on in the caller's thread, when all are idle and nothing is queued.

        This is how an idle server adds no hand-off latency: the caller runs the engine itself and
        returns the instance with :meth:`give_back`; meanwhile the instance's worker takes nothing.
        """
        with self._cond:
            if self._closing or self._busy or self._lent is not None or len(self.queue):
                return None
            self._lent = self.runners[0]
            self._busy += 1
            return self._lent

    def record_compute(self, seconds: float, rows: int) -> None:
        """Fold one batch's engine time per row into the running average that decides inline runs."""
        per_row = seconds / max(rows, 1)
        prev = self.row_seconds
        self.row_seconds = per_row if prev == float("inf") else 0.8 * prev + 0.2 * per_row

    def give_back(self, runner: Runner, rows: int, compute_s: float) -> None:
        self.record_compute(compute_s, rows)
        with self._cond:
            if runner is not self._lent:
                raise RuntimeError("give_back() of an instance that was not lent")
            self._lent = None
            self._busy -= 1
            if len(self.queue) or self._closing:  # waking an idle worker for nothing costs a GIL round trip
                self._cond.notify_all()
        if self.observer is not None:
            with contextlib.suppress(Exception):
                self.observer.batch_done(1, rows, [0.0], compute_s)

    def _work(self, runner: Runner) -> None:
        batched = self.policy.max_batch_size > 0
        while True:
            with self._cond:
                while True:
                    if self._lent is runner:
                        self._cond.wait()
                        continue
                    take = self.queue.take(self.clock())
                    if take.batch:
                        self._busy += 1
                        break
                    if take.expired:
                        break
                    if self._closing and not len(self.queue):
                        return
                    self._cond.wait(take.wait_s)
            for p in take.expired:
                _finish(p, None, RequestTimeoutError(self.model, p.timeout_s))
            if take.batch:
                logs.request_id.set(_batch_ids(take.batch))  # this thread's context: the fallback log names them
                try:
                    self._run(runner, take.batch, batched)
                finally:
                    with self._cond:
                        self._busy -= 1
                        self._cond.notify_all()

    def _run(self, runner: Runner, batch: list[Pending], batched: bool) -> None:
        start = self.clock()
        try:
            outputs = runner.run(concat_inputs(batch, batched))
            parts = split_outputs(outputs, batch, batched)
        except BaseException as exc:  # the caller gets the error; the worker keeps serving
            for p in batch:
                _finish(p, None, exc)
            return
        end = self.clock()
        self.record_compute(end - start, sum(p.rows for p in batch))
        for p, out in zip(batch, parts, strict=True):
            _finish(p, out, None)
        if self.observer is not None:
            with contextlib.suppress(Exception):
                self.observer.batch_done(
                    len(batch), sum(p.rows for p in batch), [start - p.enqueued for p in batch], end - start
                )


def _batch_ids(batch: Sequence[Pending]) -> str:
    """The request ids of a batch for its log lines: one id, or the distinct ids joined by commas."""
    if len(batch) == 1:
        return batch[0].request_id
    return ",".join(dict.fromkeys(p.request_id for p in batch if p.request_id))


def _finish(p: Pending, out: Outputs | None, err: BaseException | None) -> None:
    try:
        p.done(out, err)
    except Exception:
        log.exception("completing a request failed")


__all__ = [
    "BatchPolicy",
    "BatchQueue",
    "Batcher",
    "BatcherClosedError",
    "Pending",
    "Runner",
    "Take",
    "concat_inputs",
    "split_outputs",
]
