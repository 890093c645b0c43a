"""Timing a loaded engine: batch-1 median latency and batch-N throughput, after warm-up, each for at
least a fixed time so that every variant gets the same chance on a noisy shared machine.

The time is split into rounds and the best round's median is kept: another process taking the cores
for a second inflates one round, not the figure. :func:`interleave` times finalists round-robin, so
that a burst of load hits them all alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Run = Callable[[Mapping[str, np.ndarray]], Any]


@dataclass(frozen=True)
class Timing:
    latency_ms: float  # batch-1 median
    latency_p90_ms: float
    throughput: float  # items/s at ``batch``
    batch: int
    first_run_s: float  # the first calls at batch 1 and N: includes torch.compile's compile time
    load_s: float
    iterations: int
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _loop(run: Run, feed: Mapping[str, np.ndarray], min_time_s: float, min_iters: int) -> list[float]:
    times: list[float] = []
    deadline = time.perf_counter() + min_time_s
    while len(times) < min_iters or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        run(feed)
        times.append(time.perf_counter() - t0)
        if len(times) >= 100_000:
            break
    return times


def measure(
    run: Run,
    feed1: Mapping[str, np.ndarray],
    feed_n: Mapping[str, np.ndarray],
    *,
    min_time_s: float,
    warmup: int,
    load_s: float,
    threads: int,
    rounds: int = 3,
) -> Timing:
    """Warm up (the first calls at both batch sizes are timed apart: compile time), then time."""
    t0 = time.perf_counter()
    run(feed1)
    run(feed_n)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        run(feed1)
    for _ in range(max(2, warmup // 4)):
        run(feed_n)
    batch = len(next(iter(feed_n.values())))
    lat_rounds, tput_rounds = [], []
    for _ in range(rounds):
        lat_rounds.append(np.array(_loop(run, feed1, min_time_s / rounds, min_iters=5)) * 1e3)
        tput_rounds.append(np.array(_loop(run, feed_n, min_time_s / rounds, min_iters=2)))
    best = min(lat_rounds, key=lambda a: float(np.median(a)))
    return Timing(
        latency_ms=float(np.median(best)),
        latency_p90_ms=float(np.percentile(best, 90)),
        throughput=max(float(batch / np.median(r)) for r in tput_rounds),
        batch=batch,
        first_run_s=round(first, 3),
        load_s=round(load_s, 3),
        iterations=sum(len(r) for r in lat_rounds) + sum(len(r) for r in tput_rounds),
        threads=threads,
    )


def interleave(
    runs: list[Run],
    feed1: Mapping[str, np.ndarray],
    feed_n: Mapping[str, np.ndarray],
    *,
    min_time_s: float,
    rounds: int = 3,
) -> list[tuple[float, float]]:
    """(batch-1 median ms, items/s) for warm engines timed round-robin; best round of each."""
    batch = len(next(iter(feed_n.values())))
    lat: list[list[float]] = [[] for _ in runs]
    tput: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for i, run in enumerate(runs):
            lat[i].append(float(np.median(_loop(run, feed1, min_time_s / rounds, min_iters=5))) * 1e3)
            tput[i].append(batch / float(np.median(_loop(run, feed_n, min_time_s / rounds, min_iters=2))))
    return [(min(a), max(b)) for a, b in zip(lat, tput, strict=True)]
