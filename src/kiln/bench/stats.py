"""Latency statistics and the timed loop every benchmark in kiln uses."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    count: int
    mean_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def latency_stats(seconds: np.ndarray | list[float]) -> LatencyStats:
    arr = np.asarray(seconds, dtype=np.float64) * 1e3
    if arr.size == 0:
        nan = float("nan")
        return LatencyStats(0, nan, nan, nan, nan, nan, nan)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return LatencyStats(int(arr.size), float(arr.mean()), float(arr.min()), float(p50), float(p90), float(p99),
                        float(arr.max()))  # fmt: skip


@dataclass(frozen=True)
class Spread:
    """How much repeats of the same measurement disagree (machines are noisy)."""

    min: float
    median: float
    max: float

    @property
    def relative(self) -> float:
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "relative": self.relative}


def spread(values: list[float]) -> Spread:
    arr = np.asarray(values, dtype=np.float64)
    return Spread(float(arr.min()), float(np.median(arr)), float(arr.max()))


def timed_loop(fn: Callable[[], object], min_time_s: float, min_iters: int, max_iters: int) -> list[float]:
    """Call ``fn`` until both ``min_time_s`` and ``min_iters`` are reached; per-call seconds."""
    times: list[float] = []
    clock = time.perf_counter
    deadline = clock() + min_time_s
    while len(times) < max_iters:
        t0 = clock()
        fn()
        t1 = clock()
        times.append(t1 - t0)
        if len(times) >= min_iters and t1 >= deadline:
            break
    return times
