"""Fallback to the reference variant: rerun on failure, latch after repeated failures."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from kiln.serving.runner import FallbackState, ModelRunner


class Engine:
    def __init__(self, fail: bool, offset: float) -> None:
        self.fail = fail
        self.offset = offset
        self.calls = 0
        self.closed = False

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("variant broke")
        return {"y": inputs["x"] + self.offset}

    def close(self) -> None:
        self.closed = True


def test_failures_rerun_on_the_reference_and_latch_after_the_limit() -> None:
    chosen, reference = Engine(fail=True, offset=1), Engine(fail=False, offset=2)
    fallbacks: list[int] = []
    runner = ModelRunner(chosen, lambda: reference, FallbackState(2), "m:1", lambda: fallbacks.append(1))
    x = {"x": np.zeros(2, np.float32)}
    assert runner.run(x)["y"].tolist() == [2, 2]
    assert not runner.state.latched
    assert runner.run(x)["y"].tolist() == [2, 2]
    assert runner.state.latched and len(fallbacks) == 2
    runner.run(x)
    assert chosen.calls == 2  # latched: the chosen variant is no longer tried
    runner.close()
    assert chosen.closed and reference.closed


def test_a_success_resets_the_count_and_no_reference_means_the_error_surfaces() -> None:
    chosen = Engine(fail=True, offset=1)
    state = FallbackState(2)
    runner = ModelRunner(chosen, lambda: Engine(False, 2), state, "m:1")
    x = {"x": np.zeros(1, np.float32)}
    runner.run(x)
    chosen.fail = False
    assert runner.run(x)["y"].tolist() == [1]
    assert state.consecutive == 0 and state.total == 1
    alone = ModelRunner(Engine(fail=True, offset=0), None, FallbackState(1), "m:1")
    with pytest.raises(RuntimeError, match="variant broke"):
        alone.run(x)
