"""The batching policy over a FIFO of requests, with no threads and no clock of its own.

:class:`BatchQueue` decides what leaves as the next batch (Triton's policy, see ``batcher.py``) given the
time; :func:`concat_inputs` and :func:`split_outputs` join a batch's inputs once and hand each request a
view of its rows. Tests drive it with a fake clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from kiln.execution.errors import QueueFullError

Clock = Callable[[], float]
Outputs = dict[str, np.ndarray]
Done = Callable[[Outputs | None, BaseException | None], None]


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
    finished: bool = False  # answered (by its batch, or by the watchdog when the batch hung)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 0  # 0: the model has no batch dimension; requests run one at a time
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 256
    # The wait a request may face without a deadline of its own: seconds, admission.AUTO (derived from the
    # measured service time), or None (no admission by wait: only max_queue_size bounds the queue).
    queue_budget_s: float | str | None = None
    compute_timeout_s: float | None = None  # a batch running longer is answered with an error
    fail_after: int = 0  # failed batches in a row before on_unhealthy; 0: never
    # The rows a merged batch may reach (0: max_batch_size). 1 never merges: each request runs as sent
    # (dynamic_batching: off). A single request larger than this still runs whole.
    merge_rows: int = 0
    # The rows a batch waits for under ``max_queue_delay_s`` (0: the largest preferred size, else
    # max_batch_size): past the size where batching stops raising rows/s, waiting only adds latency.
    wait_rows: int = 0
    # Whether the batcher sets ``wait_rows`` and ``merge_rows`` from the batch-size curve it measures at warm-up.
    auto_wait: bool = False

    @property
    def merge_limit(self) -> int:
        """The rows a batch formed from several requests may reach."""
        if self.max_batch_size == 0:
            return 1
        return min(self.merge_rows, self.max_batch_size) if self.merge_rows else self.max_batch_size


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
        self.rows = 0  # rows queued (cancelled and expired ones included until they are dropped)

    def __len__(self) -> int:
        return len(self._q)

    def put(self, item: Pending) -> None:
        if len(self._q) >= self.policy.max_queue_size:
            raise QueueFullError(self.model, len(self._q), self.policy.max_queue_size)
        self._q.append(item)
        self.rows += item.rows

    def take(self, now: float) -> Take:
        out = Take()
        while self._q and (self._q[0].cancelled or (self._q[0].deadline is not None and self._q[0].deadline <= now)):
            head = self._q.popleft()
            self.rows -= head.rows
            if not head.cancelled:
                out.expired.append(head)
        if not self._q:
            return out
        p = self.policy
        if p.max_batch_size == 0:
            out.batch.append(self._q.popleft())
            self.rows -= out.batch[0].rows
            return out
        # The FIFO prefix that fits in one batch, skipping cancelled and expired requests, and requests
        # whose non-batch dims differ from the head's (padded texts, other image sizes): they go next.
        prefix: list[Pending] = []
        rows = 0
        limit = p.merge_limit
        full = False  # the next request does not fit: waiting cannot make this batch larger
        head_dims: tuple[tuple[int, ...], ...] = ()
        for item in self._q:
            if item.cancelled or (item.deadline is not None and item.deadline <= now):
                continue
            if prefix and rows + item.rows > limit:
                full = True
                break
            if not prefix:
                head_dims = _row_dims(item)
            elif _row_dims(item) != head_dims:
                continue
            prefix.append(item)
            rows += item.rows
        target = min(max(p.preferred_batch_sizes) if p.preferred_batch_sizes else p.max_batch_size, limit)
        if p.wait_rows:
            target = min(target, p.wait_rows)
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
        self.rows = sum(item.rows for item in rest)
        out.batch = prefix
        return out

    def drain_all(self) -> list[Pending]:
        items = [i for i in self._q if not i.cancelled]
        self._q.clear()
        self.rows = 0
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
