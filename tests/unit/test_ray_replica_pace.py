"""Where a Ray replica runs a batch: on its event loop when the batch is expected to be short, else in a
thread (a long batch must not hold up the loop that answers Serve's health checks). No Ray import: a Ray
imported before the cluster fixtures set token auth would start its clusters without it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from kiln.ray.pace import _INLINE_BELOW_S
from kiln.ray.pace import Pace as _Pace


class _Runner:
    """Records the thread each batch ran on; takes ``seconds`` of wall time per row, measured by the pace."""

    def __init__(self, clock: list[float], seconds_per_row: float) -> None:
        self.threads: list[int] = []
        self.clock = clock
        self.seconds_per_row = seconds_per_row

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.append(threading.get_ident())
        x = inputs["x"]
        self.clock[0] += self.seconds_per_row * x.shape[0]
        return {"y": x * 2}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [0.0]
    import time

    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    return now


def _run(pace: _Pace, runner: Any, rows: int) -> tuple[np.ndarray, int]:
    async def go() -> tuple[np.ndarray, int]:
        out = await pace.run(runner, {"x": np.ones((rows, 2), np.float32)})
        return out["y"], threading.get_ident()

    return asyncio.run(go())


def test_a_short_batch_runs_on_the_loop_and_a_long_one_in_a_thread(clock: list[float]) -> None:
    runner = _Runner(clock, seconds_per_row=_INLINE_BELOW_S / 10)
    pace = _Pace(row_seconds=_INLINE_BELOW_S / 10)
    y, loop_thread = _run(pace, runner, rows=1)
    assert runner.threads[-1] == loop_thread
    assert np.array_equal(y, np.full((1, 2), 2.0))
    _run(pace, runner, rows=20)  # 20 rows x a tenth of the bound: expected at twice the bound
    assert runner.threads[-1] != loop_thread


def test_an_unknown_time_goes_to_a_thread_and_the_measured_times_steer_the_next(clock: list[float]) -> None:
    runner = _Runner(clock, seconds_per_row=_INLINE_BELOW_S / 4)
    pace = _Pace(row_seconds=None)  # no warm-up time
    assert not pace.inline(1)
    _, loop_thread = _run(pace, runner, rows=1)
    assert runner.threads[-1] != loop_thread
    assert pace.row_seconds == pytest.approx(_INLINE_BELOW_S / 4)
    _, loop_thread = _run(pace, runner, rows=1)
    assert runner.threads[-1] == loop_thread
    runner.seconds_per_row = _INLINE_BELOW_S * 4  # the model slowed down (a bigger input, a busy node)
    for _ in range(10):
        _run(pace, runner, rows=1)
    assert not pace.inline(1)
    _, loop_thread = _run(pace, runner, rows=1)
    assert runner.threads[-1] != loop_thread
