"""Deadline-aware admission: how long a request arriving now would wait, and how long it may.

:class:`ServiceTimes` keeps a running estimate of a model version's engine time per batch size;
:func:`expected_wait` turns the batches running and the rows queued into the wait ahead of a new request;
:func:`queue_budget` says how long a request without a deadline of its own may wait. Pure functions of
their arguments and the time they are given, so that tests drive them with a fake clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

AUTO = "auto"
# The default queue budget has two levels. A burst, or a closed loop of clients (perf_analyzer's
# concurrency sweep) that waits for its answers, may queue up to BURST_BATCHES batch-1 service times;
# once that is passed, demand is outrunning the engine, and for OVERLOAD_S after the last refusal only
# BUDGET_BATCHES are admitted, so sustained overload does not multiply latency.
BUDGET_BATCHES = 3.0
BURST_BATCHES = 16.0
BUDGET_FLOOR_S = 0.002  # the sustained level is never less than this, and the burst level never less than
BURST_FLOOR_S = 0.010  # this: on a busy machine the measured times of a fast model carry that much jitter
OVERLOAD_S = 1.0


class ServiceTimes:
    """A running estimate of the engine time of one model version per batch size (not thread-safe)."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self._seconds: dict[int, float] = {}

    def record(self, rows: int, seconds: float) -> None:
        rows = max(rows, 1)
        prev = self._seconds.get(rows)
        self._seconds[rows] = seconds if prev is None else (1 - self.weight) * prev + self.weight * seconds

    @property
    def known(self) -> bool:
        return bool(self._seconds)

    def batch_seconds(self, rows: int) -> float:
        """The time of a batch of ``rows`` (0 while nothing is measured): measured, else interpolated between
        the measured sizes around it, else scaled in proportion from the nearest one."""
        rows = max(rows, 1)
        t = self._seconds.get(rows)
        if t is not None:
            return t
        if not self._seconds:
            return 0.0
        below = max((n for n in self._seconds if n < rows), default=None)
        above = min((n for n in self._seconds if n > rows), default=None)
        if below is not None and above is not None:
            lo, hi = self._seconds[below], self._seconds[above]
            return lo + (hi - lo) * (rows - below) / (above - below)
        near = below if below is not None else above
        assert near is not None
        return self._seconds[near] * rows / near


def next_row_seconds(prev: float, seconds: float, rows: int) -> float:
    """The running mean of seconds per row after a batch of ``rows`` took ``seconds`` (``prev`` is inf before
    the first measurement): what decides whether a batch is short enough to run without a thread hop."""
    per_row = seconds / max(rows, 1)
    return per_row if prev == float("inf") else 0.8 * prev + 0.2 * per_row


def expected_wait(
    now: float,
    running: Sequence[tuple[float, int]],
    queued_rows: int,
    instances: int,
    times: ServiceTimes,
    max_batch_size: int,
) -> float:
    """Seconds until a request arriving ``now`` would start: the rest of the batches running (started at,
    rows) and the queued rows, run as batches the size the queue forms, shared by the instances."""
    if not times.known or (not queued_rows and len(running) < instances):
        return 0.0
    left = sum(max(0.0, times.batch_seconds(rows) - (now - start)) for start, rows in running)
    if queued_rows:
        batch = min(queued_rows, max_batch_size) if max_batch_size else 1
        left += times.batch_seconds(batch) * queued_rows / batch
    return left / instances


MERGE_GAIN = 0.05  # a larger batch must raise rows/s by this much over the best smaller one to be worth forming
BATCH_OVERHEAD_S = 50e-6  # the server's own cost per executed batch (queue, hand-off, split), paid once a batch


def _rates(seconds_by_rows: Mapping[int, float], overhead_s: float) -> list[tuple[int, float]]:
    """(batch size, rows/s with the per-batch cost) for each measured size, smallest first."""
    return sorted((n, n / (t + overhead_s)) for n, t in seconds_by_rows.items() if n >= 1 and t > 0)


def merge_limit(seconds_by_rows: Mapping[int, float], gain: float = MERGE_GAIN,
                overhead_s: float = BATCH_OVERHEAD_S) -> int:  # fmt: skip
    """The batch size worth waiting for, from the measured engine time per batch size (plus the server's
    own cost per batch): the smallest size whose rows/s no larger size beats by more than ``gain``. 1 when
    batching does not pay on this engine (the CNNs of this CPU: the same rows/s at any size), so a request
    never waits for others; where batching pays (a GPU, a large matmul, a model so small that the
    per-batch cost dominates) the size past which it stops paying."""
    rates = _rates(seconds_by_rows, overhead_s)
    if not rates:
        return 1
    best = max(r for _, r in rates)
    for n, r in rates:
        if r * (1 + gain) >= best:
            return n
    return rates[-1][0]


def merge_cap(seconds_by_rows: Mapping[int, float], gain: float = MERGE_GAIN,
              overhead_s: float = BATCH_OVERHEAD_S) -> int:  # fmt: skip
    """The largest batch worth forming from queued requests: the sizes up to it all keep rows/s within
    ``gain`` of the best measured, so merging there costs nothing; past it (a CPU whose caches a large
    batch overflows) rows/s falls, and requests are better run in smaller batches."""
    rates = _rates(seconds_by_rows, overhead_s)
    if not rates:
        return 1
    best = max(r for _, r in rates)
    cap, near_best = rates[0][0], False
    for n, r in rates:
        if r * (1 + gain) >= best:
            near_best = True
        elif near_best:  # rows/s falls away from the best: larger batches cost
            break
        cap = n  # on the rising part of the curve, or near the best
    return cap


@dataclass(frozen=True)
class Budget:
    """The wait a request without a deadline of its own may face: ``burst`` until demand has outrun the
    engine of late, ``sustained`` while it does (the same value when the user set one)."""

    sustained: float
    burst: float


def queue_budget(setting: float | str | None, times: ServiceTimes, row_seconds: float = 0.0) -> Budget | None:
    """The model's queue budget from its setting (seconds, :data:`AUTO` or None: no limit by wait, only
    ``max_queue_size``) and the measured service times. ``row_seconds`` is the recent engine time per row
    of the batches actually run: while requests merge, batch 1 no longer runs and its estimate goes stale
    (measured at warm-up on a quieter machine), so the budget follows the slower of the two."""
    b = setting
    if b is None:
        return None
    if isinstance(b, float | int):
        return Budget(float(b), float(b))
    if not times.known:
        return None  # nothing measured yet: admit, and learn
    recent = row_seconds if 0.0 < row_seconds < float("inf") else 0.0
    one = max(times.batch_seconds(1), recent)
    return Budget(max(BUDGET_BATCHES * one, BUDGET_FLOOR_S), max(BURST_BATCHES * one, BURST_FLOOR_S))
