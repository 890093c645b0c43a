from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from kiln.bench.report import CompareError, compare
from kiln.bench.scenarios import poisson_arrivals, scheduled_run, search_max, stream_arrivals
from kiln.bench.stats import latency_stats, spread, timed_loop


def test_latency_stats_in_milliseconds() -> None:
    stats = latency_stats([0.001] * 98 + [0.010, 0.020])
    assert stats.count == 100
    assert stats.p50_ms == pytest.approx(1.0)
    assert stats.max_ms == pytest.approx(20.0)
    assert 1.0 < stats.p99_ms <= 20.0
    assert latency_stats([]).count == 0


def test_spread_is_relative_to_the_median() -> None:
    sp = spread([1.0, 1.1, 1.3])
    assert (sp.min, sp.median, sp.max) == (1.0, 1.1, 1.3)
    assert sp.relative == pytest.approx(0.3 / 1.1)


def test_timed_loop_respects_min_iterations_and_cap() -> None:
    calls = []
    times = timed_loop(lambda: calls.append(1), min_time_s=1e-9, min_iters=7, max_iters=1000)
    assert len(times) == len(calls) == 7
    assert len(timed_loop(lambda: None, min_time_s=60, min_iters=1, max_iters=5)) == 5


@pytest.mark.parametrize("limit", [3.0, 237.0, 1000.0])
def test_search_max_finds_the_threshold(limit: float) -> None:
    found = search_max(lambda q: q <= limit, start=10, steps=8)
    assert found <= limit
    assert found >= limit * 0.9 or limit < 10


def test_search_max_on_integers() -> None:
    assert search_max(lambda n: n <= 13, start=2, integer=True, steps=10) == 13


def test_arrivals() -> None:
    a = poisson_arrivals(200, 10, seed=1)
    assert len(a) == 2000 and np.all(np.diff(a) > 0)
    assert np.mean(np.diff(a)) == pytest.approx(1 / 200, rel=0.1)
    s = stream_arrivals(3, 30, 2, seed=0)
    assert len(s) == 3 * 60
    assert s[-1] < 2.0 + 1 / 30


class InstantSubmitter:
    def __init__(self, fail_every: int = 0, reject_every: int = 0) -> None:
        self.pool = ThreadPoolExecutor(2)
        self.n = 0
        self.lock = threading.Lock()
        self.fail_every, self.reject_every = fail_every, reject_every

    def submit(self, inputs: dict[str, np.ndarray]) -> Future[Any]:
        with self.lock:
            self.n += 1
            n = self.n
        if self.reject_every and n % self.reject_every == 0:
            raise RuntimeError("queue full")

        def work() -> int:
            if self.fail_every and n % self.fail_every == 0:
                raise ValueError("engine failed")
            return n

        return self.pool.submit(work)


def test_scheduled_run_counts_every_outcome() -> None:
    sub = InstantSubmitter(fail_every=5, reject_every=7)
    arrivals = np.linspace(0.001, 0.2, 70)
    stats = scheduled_run(sub, {}, arrivals)
    assert stats.sent == 70
    assert stats.rejected == 10
    assert stats.failed == len([n for n in range(1, 71) if n % 5 == 0 and n % 7 != 0])
    assert stats.completed == stats.sent - stats.rejected - stats.failed
    assert not stats.meets(slo_ms=1000)
    clean = scheduled_run(InstantSubmitter(), {}, arrivals)
    assert clean.completed == 70 and clean.meets(slo_ms=1000)


def _bench_json(p50: float, ips: float) -> dict[str, Any]:
    return {"variants": [{"variant": "reference", "batches": [{"batch": 1, "latency": {"p50_ms": p50}, "items_per_s": ips}]}],
            "scenarios": [{"scenario": "offline", "variant": "reference", "metrics": {"items_per_s": ips}}]}  # fmt: skip


def test_compare_flags_regressions_beyond_the_threshold() -> None:
    same = compare(_bench_json(1.0, 1000), _bench_json(1.05, 960), threshold=0.10)
    assert not same.regressions
    slower = compare(_bench_json(1.0, 1000), _bench_json(1.3, 770), threshold=0.10)
    assert {r.metric for r in slower.regressions} == {"p50 ms", "items/s", "items_per_s"}
    faster = compare(_bench_json(1.0, 1000), _bench_json(0.5, 2000), threshold=0.10)
    assert not faster.regressions


def test_compare_needs_something_in_common() -> None:
    other = _bench_json(1.0, 1.0)
    other["variants"][0]["variant"] = "abc"
    other["scenarios"] = []
    with pytest.raises(CompareError, match="share no variant"):
        compare(_bench_json(1.0, 1.0), other)
