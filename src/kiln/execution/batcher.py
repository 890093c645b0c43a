"""The dynamic batcher: one bounded queue per served model version, drained by its instances.

:class:`~kiln.execution.batch_queue.BatchQueue` holds the policy and no threads, and takes the time as an
argument, so tests drive it with a fake clock. :class:`Batcher` runs it: one worker thread per instance pulls the next
batch, concatenates the inputs once, runs the engine and hands each caller a view of its rows.

Policy (Triton's, with a zero default delay): a request runs at once when an instance is free; the
requests that arrive while every instance is busy wait in the queue and leave together as the next
batch (up to ``max_batch_size`` rows, cut at the largest preferred size when one is set). With a
``max_queue_delay`` a batch smaller than the preferred (or maximum) size waits up to that long for
more rows, unless no more can join (the next queued request would pass ``max_batch_size``): a full
batch leaves at once, as in Triton. The queue is bounded: a full queue refuses at once
(:class:`QueueFullError`). Each batch runs with the request ids of its requests in the log context.

Admission is deadline-aware (``admission.py``): a running estimate of the engine time per batch size,
and a request is refused at once (:class:`OverloadedError`) when the work queued and running ahead of
it would not finish within its budget: the client's own timeout when it sent one, else the model's queue
budget (measured batch-1 service times unless set: 16 for a burst, 3 while demand outruns the engine).
A bounded count is not backpressure; a bounded wait is.

Faults: an engine that raises or cannot allocate fails only its batch, with an error naming the model;
a batch past ``compute_timeout_s`` is answered by a watchdog (the instance is aborted where it is a
process); after ``fail_after`` failed batches in a row the batcher calls ``on_unhealthy`` (the manager
marks the model not ready and reloads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from kiln import logs
from kiln.errors import KilnError, first_line
from kiln.execution.admission import (
    OVERLOAD_S,
    ServiceTimes,
    expected_wait,
    merge_cap,
    merge_limit,
    next_row_seconds,
    queue_budget,
)
from kiln.execution.batch_queue import (
    BatchPolicy,
    BatchQueue,
    Clock,
    Done,
    Outputs,
    Pending,
    Take,
    concat_inputs,
    split_outputs,
)
from kiln.execution.errors import (
    BatcherClosedError,
    ComputeTimeoutError,
    EngineFailedError,
    EngineInputError,
    EngineOutOfMemoryError,
    OverloadedError,
    RequestTimeoutError,
    ShuttingDownError,
)

log = logging.getLogger("kiln.serving")


class Runner(Protocol):
    """What an instance runs a batch on (a :class:`~kiln.execution.instances.ModelRunner`, or a fake)."""

    def run(self, inputs: Mapping[str, np.ndarray]) -> Outputs: ...

    def close(self) -> None: ...


def classify_failure(exc: BaseException) -> tuple[str, type[EngineFailedError]]:
    """An engine exception as a kind for the metrics and the error the callers get."""
    if isinstance(exc, MemoryError) or "allocat" in str(exc).lower() or "out of memory" in str(exc).lower():
        return "oom", EngineOutOfMemoryError
    return "error", EngineFailedError


class BatchObserver(Protocol):
    def batch_done(
        self, size: int, rows: int, queue_s: Sequence[float], input_s: float, infer_s: float, output_s: float
    ) -> None: ...

    def batch_failed(self, kind: str) -> None: ...


@dataclass(eq=False)
class Running:
    """A batch on an instance: what the admission estimate and the watchdog look at."""

    runner: Runner
    started: float
    rows: int
    batch: list[Pending]
    timed_out: bool = False


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
        on_unhealthy: Callable[[str], None] | None = None,
        probe: Callable[[Runner], object] | None = None,
        lends: Literal["call", "await"] = "call",
    ) -> None:
        if not runners:
            raise ValueError("a batcher needs at least one runner")
        self.model = model
        self.runners = list(runners)
        self.policy = policy
        self.queue = BatchQueue(model, policy)
        self.clock = clock
        self.observer = observer
        self.on_unhealthy = on_unhealthy  # called once (from a worker thread) with the reason
        self.probe = probe  # runs a known-good input on an instance: tells a bad request from a failing engine
        # "call": a lent instance runs in the caller's thread (run_lent); "await": its run is awaited on the
        # caller's event loop (run_lent_async: a Ray Serve handle call, which may not block the loop)
        self.lends = lends
        self._cond = threading.Condition()
        self._closing = False
        self._busy = 0
        self._lent: Runner | None = None
        self.row_seconds = float("inf")  # engine time per row, averaged; unknown until a batch is timed
        self.times = ServiceTimes()
        self._running: dict[int, Running] = {}  # id(runner) -> its batch
        self._failures = 0  # failed batches in a row
        self._overloaded_until = float("-inf")  # the sustained queue budget applies until then
        self.unhealthy = ""  # why the batcher gave up (set once)
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()  # ends the watchdog
        self._name = name or model

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        for i, runner in enumerate(self.runners):
            t = threading.Thread(target=self._work, args=(runner,), name=f"kiln-batch-{self._name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.policy.compute_timeout_s is not None:
            t = threading.Thread(target=self._watch, name=f"kiln-watchdog-{self._name}", daemon=True)
            t.start()
            self._threads.append(t)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish the queued ones (``drain``) or fail them; join the workers.

        An instance whose worker is still inside the engine after ``timeout`` (a hung engine) is left to
        it rather than closed under it."""
        with self._cond:
            self._closing = True
            dropped = [] if drain else self.queue.drain_all()
            self._cond.notify_all()
        for p in dropped:
            self._finish(p, None, ShuttingDownError(f"model {self.model!r} is unloading; the request was not run"))
        workers = self._threads[: len(self.runners)]
        for t in workers:
            t.join(timeout)
        self._stopped.set()
        with self._cond:
            stuck = {id(r.runner) for r in self._running.values()}
        for r in self.runners:
            if id(r) not in stuck:
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

    # ---- admission ---------------------------------------------------------------------------------------
    def expected_wait(self, now: float | None = None) -> float:
        """Seconds a request arriving now would wait before its batch starts (an estimate)."""
        with self._cond:
            return self._expected_wait(self.clock() if now is None else now)

    def _expected_wait(self, now: float) -> float:
        running = [(r.started, r.rows) for r in self._running.values() if not r.timed_out]
        return expected_wait(now, running, self.queue.rows, len(self.runners), self.times, self.policy.merge_limit)

    def _admit(self, now: float, rows: int, budget_s: float | None) -> None:
        """Raise :class:`OverloadedError` unless the request's wait fits its budget: ``budget_s`` (the
        client's timeout; the request's own run counts too), else the model's queue budget (its burst
        level, or its sustained level while demand outruns the engine: see :class:`Budget`)."""
        if budget_s is not None:
            budget, client = budget_s - self.times.batch_seconds(rows), True
        else:
            b = queue_budget(self.policy.queue_budget_s, self.times, self.row_seconds)
            if b is None:
                return
            budget, client = (b.sustained if now < self._overloaded_until else b.burst), False
        wait = self._expected_wait(now)
        if wait > 0 and wait > budget:  # with nothing ahead a request is admitted, even if its timeout is short
            if not client:
                self._overloaded_until = now + OVERLOAD_S
            raise OverloadedError(self.model, wait, max(budget, 0.0), client)

    # ---- the hot path -------------------------------------------------------------------------------------
    def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        rows: int,
        done: Done,
        timeout_s: float | None = None,
        budget_s: float | None = None,
    ) -> Pending:
        """Queue a request; ``done(outputs, error)`` is called from a worker thread when it finishes.

        ``timeout_s`` drops the request if it is still queued then; ``budget_s`` is the client's own
        deadline for admission (None: the model's queue budget)."""
        now = self.clock()
        deadline = None if timeout_s is None else now + timeout_s
        item = Pending(inputs, rows, now, done, deadline, timeout_s or 0.0, request_id=logs.request_id.get())
        with self._cond:
            if self._closing:
                raise BatcherClosedError(self.model)
            self._admit(now, rows, budget_s)
            self.queue.put(item)
            if self._lent is None:
                self._cond.notify()
            else:  # the lent instance's worker may be the one a single notify() would wake
                self._cond.notify_all()
        return item

    def lend(self, awaiting: bool = False) -> Runner | None:
        """An instance to run one request on in the caller's thread, when all are idle and nothing is queued.

        This is how an idle server adds no hand-off latency: the caller runs the engine itself and
        returns the instance with :meth:`give_back`; meanwhile the instance's worker takes nothing. A
        version that has failed of late gets no inline runs: its batches go through the workers, where
        the watchdog can answer a hung one. ``awaiting``: for :meth:`run_lent_async`, where the batcher
        ``lends="await"``.
        """
        with self._cond:
            if (
                self.lends != ("await" if awaiting else "call")
                or self._closing
                or self._busy
                or self._lent is not None
                or len(self.queue)
                or self._failures
            ):
                return None
            self._lent = self.runners[0]
            self._busy += 1
            self._running[id(self._lent)] = Running(self._lent, self.clock(), 1, [])
            return self._lent

    def seed(self, seconds_by_rows: Mapping[int, float]) -> None:
        """Start the estimates from warm-up times per batch size (the batch-1 time decides inline runs);
        with ``auto_wait`` the batch-size curve they trace sets how many rows a batch waits for, and how
        many queued rows merge into one."""
        for rows, seconds in seconds_by_rows.items():
            self.times.record(rows, seconds)
        if 1 in seconds_by_rows:
            self.row_seconds = seconds_by_rows[1]
        if self.policy.auto_wait and self.policy.max_batch_size > 1 and len(seconds_by_rows) > 1:
            rows, cap = merge_limit(seconds_by_rows), merge_cap(seconds_by_rows)
            self.policy = dataclasses.replace(self.policy, wait_rows=rows, merge_rows=cap)
            self.queue.policy = self.policy
            rates = ", ".join(f"{n}: {n / t:,.0f}" for n, t in sorted(seconds_by_rows.items()) if t > 0)
            log.info(
                "%s: batching raises rows/s up to %d rows (%s), so a batch waits for no more; queued requests "
                "merge up to %d rows, past which rows/s falls; rows/s by batch size: %s",
                self._name, rows, "not at all on this engine" if rows == 1 else "little past it", cap, rates,
                extra={"model": self._name, "wait_rows": rows, "merge_rows": cap},
            )  # fmt: skip

    def record_compute(self, seconds: float, rows: int) -> None:
        """Fold one batch's engine time into the estimates (per row for inline runs, per size for admission)."""
        self.row_seconds = next_row_seconds(self.row_seconds, seconds, rows)
        self.times.record(rows, seconds)

    def run_lent(self, runner: Runner, inputs: Mapping[str, np.ndarray], rows: int) -> Outputs:
        """Run one request on a lent instance in the caller's thread, then give the instance back."""
        start = self.clock()
        try:
            out = runner.run(inputs)
        except BaseException as exc:
            self.give_back(runner, rows, self.clock() - start, failed=True)
            raise self._on_failure(runner, exc, 1) from exc
        self.give_back(runner, rows, self.clock() - start)
        return out

    async def run_lent_async(self, runner: Runner, inputs: Mapping[str, np.ndarray], rows: int) -> Outputs:
        """:meth:`run_lent` for an instance whose run is awaited (``runner.run_async``: a Ray Serve handle call)
        on the caller's event loop, which goes on serving meanwhile. A run past ``compute_timeout_s`` is
        answered here (the watchdog cannot answer a lent run); a failure is judged off the loop, since the
        probe runs the instance the blocking way."""
        start = self.clock()
        limit = self.policy.compute_timeout_s
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                out: Outputs = await runner.run_async(inputs)  # type: ignore[attr-defined]
        except TimeoutError:
            if not deadline.expired():
                raise
            with self._cond:
                running = self._running.get(id(runner))
                counted = running is not None and running.timed_out  # the watchdog saw it first
                if running is not None:
                    running.timed_out = True
            self.give_back(runner, rows, 0.0, failed=True)
            err = self._timeout_error()
            if not counted:
                self._failed(err, "timeout", 1)
            raise err from None
        except asyncio.CancelledError:  # the client went away: the replica finishes on its own
            self.give_back(runner, rows, 0.0, failed=True)
            raise
        except Exception as exc:
            self.give_back(runner, rows, self.clock() - start, failed=True)
            raise (await asyncio.to_thread(self._on_failure, runner, exc, 1)) from exc
        self.give_back(runner, rows, self.clock() - start)
        return out

    def give_back(self, runner: Runner, rows: int, compute_s: float, failed: bool = False) -> None:
        with self._cond:
            if runner is not self._lent:
                raise RuntimeError("give_back() of an instance that was not lent")
            if not failed:
                self.record_compute(compute_s, rows)
            self._lent = None
            self._busy -= 1
            self._running.pop(id(runner), None)
            if len(self.queue) or self._closing:  # waking an idle worker for nothing costs a GIL round trip
                self._cond.notify_all()
        if failed:
            return
        self._succeeded()
        if self.observer is not None:
            with contextlib.suppress(Exception):
                self.observer.batch_done(1, rows, [0.0], 0.0, compute_s, 0.0)

    def _work(self, runner: Runner) -> None:
        batched = self.policy.max_batch_size > 0
        while True:
            with self._cond:
                while True:
                    if self._lent is runner:
                        self._cond.wait()
                        continue
                    now = self.clock()
                    take = self.queue.take(now)
                    if take.batch:
                        self._busy += 1
                        rows = sum(p.rows for p in take.batch)
                        self._running[id(runner)] = Running(runner, now, rows, take.batch)
                        break
                    if take.expired:
                        break
                    if self._closing and not len(self.queue):
                        return
                    self._cond.wait(take.wait_s)
            for p in take.expired:
                self._finish(p, None, RequestTimeoutError(self.model, p.timeout_s))
            if take.batch:
                logs.request_id.set(_batch_ids(take.batch))  # this thread's context: the fallback log names them
                try:
                    self._run(runner, take.batch, batched)
                finally:
                    with self._cond:
                        self._busy -= 1
                        self._running.pop(id(runner), None)
                        self._cond.notify_all()

    def _run(self, runner: Runner, batch: list[Pending], batched: bool) -> None:
        start = self.clock()
        try:
            feed = concat_inputs(batch, batched)
            ran = self.clock()
            outputs = runner.run(feed)
            end = self.clock()
            parts = split_outputs(outputs, batch, batched)
        except BaseException as exc:
            with self._cond:
                running = self._running[id(runner)]
            if running.timed_out:  # the watchdog answered these requests and counted the failure
                return
            if len(batch) > 1:  # one bad request must not fail the others: rerun them one by one
                for p in batch:
                    with self._cond:
                        running.started, running.rows, running.batch = self.clock(), p.rows, [p]
                    self._run(runner, [p], batched)
                    if running.timed_out:
                        return
                return
            err = self._on_failure(runner, exc, 1)
            self._finish(batch[0], None, err)
            return
        split = self.clock()
        rows = sum(p.rows for p in batch)
        with self._cond:
            self.record_compute(end - ran, rows)
            timed_out = self._running[id(runner)].timed_out
        if timed_out:  # answered by the watchdog already
            return
        for p, out in zip(batch, parts, strict=True):
            self._finish(p, out, None)
        self._succeeded()
        if self.observer is not None:
            with contextlib.suppress(Exception):
                self.observer.batch_done(
                    len(batch), rows, [start - p.enqueued for p in batch], ran - start, end - ran, split - end
                )

    # ---- faults -------------------------------------------------------------------------------------------
    def _succeeded(self) -> None:
        if self._failures:
            with self._cond:
                self._failures = 0

    def _on_failure(self, runner: Runner, exc: BaseException, requests: int) -> BaseException:
        """The error for the callers of a request the engine failed on, after telling whose fault it was.

        The instance is probed with the warm-up input: if that runs, the engine is sound and refused this
        request's inputs (the client's error, not counted against the model, so no client can mark a model
        unhealthy); if it fails too, the engine is failing: counted, logged once, and after ``fail_after``
        in a row the model is reported unhealthy."""
        if isinstance(exc, EngineFailedError):  # the instance said what happened (a process that died)
            self._failed(exc, exc.kind, requests)
            return exc
        if isinstance(exc, KilnError):  # a known error about the request
            return exc
        kind, cls = classify_failure(exc)
        if kind == "error" and self.probe is not None:
            try:
                self.probe(runner)
            except Exception:
                pass
            else:
                return EngineInputError(self.model, first_line(exc))
        self._failed(exc, kind, requests)
        return cls(self.model, kind, "the server log has the details")

    def _failed(self, exc: BaseException, kind: str, requests: int) -> None:
        """Count a failed batch, log it once (not per request), give up after ``fail_after`` in a row."""
        log.error(
            "model %s failed to run a batch of %d request(s) (%s)", self._name, requests, kind,
            exc_info=exc if kind != "timeout" else None, extra={"model": self._name, "kind": kind},
        )  # fmt: skip
        if self.observer is not None:
            with contextlib.suppress(Exception):
                self.observer.batch_failed(kind)
        with self._cond:
            self._failures += 1
            give_up = not self.unhealthy and (
                kind == "timeout" or (self.policy.fail_after > 0 and self._failures >= self.policy.fail_after)
            )
            if give_up:
                self.unhealthy = (
                    f"a batch ran past its compute timeout of {self.policy.compute_timeout_s:g} s"
                    if kind == "timeout"
                    else f"{self._failures} batches in a row failed ({kind})"
                )
        if give_up and self.on_unhealthy is not None:
            try:
                self.on_unhealthy(self.unhealthy)
            except Exception:
                log.exception("reporting model %s unhealthy failed", self._name)

    def _watch(self) -> None:
        """The watchdog: answers a batch that runs past ``compute_timeout_s`` and aborts its instance.

        It looks a few times per timeout rather than being woken per batch, so it costs the hot path nothing."""
        limit = self.policy.compute_timeout_s
        assert limit is not None
        interval = min(max(limit / 8, 0.005), 1.0)
        while not self._stopped.wait(interval):
            now = self.clock()
            with self._cond:
                late = [r for r in self._running.values() if not r.timed_out and now - r.started >= limit]
                for r in late:
                    r.timed_out = True
            for r in late:
                err = self._timeout_error()
                for p in r.batch:
                    self._finish(p, None, err)
                abort = getattr(r.runner, "abort", None)
                if abort is not None:
                    with contextlib.suppress(Exception):
                        abort()  # a process instance is killed; its worker's run() returns with an error
                self._failed(err, "timeout", len(r.batch))

    def _timeout_error(self) -> ComputeTimeoutError:
        limit = self.policy.compute_timeout_s or 0.0
        return ComputeTimeoutError(
            self.model, "timeout", f"the engine ran past serving.compute_timeout_ms ({limit * 1e3:g} ms)"
        )

    def _finish(self, p: Pending, out: Outputs | None, err: BaseException | None) -> None:
        with self._cond:
            if p.finished:
                return
            p.finished = True
        _finish(p, out, err)


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
    "Pending",
    "Runner",
    "Take",
    "concat_inputs",
    "split_outputs",
]
