"""Deadline-aware admission with a fake clock: the estimate of the wait ahead, the budget it must fit, and
the batcher refusing at once what would wait too long (no threads run: nothing is started)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.execution.admission import (
    AUTO,
    BUDGET_FLOOR_S,
    BURST_FLOOR_S,
    Budget,
    ServiceTimes,
    expected_wait,
    queue_budget,
)
from kiln.execution.batcher import Batcher, BatchPolicy, Running
from kiln.execution.errors import OverloadedError, QueueFullError


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class Idle:
    def run(self, inputs: object) -> dict[str, np.ndarray]:
        raise AssertionError("nothing runs in these tests")

    def close(self) -> None:
        pass


def _x(rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.zeros((rows, 2), np.float32)}


def test_service_times_are_measured_per_size_and_scaled_from_the_nearest() -> None:
    t = ServiceTimes(weight=0.5)
    assert not t.known and t.batch_seconds(4) == 0.0
    t.record(1, 0.004)
    assert t.batch_seconds(1) == pytest.approx(0.004)
    assert t.batch_seconds(8) == pytest.approx(0.032)  # only batch 1 known: linear in rows
    t.record(8, 0.016)  # batching pays: 2 ms a row at 8
    assert t.batch_seconds(8) == pytest.approx(0.016)
    assert t.batch_seconds(6) == pytest.approx(0.004 + 0.012 * 5 / 7)  # between the measured 1 and 8
    assert t.batch_seconds(16) == pytest.approx(0.032)  # past the largest: in proportion to it
    t.record(1, 0.006)
    assert t.batch_seconds(1) == pytest.approx(0.005)  # a running average, not the last sample


def test_expected_wait_counts_running_and_queued_work_over_the_instances() -> None:
    t = ServiceTimes()
    t.record(1, 0.004)
    t.record(4, 0.008)
    assert expected_wait(10.0, [], 0, 1, t, 8) == 0.0  # idle: starts at once
    assert expected_wait(10.0, [(10.0, 1)], 0, 2, t, 8) == 0.0  # one instance free
    # one batch of 1 started 1 ms ago (3 ms left) and 4 rows queued (one batch of 4: 8 ms)
    assert expected_wait(10.001, [(10.0, 1)], 4, 1, t, 8) == pytest.approx(0.011)
    assert expected_wait(10.001, [(10.0, 1)], 4, 2, t, 8) == pytest.approx(0.0055)  # shared by two instances
    # without batching (max_batch_size 0) each queued request is a batch of one
    assert expected_wait(10.0, [(10.0, 1)], 3, 1, t, 0) == pytest.approx(0.016)
    # a batch running past its estimate counts as about to finish, not as negative time
    assert expected_wait(11.0, [(10.0, 1)], 0, 1, t, 8) == 0.0
    assert expected_wait(10.0, [(10.0, 1)], 2, 1, ServiceTimes(), 8) == 0.0  # nothing measured: admit, learn


def test_the_default_budget_is_measured_batches_with_a_floor_and_a_burst_level() -> None:
    t = ServiceTimes()
    assert queue_budget(AUTO, t) is None  # unmeasured: no limit yet
    t.record(1, 0.005)
    assert queue_budget(AUTO, t) == Budget(sustained=0.015, burst=0.080)
    fast = ServiceTimes()
    fast.record(1, 0.00002)
    assert queue_budget(AUTO, fast) == Budget(BUDGET_FLOOR_S, BURST_FLOOR_S)
    assert queue_budget(0.25, t) == Budget(0.25, 0.25)  # the user's: one level
    # Requests merged into larger batches on a machine slower than at warm-up: the batch-1 estimate is
    # stale, and the budget follows the recent time per row instead (a closed loop of clients is no burst).
    assert queue_budget(AUTO, t, row_seconds=0.010) == Budget(sustained=0.030, burst=0.160)
    assert queue_budget(AUTO, t, row_seconds=0.001) == queue_budget(AUTO, t)  # a GPU's cheap rows: batch 1 rules
    assert queue_budget(AUTO, t, row_seconds=float("inf")) == queue_budget(AUTO, t)  # nothing timed yet
    assert queue_budget(None, t) is None  # off: only max_queue_size bounds the queue


def _busy_batcher(policy: BatchPolicy, clock: FakeClock, seconds: float = 0.004) -> Batcher:
    """A batcher whose one instance is (as far as admission knows) running a batch of 1 started now."""
    b = Batcher("m", [Idle()], policy, clock=clock)
    b.seed({1: seconds})
    b._running[0] = Running(b.runners[0], clock(), 1, [])
    return b


def test_submit_refuses_at_once_what_would_wait_past_the_queue_budget() -> None:
    clock = FakeClock()
    b = _busy_batcher(BatchPolicy(max_batch_size=0, queue_budget_s=0.012), clock)
    for _ in range(2):  # 4 ms running + 4 ms per queued request
        b.submit(_x(), 1, lambda o, e: None)
    b.submit(_x(), 1, lambda o, e: None)  # waits 4 + 8 = 12 ms: fits exactly
    with pytest.raises(OverloadedError) as info:
        b.submit(_x(), 1, lambda o, e: None)  # 16 ms
    err = info.value
    assert err.http_status == 503 and err.model == "m" and not err.client_deadline
    assert err.wait_s == pytest.approx(0.016) and err.budget_s == pytest.approx(0.012)
    assert "16 ms" in str(err) and "queue_budget_ms" in str(err)
    assert err.retry_after_s == pytest.approx(0.016)
    assert b.depth == 3  # the refused request was never queued
    clock.now += 0.004  # the running batch is (estimated) done: the queue moves up
    b._running.clear()
    b.submit(_x(), 1, lambda o, e: None)


def test_a_burst_or_closed_loop_queues_deeper_until_demand_outruns_the_engine() -> None:
    clock = FakeClock()
    b = _busy_batcher(BatchPolicy(max_batch_size=0, queue_budget_s=AUTO), clock)  # 4 ms: 12 ms / 64 ms
    for _ in range(16):  # a closed loop of 17 clients on one instance (one running, 16 waiting): all admitted
        b.submit(_x(), 1, lambda o, e: None)
    assert b.depth == 16 and b.expected_wait() == pytest.approx(0.068)
    with pytest.raises(OverloadedError) as info:
        b.submit(_x(), 1, lambda o, e: None)  # past the burst level: demand outruns the engine
    assert info.value.budget_s == pytest.approx(0.064)
    b.queue.drain_all()
    for _ in range(3):  # waits of 4, 8 and 12 ms
        b.submit(_x(), 1, lambda o, e: None)
    with pytest.raises(OverloadedError) as info:  # 16 ms: overloaded of late, so the sustained level, 12 ms
        b.submit(_x(), 1, lambda o, e: None)
    assert info.value.budget_s == pytest.approx(0.012)
    clock.now += 1.0  # a second without a refusal: bursts are welcome again
    b._running[0] = Running(b.runners[0], clock(), 1, [])
    for _ in range(5):
        b.submit(_x(), 1, lambda o, e: None)
    assert b.depth == 8


def test_a_client_timeout_replaces_the_budget_and_counts_its_own_run() -> None:
    clock = FakeClock()
    b = _busy_batcher(BatchPolicy(max_batch_size=0, queue_budget_s=0.001), clock)
    b.submit(_x(), 1, lambda o, e: None, timeout_s=1.0, budget_s=1.0)  # the client will wait a second
    with pytest.raises(OverloadedError) as info:
        b.submit(_x(), 1, lambda o, e: None, budget_s=0.010)  # 8 ms ahead + 4 ms its own > 10 ms
    assert info.value.client_deadline and "its timeout" in str(info.value)
    with pytest.raises(OverloadedError):
        b.submit(_x(), 1, lambda o, e: None)  # no deadline of its own: the model's 1 ms budget


def test_batching_that_pays_admits_more_rows_in_the_same_budget() -> None:
    clock = FakeClock()
    b = _busy_batcher(BatchPolicy(max_batch_size=8, queue_budget_s=0.012), clock)
    b.times.record(8, 0.008)  # 1 ms a row at 8
    for _ in range(8):
        b.submit(_x(), 1, lambda o, e: None)  # ahead of the 8th: 4 ms running + 7 rows of a batch of 7
    assert b.depth == 8


def test_the_hard_cap_still_holds_with_admission() -> None:
    clock = FakeClock()
    b = _busy_batcher(BatchPolicy(max_batch_size=0, max_queue_size=2, queue_budget_s=10.0), clock)
    b.submit(_x(), 1, lambda o, e: None)
    b.submit(_x(), 1, lambda o, e: None)
    with pytest.raises(QueueFullError):
        b.submit(_x(), 1, lambda o, e: None)
