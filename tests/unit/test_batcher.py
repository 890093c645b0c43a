"""The batching policy with a fake clock, and the batcher's threads driven by events (no sleeps)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping

import numpy as np
import pytest

from kiln import logs
from kiln.execution.batcher import Batcher, BatchPolicy, BatchQueue, Pending, concat_inputs, split_outputs
from kiln.execution.errors import (
    ComputeTimeoutError,
    EngineFailedError,
    EngineInputError,
    QueueFullError,
    RequestTimeoutError,
    ShuttingDownError,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _req(clock: FakeClock, rows: int = 1, deadline: float | None = None, tag: int = 0) -> Pending:
    return Pending({"x": np.full((rows, 2), tag, np.float32)}, rows, clock(), lambda o, e: None, deadline)


def test_idle_queue_takes_a_single_request_at_once() -> None:
    clock = FakeClock()
    q = BatchQueue("m", BatchPolicy(max_batch_size=8))
    a = _req(clock)
    q.put(a)
    take = q.take(clock())
    assert take.batch == [a] and take.wait_s is None and not take.expired


def test_requests_queued_while_busy_leave_together_up_to_max_batch() -> None:
    clock = FakeClock()
    q = BatchQueue("m", BatchPolicy(max_batch_size=4))
    reqs = [_req(clock, tag=i) for i in range(6)]
    for r in reqs:
        q.put(r)
    assert q.take(clock()).batch == reqs[:4]
    assert q.take(clock()).batch == reqs[4:]
    assert q.take(clock()).batch == []


def test_rows_count_against_max_batch_and_requests_are_never_split() -> None:
    clock = FakeClock()
    q = BatchQueue("m", BatchPolicy(max_batch_size=4))
    a, b, c = _req(clock, rows=3), _req(clock, rows=2), _req(clock, rows=1)
    for r in (a, b, c):
        q.put(r)
    assert q.take(clock()).batch == [a]
    assert q.take(clock()).batch == [b, c]


def test_requests_with_other_row_shapes_wait_for_a_batch_of_their_own() -> None:
    clock = FakeClock()
    q = BatchQueue("m", BatchPolicy(max_batch_size=8))

    def tokens(length: int) -> Pending:
        return Pending({"ids": np.zeros((1, length), np.int64)}, 1, clock(), lambda o, e: None)

    a, b, c, d = tokens(8), tokens(16), tokens(8), tokens(16)
    for r in (a, b, c, d):
        q.put(r)
    assert q.take(clock()).batch == [a, c]  # padded to 8: concatenable; the 16s are skipped, not dropped
    assert q.take(clock()).batch == [b, d]
    assert len(q) == 0


def test_queue_delay_waits_for_a_fuller_batch_then_gives_up() -> None:
    clock = FakeClock()
    q = BatchQueue("m", BatchPolicy(max_batch_size=8, preferred_batch_sizes=(4,), max_queue_delay_s=0.002))
    first = _req(clock)
    q.put(first)
    take = q.take(clock())
    assert take.batch == [] and take.wait_s == pytest.approx(0.002)
    clock.now += 0.001
    second = _req(clock)
    q.put(second)
    take = q.take(clock())
    assert take.batch == [] and take.wait_s == pytest.approx(0.001)
    clock.now += 0.001
    assert q.take(clock()).batch == [first, second]


def test_a_batch_that_no_queued_request_can_join_leaves_without_waiting_out_the_delay() -> None:
    clock = FakeClock()
    q = BatchQueue("m", BatchPolicy(max_batch_size=4, max_queue_delay_s=1.0))
    a, b = _req(clock, rows=3, tag=1), _req(clock, rows=2, tag=2)
    q.put(a)
    q.put(b)  # 3 + 2 rows pass max_batch_size: b cannot join a, so a is as full as it can get
    take = q.take(clock())
    assert take.batch == [a] and take.wait_s is None
    take = q.take(clock())  # b alone could still grow: it waits for company
    assert take.batch == [] and take.wait_s == pytest.approx(1.0)
    clock.now += 1.0
    assert q.take(clock()).batch == [b]


def test_preferred_size_reached_runs_without_waiting_and_cuts_there() -> None:
    clock = FakeClock()
    q = BatchQueue("m", BatchPolicy(max_batch_size=8, preferred_batch_sizes=(2, 4), max_queue_delay_s=1.0))
    reqs = [_req(clock, tag=i) for i in range(5)]
    for r in reqs:
        q.put(r)
    assert q.take(clock()).batch == reqs[:4]
    take = q.take(clock())
    assert take.batch == [] and take.wait_s == pytest.approx(1.0)


def test_full_queue_refuses_at_once() -> None:
    clock = FakeClock()
    q = BatchQueue("m", BatchPolicy(max_batch_size=4, max_queue_size=2))
    q.put(_req(clock))
    q.put(_req(clock))
    with pytest.raises(QueueFullError, match="2 requests queued, the limit is 2"):
        q.put(_req(clock))


def test_expired_and_cancelled_requests_leave_the_queue_without_running() -> None:
    clock = FakeClock()
    q = BatchQueue("m", BatchPolicy(max_batch_size=4))
    stale = _req(clock, deadline=clock() + 0.5)
    gone = _req(clock)
    gone.cancelled = True
    fresh = _req(clock, deadline=clock() + 5)
    for r in (stale, gone, fresh):
        q.put(r)
    clock.now += 1.0
    take = q.take(clock())
    assert take.expired == [stale]
    assert take.batch == [fresh]


def test_unbatched_models_run_one_request_at_a_time() -> None:
    clock = FakeClock()
    q = BatchQueue("m", BatchPolicy(max_batch_size=0))
    a, b = _req(clock), _req(clock)
    q.put(a)
    q.put(b)
    assert q.take(clock()).batch == [a]


def test_concat_and_split_copy_once_and_return_views() -> None:
    clock = FakeClock()
    reqs = [_req(clock, rows=r, tag=i) for i, r in enumerate((1, 2, 3))]
    single = concat_inputs(reqs[:1], batched=True)
    assert single["x"] is reqs[0].inputs["x"]  # one request: no copy at all
    merged = concat_inputs(reqs, batched=True)["x"]
    assert merged.shape == (6, 2)
    parts = split_outputs({"y": merged * 10}, reqs, batched=True)
    assert [p["y"].shape[0] for p in parts] == [1, 2, 3]
    assert np.array_equal(parts[2]["y"], np.full((3, 2), 20, np.float32))
    assert parts[1]["y"].base is not None  # a view of the batch output


class GatedRunner:
    """Blocks in run() until released, recording every batch it is given."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[int] = []
        self.closed = False

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches.append(inputs["x"].shape[0])
        self.entered.set()
        if not self.release.wait(10):
            raise RuntimeError("test runner was never released")
        return {"y": inputs["x"] + 1}

    def close(self) -> None:
        self.closed = True


class Collector:
    def __init__(self, n: int) -> None:
        self.results: list[tuple[object, object]] = []
        self.all_done = threading.Event()
        self.n = n
        self.lock = threading.Lock()

    def done(self, out: object, err: object) -> None:
        with self.lock:
            self.results.append((out, err))
            if len(self.results) == self.n:
                self.all_done.set()


def test_batcher_merges_requests_that_arrive_while_the_engine_is_busy() -> None:
    runner = GatedRunner()
    batcher = Batcher("m", [runner], BatchPolicy(max_batch_size=8))
    batcher.start()
    col = Collector(4)
    try:
        batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, col.done)
        assert runner.entered.wait(10)  # the first request runs alone, at once
        for i in range(3):
            batcher.submit({"x": np.full((1, 2), i, np.float32)}, 1, col.done)
        runner.release.set()
        assert col.all_done.wait(10)
    finally:
        batcher.close()
    assert runner.batches == [1, 3]
    assert all(err is None for _, err in col.results)
    assert runner.closed


def test_batcher_delivers_engine_errors_to_every_caller_and_keeps_serving() -> None:
    class Failing:
        calls = 0

        def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            Failing.calls += 1
            if Failing.calls == 1:
                raise ValueError("boom")
            return {"y": inputs["x"]}

        def close(self) -> None:
            pass

    batcher = Batcher("m", [Failing()], BatchPolicy(max_batch_size=4))
    batcher.start()
    first, second = Collector(1), Collector(1)
    try:
        batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, first.done)
        assert first.all_done.wait(10)
        batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, second.done)
        assert second.all_done.wait(10)
    finally:
        batcher.close()
    err = first.results[0][1]
    assert isinstance(err, EngineFailedError) and err.http_status == 500 and "'m'" in str(err)
    assert "boom" not in str(err)  # the engine's own text goes to the log, not to the client
    assert second.results[0][1] is None


def test_request_that_waits_past_its_timeout_fails_without_running() -> None:
    clock = FakeClock()
    runner = GatedRunner()
    batcher = Batcher("m", [runner], BatchPolicy(max_batch_size=4), clock=clock)
    batcher.start()
    first, late = Collector(1), Collector(1)
    try:
        batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, first.done)
        assert runner.entered.wait(10)
        batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, late.done, timeout_s=0.5)
        clock.now += 1.0  # the queued request's deadline passes while the engine is busy
        runner.release.set()
        assert late.all_done.wait(10)
    finally:
        batcher.close()
    assert isinstance(late.results[0][1], RequestTimeoutError)
    assert runner.batches == [1]


def test_closed_batcher_refuses_new_work_but_finishes_queued_work() -> None:
    runner = GatedRunner()
    batcher = Batcher("m", [runner], BatchPolicy(max_batch_size=1))
    batcher.start()
    col = Collector(2)
    batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, col.done)
    assert runner.entered.wait(10)
    batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, col.done)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    with pytest.raises(ShuttingDownError):
        # close() marks the batcher closing before it joins; wait for that flag through the condition
        with batcher._cond:
            batcher._cond.wait_for(lambda: batcher._closing, timeout=10)
        batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, col.done)
    runner.release.set()
    closer.join(10)
    assert col.all_done.is_set()
    assert all(err is None for _, err in col.results)
    assert runner.batches == [1, 1]


def test_an_idle_batcher_lends_its_instance_and_the_worker_waits_for_it() -> None:
    runner = GatedRunner()
    runner.release.set()
    batcher = Batcher("m", [runner], BatchPolicy(max_batch_size=4))
    batcher.start()
    col = Collector(1)
    try:
        lent = batcher.lend()
        assert lent is runner and batcher.busy == 1
        assert batcher.lend() is None  # one caller at a time
        batcher.give_back(lent, rows=2, compute_s=0.002)
        assert batcher.row_seconds == pytest.approx(0.001) and batcher.busy == 0
        with pytest.raises(RuntimeError, match="not lent"):
            batcher.give_back(runner, rows=1, compute_s=0.001)
        lent = batcher.lend()
        assert lent is runner
        batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, col.done)  # queued while lent: must wait
        assert not col.all_done.wait(0.05)  # bounded check that the worker did not run it meanwhile
        assert runner.batches == []
        batcher.give_back(lent, rows=1, compute_s=0.001)
        assert col.all_done.wait(10)  # given back: the worker takes the queued request
    finally:
        batcher.close()
    assert runner.batches == [1]


def test_a_batcher_told_not_to_lend_never_lends_and_still_runs_requests() -> None:
    runner = GatedRunner()
    runner.release.set()
    batcher = Batcher("m", [runner], BatchPolicy(max_batch_size=4), lends="await")  # e.g. Ray handle calls
    batcher.start()
    col = Collector(1)
    try:
        assert batcher.lend() is None  # idle, nothing queued: still nothing lent to run in this thread
        batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, col.done)
        assert col.all_done.wait(10)
    finally:
        batcher.close()
    assert runner.batches == [1]


class AwaitedRunner:
    """A runner whose run is awaited (as a Ray Serve handle call is); ``mode`` says what the next run does."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.probes = 0
        self.release = asyncio.Event()

    async def run_async(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.mode == "raise":
            raise ValueError("bad row")
        if self.mode == "hang":
            await self.release.wait()
        return {"y": inputs["x"] + 1}

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:  # the probe, off the loop
        self.probes += 1
        if self.mode == "raise" and not self.probes_pass:
            raise RuntimeError("engine broken")
        return {"y": inputs["x"] + 1}

    probes_pass = True

    def close(self) -> None:
        pass


def test_an_awaited_lent_run_answers_failures_and_timeouts_and_gives_the_instance_back() -> None:
    runner = AwaitedRunner()
    feed = {"x": np.zeros((1, 2), np.float32)}
    policy = BatchPolicy(max_batch_size=4, compute_timeout_s=0.2, fail_after=5)
    batcher = Batcher("m", [runner], policy, lends="await", probe=lambda r: r.run(feed))
    batcher.start()

    async def once() -> dict[str, np.ndarray]:
        lent = batcher.lend(awaiting=True)
        assert lent is runner and batcher.lend(awaiting=True) is None  # one at a time
        return await batcher.run_lent_async(lent, feed, 1)

    try:
        assert batcher.lend() is None  # never lent to run in the caller's thread
        np.testing.assert_array_equal(asyncio.run(once())["y"], feed["x"] + 1)
        assert batcher.busy == 0 and batcher.row_seconds > 0  # given back, its time recorded
        runner.mode = "raise"  # the probe runs: the inputs were at fault, nothing counts against the model
        with pytest.raises(EngineInputError):
            asyncio.run(once())
        assert runner.probes == 1 and batcher.busy == 0 and not batcher.unhealthy
        runner.probes_pass = False  # the probe fails too: the engine is failing
        with pytest.raises(EngineFailedError):
            asyncio.run(once())
        assert batcher.lend(awaiting=True) is None  # failing of late: its runs go through the workers
    finally:
        batcher.close()
    runner.mode = "hang"  # past compute_timeout_s: answered here, counted once
    batcher = Batcher("m", [runner], policy, lends="await", probe=lambda r: r.run(feed))
    batcher.start()
    try:
        with pytest.raises(ComputeTimeoutError):
            asyncio.run(once())
        assert batcher.busy == 0 and batcher.unhealthy  # a compute timeout marks the model unhealthy
    finally:
        batcher.close()


def test_a_busy_or_queued_batcher_lends_nothing() -> None:
    runner = GatedRunner()
    batcher = Batcher("m", [runner], BatchPolicy(max_batch_size=4))
    batcher.start()
    col = Collector(1)
    try:
        batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, col.done)
        assert runner.entered.wait(10)
        assert batcher.lend() is None
        runner.release.set()
        assert col.all_done.wait(10)
    finally:
        batcher.close()


def test_a_batch_runs_with_its_requests_ids_in_the_worker_threads_log_context() -> None:
    seen: list[str] = []

    class Recording(GatedRunner):
        def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            seen.append(logs.request_id.get())
            return super().run(inputs)

    runner = Recording()
    batcher = Batcher("m", [runner], BatchPolicy(max_batch_size=8))
    batcher.start()
    col = Collector(3)
    try:
        for rid in ("first", "second", "third"):
            logs.request_id.set(rid)  # what the front end sets for the request it is serving
            batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1, col.done)
            if rid == "first":
                assert runner.entered.wait(10)  # the first runs alone; the other two queue behind it
        runner.release.set()
        assert col.all_done.wait(10)
    finally:
        logs.request_id.set("")
        batcher.close()
    assert runner.batches == [1, 2]
    assert seen == ["first", "second,third"]


# ---- batching that earns its place: merge only as far as the measured curve pays ----------------------
def test_merge_limit_follows_the_measured_batch_size_curve() -> None:
    from kiln.execution.admission import merge_limit

    flat = {1: 4e-3, 2: 8e-3, 4: 16.1e-3, 8: 32e-3, 16: 64e-3}  # a CPU CNN: the same rows/s at any size
    assert merge_limit(flat) == 1
    knee = {1: 4e-3, 2: 4.4e-3, 4: 5e-3, 8: 8e-3, 16: 16e-3, 32: 32e-3}  # a GPU: pays up to 8, then flat
    assert merge_limit(knee) == 8
    tiny = {1: 20e-6, 2: 40e-6, 4: 80e-6, 8: 160e-6}  # engine time flat per row, but the per-batch cost dominates
    assert merge_limit(tiny) > 1
    assert merge_limit({}) == 1 and merge_limit({1: 0.0}) == 1


def test_merge_cap_stops_where_larger_batches_lose_rows_per_second() -> None:
    from kiln.execution.admission import merge_cap

    falling = {1: 1 / 858, 2: 2 / 859, 4: 4 / 840, 8: 8 / 801, 16: 16 / 751, 32: 32 / 809}  # measured here
    assert merge_cap(falling, overhead_s=0) == 4
    rising = {1: 4e-3, 2: 4.4e-3, 4: 5e-3, 8: 8e-3, 16: 16e-3, 32: 32e-3}  # flat from 8 on: merging is free
    assert merge_cap(rising, overhead_s=0) == 32
    assert merge_cap({}) == 1


def test_merge_rows_one_never_merges_nor_waits_yet_runs_a_large_request_whole() -> None:
    clock = FakeClock()
    q = BatchQueue("m", BatchPolicy(max_batch_size=8, max_queue_delay_s=1.0, merge_rows=1))
    big, a, b = _req(clock, rows=5), _req(clock), _req(clock)
    for r in (big, a, b):
        q.put(r)
    for want in (big, a, b):  # one request per batch, each leaving at once despite the 1 s delay
        take = q.take(clock())
        assert take.batch == [want] and take.wait_s is None


def test_merge_rows_caps_a_merged_batch_below_max_batch() -> None:
    clock = FakeClock()
    q = BatchQueue("m", BatchPolicy(max_batch_size=8, merge_rows=2))
    reqs = [_req(clock, tag=i) for i in range(5)]
    for r in reqs:
        q.put(r)
    assert [len(q.take(clock()).batch) for _ in range(3)] == [2, 2, 1]


def test_auto_wait_sets_the_rows_a_batch_waits_for_from_the_warm_up_curve() -> None:
    runner = GatedRunner()
    batcher = Batcher("m", [runner], BatchPolicy(max_batch_size=16, max_queue_delay_s=1.0, auto_wait=True))
    batcher.seed({1: 4e-3, 2: 8e-3, 16: 64e-3})  # flat: waiting for more rows gains nothing
    assert batcher.policy.wait_rows == 1 and batcher.queue.policy.wait_rows == 1
    assert batcher.policy.merge_limit == 16  # merging what is queued costs nothing
    clock = FakeClock()
    q = batcher.queue
    a = _req(clock)
    q.put(a)
    take = q.take(clock())  # alone, with a 1 s delay configured: leaves at once
    assert take.batch == [a] and take.wait_s is None
    reqs = [_req(clock, tag=i) for i in range(3)]
    for r in reqs:
        q.put(r)
    assert q.take(clock()).batch == reqs  # queued behind a busy engine: still merged (free when flat)
    fixed = Batcher("m", [runner], BatchPolicy(max_batch_size=16))  # dynamic_batching: on
    fixed.seed({1: 4e-3, 2: 8e-3, 16: 64e-3})
    assert fixed.policy.wait_rows == 0


def test_auto_batching_warms_the_powers_of_two_that_trace_the_curve() -> None:
    from kiln.execution.instances import warmup_sizes
    from kiln.spec import ServingSettings

    assert warmup_sizes(ServingSettings(max_batch_size=32)) == [1, 2, 4, 8, 16, 32]
    assert warmup_sizes(ServingSettings(max_batch_size=32, dynamic_batching="on")) == [1, 32]
    assert warmup_sizes(ServingSettings(max_batch_size=0)) == [1]
