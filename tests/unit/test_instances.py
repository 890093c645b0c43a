"""Fallback to the reference variant: rerun on failure, latch after repeated failures; warm-up sizes."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from kiln.execution.instances import FallbackState, ModelRunner, warm_up, warmup_sizes
from kiln.spec import ModelSpec, ServingSettings, TensorSpec


class Engine:
    def __init__(self, fail: bool, offset: float) -> None:
        self.fail = fail
        self.offset = offset
        self.calls = 0
        self.rows: list[int] = []
        self.closed = False

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        self.rows.append(inputs["x"].shape[0])
        if self.fail:
            raise RuntimeError("variant broke")
        return {"y": inputs["x"] + self.offset}

    def close(self) -> None:
        self.closed = True


def test_failures_rerun_on_the_reference_and_latch_after_the_limit() -> None:
    chosen, reference = Engine(fail=True, offset=1), Engine(fail=False, offset=2)
    fallbacks: list[int] = []
    runner = ModelRunner(chosen, reference, FallbackState(2), "m:1", lambda: fallbacks.append(1))
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
    runner = ModelRunner(chosen, Engine(False, 2), state, "m:1")
    x = {"x": np.zeros(1, np.float32)}
    runner.run(x)
    chosen.fail = False
    assert runner.run(x)["y"].tolist() == [1]
    assert state.consecutive == 0 and state.total == 1
    alone = ModelRunner(Engine(fail=True, offset=0), None, FallbackState(1), "m:1")
    with pytest.raises(RuntimeError, match="variant broke"):
        alone.run(x)


def test_instances_sharing_a_reference_close_it_once() -> None:
    shared = Engine(fail=False, offset=2)
    closes: list[str] = []
    shared.close = lambda: closes.append("reference")  # type: ignore[method-assign]
    state = FallbackState(3)
    runners = [ModelRunner(Engine(True, 1), shared, state, "m:1", owns_reference=i == 0) for i in range(2)]
    x = {"x": np.zeros((1, 2), np.float32)}
    assert [r.run(x)["y"].tolist() for r in runners] == [[[2, 2]], [[2, 2]]]
    for r in runners:
        r.close()
    assert closes == ["reference"]


def _spec(**serving: object) -> ModelSpec:
    return ModelSpec(
        name="m",
        inputs=[TensorSpec(name="x", dtype="float32", shape=(-1, 2))],
        outputs=[TensorSpec(name="y", dtype="float32", shape=(-1, 2))],
        serving=ServingSettings(**serving),  # type: ignore[arg-type]
    )


def test_warm_up_reaches_the_largest_preferred_size_and_max_batch_size() -> None:
    on = {"dynamic_batching": "on"}  # auto also warms the powers of two between (see test_batcher)
    assert warmup_sizes(ServingSettings(max_batch_size=16, preferred_batch_sizes=[8, 2], **on)) == [1, 8, 16]
    assert warmup_sizes(ServingSettings(max_batch_size=4, **on)) == [1, 4]
    assert warmup_sizes(ServingSettings(max_batch_size=4)) == [1, 2, 4]
    assert warmup_sizes(ServingSettings(max_batch_size=0)) == [1]
    chosen, reference = Engine(False, 1), Engine(False, 2)
    state = FallbackState(3)
    runners = [ModelRunner(Engine(False, 1), reference, state, "m:1", owns_reference=i == 0) for i in range(2)]
    runners[0].primary = chosen
    seconds = warm_up(runners, _spec(max_batch_size=8, preferred_batch_sizes=[4, 2], dynamic_batching="on"))
    # each size warmed, then timed 3 to 5 times (5 here: a fake engine's runs take no time)
    assert chosen.rows == [1] * 6 + [4] * 6 + [8] * 6
    assert runners[1].primary.rows == [1, 4, 8]
    assert reference.rows == [1, 4, 8]  # the shared reference is warmed once, before any fallback needs it
    assert sorted(seconds) == [1, 4, 8] and all(0 <= t < 1 for t in seconds.values())
