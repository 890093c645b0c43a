"""The model manager and service in process: version policies, reload races, lazy loads, errors,
instances in parallel, the fallback's reference, warm-up, metric series, per-request timeouts, predictive
eviction, prefetch, the snapshot a restart restores, and the memory an unload hands back."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kiln
from kiln.errors import ModelNotReadyError, NotFoundError, ProtocolError
from kiln.execution import instances as runner_module
from kiln.execution.batcher import Batcher
from kiln.execution.errors import RequestTimeoutError
from kiln.repository import VARIANTS_DIR, Repository
from kiln.serving.demand import LoadOrigin
from kiln.serving.manager import ModelManager
from kiln.serving.metrics import Metrics
from kiln.serving.protocol import InferRequest
from kiln.serving.service import Service
from kiln.serving.settings import ServerSettings
from tests import models
from tests.fixtures.serving_engines import Hold, add_gate_variant, gate


def _repo(tmp_path: Path, versions: int) -> Path:
    repo = tmp_path / "repo"
    for v in range(1, versions + 1):
        kiln.import_model(models.add_model(tmp_path / f"v{v}.onnx", const=float(v)), repo, name="m")
    return repo


def _service(repo: Path, **settings: object) -> Service:
    s = ServerSettings(repo=repo, engine_threads=1, **settings)  # type: ignore[arg-type]
    metrics = Metrics()
    return Service(s, ModelManager(s, metrics), metrics)


def _x() -> InferRequest:
    return InferRequest(id="", inputs={"x": np.zeros((1, 4), np.float32)})


def test_a_request_that_resolved_the_old_version_follows_a_reload(tmp_path: Path) -> None:
    repo = _repo(tmp_path, 1)
    service = _service(repo, inline_below_ms=0)

    async def scenario() -> float:
        await service.manager.start()
        old = await service.resolve("m", None)
        kiln.import_model(models.add_model(tmp_path / "v2.onnx", const=2.0), repo, name="m")
        await service.manager.load("m")  # version 2 replaces 1; 1's batcher is closed
        out = await service.infer(old, _x())  # resolved before the switch, submitted after it
        await service.manager.close()
        return float(out["y"][0, 0])

    assert asyncio.run(scenario()) == 2.0


def test_version_policies_choose_what_is_served(tmp_path: Path) -> None:
    repo = _repo(tmp_path, 3)
    repository = Repository(repo)
    spec = repository.spec("m")

    def serve_with(**policy: object) -> list[int]:
        repository.save_spec(spec.model_copy(update={"serving": spec.serving.model_copy(update=policy)}))
        service = _service(repo)

        async def scenario() -> list[int]:
            await service.manager.start()
            served = sorted(service.manager.entries["m"].versions)
            default = await service.resolve("m", None)
            assert default.version == served[-1]
            out = await service.infer(await service.resolve("m", str(served[0])), _x())
            assert out["y"][0, 0] == served[0]  # each version adds its own number
            await service.manager.close()
            return served

        return asyncio.run(scenario())

    assert serve_with(version_policy="latest", num_versions=1) == [3]
    assert serve_with(version_policy="latest", num_versions=2) == [2, 3]
    assert serve_with(version_policy="all") == [1, 2, 3]
    assert serve_with(version_policy="specific", versions=[1, 3]) == [1, 3]


def test_unserved_versions_unknown_models_and_unloaded_models_say_why(tmp_path: Path) -> None:
    repo = _repo(tmp_path, 2)
    service = _service(repo)

    async def scenario() -> None:
        with pytest.raises(ModelNotReadyError, match="not loaded; load it with POST"):
            await service.resolve("m", None)  # preload mode, start() not called yet
        await service.manager.start()
        with pytest.raises(
            NotFoundError, match=r"version 1 is not served: its version policy \(latest 1\) serves \[2\]"
        ):
            await service.resolve("m", "1")
        with pytest.raises(NotFoundError, match=r"has no version 7; available versions: \[1, 2\]"):
            await service.resolve("m", "7")
        with pytest.raises(NotFoundError, match="'nope' is not in the repository"):
            await service.resolve("nope", None)
        await service.manager.close()

    asyncio.run(scenario())


def test_lazy_mode_loads_once_for_concurrent_first_requests(tmp_path: Path) -> None:
    repo = _repo(tmp_path, 1)
    service = _service(repo, load_mode="lazy")

    async def scenario() -> None:
        await service.manager.start()
        assert not service.manager.is_ready("m")
        svs = await asyncio.gather(*(service.resolve("m", None) for _ in range(5)))
        assert len({id(sv) for sv in svs}) == 1  # one load, shared by all five
        assert service.metrics.load_seconds.labels("m")._sum.get() > 0  # timed once
        await service.manager.close()

    asyncio.run(scenario())


def test_two_instances_run_batches_in_parallel_threads(tmp_path: Path) -> None:
    repo = _repo(tmp_path, 1)
    add_gate_variant(repo, "m", instances=2, max_batch_size=1)  # one row a batch: each request its own run
    service = _service(repo, inline_below_ms=0)
    both_inside = threading.Barrier(2, timeout=10)  # a run passes only once the other instance runs too

    def meet(inputs: Mapping[str, np.ndarray]) -> None:
        both_inside.wait()

    async def scenario() -> list[float]:
        await service.manager.start()
        sv = await service.resolve("m", None)
        assert len(sv.batcher.runners) == 2
        g.hook = meet
        reqs = [InferRequest(id="", inputs={"x": np.full((1, 4), i, np.float32)}) for i in range(8)]
        outs = await asyncio.gather(*(service.infer(sv, r) for r in reqs))
        await service.manager.close()
        return [float(o["y"][0, 0]) for o in outs]

    with gate() as g:
        assert asyncio.run(scenario()) == [i + 10.0 for i in range(8)]  # no run timed out at the barrier
    assert not both_inside.broken


def _recording_loads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every engine load of the serving runner: its variant, its thread and the threads of its runs."""
    loads: list[dict[str, Any]] = []
    real_load = runner_module.open_variant

    def load(variant: Any, **kwargs: Any) -> Any:
        predictor = real_load(variant, **kwargs)
        rec: dict[str, Any] = {"variant": variant.id, "thread": threading.get_ident(), "runs": []}
        real_run = predictor.engine.run

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            rec["runs"].append(threading.get_ident())
            return real_run(inputs)

        predictor.engine.run = run  # type: ignore[method-assign]
        loads.append(rec)
        return predictor

    monkeypatch.setattr(runner_module, "open_variant", load)
    return loads


def test_the_reference_loads_and_warms_with_the_model_shared_by_instances_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _repo(tmp_path, 1)  # the reference: y = x + 1 on ONNX Runtime
    add_gate_variant(repo, "m", const=10.0, instances=2)  # the chosen variant: y = x + 10
    loads = _recording_loads(monkeypatch)
    service = _service(repo, inline_below_ms=3)  # inline runs on: an idle server runs the engine on the loop thread

    def broken(inputs: Mapping[str, np.ndarray]) -> None:
        raise RuntimeError("the chosen variant broke")

    async def scenario() -> None:
        loop_thread = threading.get_ident()
        await service.manager.start()
        sv = await service.resolve("m", None)
        assert [r["variant"] for r in loads] == ["gate", "gate", "reference"]  # one reference for both
        assert all(r["thread"] != loop_thread for r in loads)  # loaded off the event loop
        # warmed at batch 1, 2, 4 … 32 (dynamic_batching auto traces the curve) before the model reported ready
        assert len(loads[2]["runs"]) == 6
        gate_bytes = (repo / "m" / "1" / VARIANTS_DIR / "gate" / "gate.json").stat().st_size  # what the engine reads
        onnx_bytes = (repo / "m" / "1" / "model.onnx").stat().st_size
        assert sv.memory_bytes == 2 * gate_bytes + onnx_bytes
        assert service.metrics.memory_bytes._value.get() == sv.memory_bytes
        g.hook = broken
        out = await service.infer(sv, _x())  # alone: inline, on this thread; the reference answers
        assert float(out["y"][0, 0]) == 1.0
        assert len(loads) == 3 and loads[2]["runs"][-1] == loop_thread  # ran on the loop, loaded nothing
        assert service.metrics.fallbacks.labels("m", "1")._value.get() == 1
        assert service.manager.engine("m") == "test-gate"
        await service.manager.close()

    with gate() as g:
        asyncio.run(scenario())


def test_warm_up_runs_the_largest_preferred_size_and_max_batch_size(tmp_path: Path) -> None:
    repo = _repo(tmp_path, 1)
    add_gate_variant(repo, "m", max_batch_size=8, preferred_batch_sizes=[4, 2], dynamic_batching="on")  # unsorted

    async def scenario() -> None:
        service = _service(repo)
        await service.manager.start()
        await service.manager.close()

    with gate() as g:
        asyncio.run(scenario())
        assert g.rows == [1] * 6 + [4] * 6 + [8] * 6  # each size warmed, then timed (5 runs: the gate takes no time)
    add_gate_variant(repo, "m", max_batch_size=8, dynamic_batching="auto")  # the powers of two as well
    with gate() as g:
        asyncio.run(scenario())
        assert g.rows == [1] * 6 + [2] * 6 + [4] * 6 + [8] * 6


def test_metric_series_of_retired_versions_go_with_them(tmp_path: Path) -> None:
    repo = _repo(tmp_path, 1)
    service = _service(repo)

    def series(name: str) -> list[str]:
        text = service.metrics.render().decode()
        return [line.split(" ")[0] for line in text.splitlines() if line.startswith(name + "{")]

    async def scenario() -> weakref.ref[Batcher]:
        await service.manager.start()
        old = weakref.ref(service.manager.entries["m"].versions[1].batcher)
        assert series("kiln_queue_depth") == ['kiln_queue_depth{model="m",version="1"}']
        kiln.import_model(models.add_model(tmp_path / "v2.onnx", const=2.0), repo, name="m")
        await service.manager.load("m")  # version 2 replaces 1
        assert series("kiln_queue_depth") == ['kiln_queue_depth{model="m",version="2"}']
        assert series("kiln_instances_busy") == ['kiln_instances_busy{model="m",version="2"}']
        await service.manager.load("m")  # a reload of the same version keeps its series
        assert series("kiln_queue_depth") == ['kiln_queue_depth{model="m",version="2"}']
        await service.manager.unload("m")
        assert series("kiln_queue_depth") == [] and series("kiln_instances_busy") == []
        return old

    old = asyncio.run(scenario())
    gc.collect()
    assert old() is None  # nothing (no gauge callback) keeps the retired batcher alive


def test_a_client_timeout_shorter_than_the_models_answers_504(tmp_path: Path) -> None:
    repo = _repo(tmp_path, 1)
    add_gate_variant(repo, "m")
    service = _service(repo, inline_below_ms=0)
    hold = Hold()

    async def scenario() -> None:
        await service.manager.start()
        sv = await service.resolve("m", None)
        assert sv.timeout_s == 30.0
        with pytest.raises(ProtocolError, match=r"parameters\.timeout: must be a whole number of microseconds"):
            await service.infer(sv, InferRequest(id="", inputs=_x().inputs, parameters={"timeout": "soon"}))
        g.hook = hold
        req = InferRequest(id="", inputs=_x().inputs, parameters={"timeout": 50_000})  # µs, as tritonclient sends
        with pytest.raises(RequestTimeoutError, match=r"did not finish within 0\.05 s"):
            await service.infer(sv, req)  # the engine still holds the run: the timeout answered
        hold.release()
        g.hook = None
        out = await service.infer(sv, InferRequest(id="", inputs=_x().inputs, parameters={"timeout": 0}))
        assert float(out["y"][0, 0]) == 10.0  # 0: no timeout of its own
        await service.manager.close()

    with gate() as g:
        try:
            asyncio.run(scenario())
        finally:
            hold.release()


def test_a_request_past_its_timeout_is_answered_504_while_the_engine_finishes(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    kiln.import_model(models.slow_model(tmp_path / "slow.onnx", layers=120), repo, name="slow")
    repository = Repository(repo)
    spec = repository.spec("slow")
    # The compute timeout defaults to the request's: set apart, so that the engine finishes its run (the
    # scenario) and the two 20 ms timers never race (CI once saw the batcher's fire first on a loaded box).
    serving = spec.serving.model_copy(update={"timeout_ms": 20, "compute_timeout_ms": 60_000, "max_batch_size": 256})
    repository.save_spec(spec.model_copy(update={"serving": serving}))
    service = _service(repo, inline_below_ms=0)

    async def scenario() -> None:
        await service.manager.start()
        sv = await service.resolve("slow", None)
        req = InferRequest(id="", inputs={"x": np.ones((256, 512), np.float32)})
        with pytest.raises(RequestTimeoutError, match=r"did not finish within 0\.02 s") as info:
            await service.infer(sv, req)
        assert info.value.http_status == 504
        await service.manager.close()  # drains: the engine's run finishes, then the version unloads

    asyncio.run(scenario())


# ---- predictive eviction, prefetch, the snapshot a restart restores, memory handed back ---------------------
MONDAY = 4 * 86400.0 + 2800 * 604800.0  # 00:00 UTC on a Monday: the usage clock of these tests


class _Clock:
    def __init__(self, t: float = MONDAY) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _models_repo(tmp_path: Path, names: str) -> Path:
    repo = tmp_path / "repo"
    for i, name in enumerate(names):
        kiln.import_model(models.add_model(tmp_path / f"{name}.onnx", const=float(i)), repo, name=name)
    return repo


def _managed(repo: Path, clock: _Clock, **settings: object) -> Service:
    s = ServerSettings(repo=repo, engine_threads=1, load_mode="lazy", prefetch_interval_s=3600, **settings)  # type: ignore[arg-type]
    metrics = Metrics()
    return Service(s, ModelManager(s, metrics, usage_clock=clock), metrics)


def _count(counter: Any, *labels: str) -> float:
    return float(counter.labels(*labels)._value.get())


async def _ask(service: Service, name: str) -> float:
    out = await service.infer(await service.resolve(name, None), _x())
    return float(out["y"][0, 0])


def test_a_restart_restores_the_snapshot_in_predicted_order_ready_after_the_first(tmp_path: Path) -> None:
    repo = _models_repo(tmp_path, "abc")
    clock = _Clock()

    async def first_run() -> None:
        service = _managed(repo, clock)
        await service.manager.start()
        for name, times in (("a", 1), ("b", 3), ("c", 10)):  # c the busiest and the most recent
            for _ in range(times):
                clock.t += 5
                await _ask(service, name)
        await service.manager.close()  # saves the history and the snapshot: a, b, c loaded

    asyncio.run(first_run())
    saved = json.loads((repo / ".kiln" / "usage.json").read_text())
    assert sorted(saved["loaded"]) == ["a", "b", "c"] and sorted(saved["models"]) == ["a", "b", "c"]
    loads: list[tuple[str, str]] = []

    async def second_run() -> list[str]:
        clock.t += 60
        service = _managed(repo, clock)
        manager = service.manager
        real_load = manager.load

        async def load(name: str, if_needed: bool = False, origin: LoadOrigin = LoadOrigin.EXPLICIT) -> Any:
            loads.append((name, origin.value))
            return await real_load(name, if_needed, origin)

        manager.load = load  # type: ignore[method-assign]
        await manager.start()
        ready_at_start = [n for n in "abc" if manager.is_ready(n)]  # what the server reports ready with
        assert manager.prefetcher is not None
        await manager.prefetcher.restored.wait()
        assert all(manager.is_ready(n) for n in "abc")
        assert await _ask(service, "a") == 0.0  # a, restored, serves: a prefetch hit
        m = service.metrics
        assert _count(m.prefetch_hits, "a") == 1 and _count(m.cold_loads, "a") == 0
        assert [_count(m.prefetches, n, "restore") for n in "abc"] == [1, 1, 1]
        await manager.close()
        assert _count(m.prefetch_wasted, "b") == 1 and _count(m.prefetch_wasted, "a") == 0  # b never served
        return ready_at_start

    assert asyncio.run(second_run()) == ["b", "c"]
    assert loads == [("c", "restore"), ("b", "restore"), ("a", "restore")]  # by forecast, not as saved


def test_predictive_eviction_keeps_the_model_due_soon_where_lru_evicts_it(tmp_path: Path) -> None:
    repo = _models_repo(tmp_path, "tin")

    def evicted(eviction: str) -> str:
        clock = _Clock()
        probe = _managed(repo, clock).manager
        service = _managed(repo, clock, eviction=eviction, max_memory=int(probe.need_bytes("t") * 2.5))

        async def scenario() -> str:
            await service.manager.start()
            for k in range(20):  # t: a timer, every 10 minutes
                clock.t = MONDAY + 600 * k
                await _ask(service, "t")
            clock.t += 100
            await _ask(service, "i")  # i: once, used more recently than t
            clock.t += 400  # t is due in 100 s
            await _ask(service, "n")  # the budget holds two: one of t and i goes
            gone = [name for name in "ti" if not service.manager.is_ready(name)]
            await service.manager.close()
            assert service.metrics.evictions._value.get() == 1
            return "".join(gone)

        return asyncio.run(scenario())

    assert evicted("lru") == "t"
    assert evicted("predictive") == "i"


def test_the_prefetcher_loads_a_model_before_it_is_due_and_counts_hits_and_waste(tmp_path: Path) -> None:
    repo = _models_repo(tmp_path, "tu")
    clock = _Clock()
    service = _managed(repo, clock, prefetch_window_s=300)
    manager, m = service.manager, service.metrics

    async def scenario() -> None:
        await manager.start()
        assert manager.prefetcher is not None and manager.usage is not None
        await manager.prefetcher.stop()  # the rounds are driven by hand here
        for k in range(20):  # a history (as a previous run left it): t and u every 10 minutes, u 5 after t
            for name, at in (("t", 0), ("u", 300)):
                clock.t = MONDAY + 600 * k + at
                manager.usage.record(name, 1)
        clock.t = MONDAY + 600 * 19 + 360  # u just fired, t in 240 s
        assert await manager.prefetcher.tick() and manager.is_ready("t") and not manager.is_ready("u")
        assert not await manager.prefetcher.tick()  # u is not due
        assert _count(m.prefetches, "t", "prefetch") == 1
        clock.t += 240
        assert await _ask(service, "t") == 0.0
        assert _count(m.prefetch_hits, "t") == 1 and _count(m.cold_loads, "t") == 0
        clock.t += 250  # u due in 50 s
        assert await manager.prefetcher.tick() and manager.is_ready("u")
        await manager.unload("u")  # unloaded unused: a wasted prefetch, and held back
        assert _count(m.prefetch_wasted, "u") == 1
        assert not await manager.prefetcher.tick() and not manager.is_ready("u")
        assert await _ask(service, "u") == 1.0  # asked for: a cold load on the request path
        assert _count(m.cold_loads, "u") == 1
        await manager.close()

    asyncio.run(scenario())


def _mlp(path: Path, width: int, layers: int) -> Path:
    """An MLP of ``layers`` [width, width] MatMuls: weights ONNX Runtime prepacks (unlike a Gather's)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights = [], []
    for i in range(layers):
        weights.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("Identity", [f"h{layers}"], ["y"]))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_an_unload_hands_back_the_memory_its_load_took_cycle_after_cycle(tmp_path: Path) -> None:
    import psutil

    repo = tmp_path / "repo"
    kiln.import_model(_mlp(tmp_path / "mlp.onnx", 1536, 4), repo, name="mlp")  # 36 MiB of weights
    s = ServerSettings(repo=repo, engine_threads=1, load_mode="lazy")
    manager = ModelManager(s, Metrics())
    process = psutil.Process()

    async def scenario() -> tuple[list[float], int, int]:
        await manager.load("mlp")  # the first load sets up ONNX Runtime for good (thread pools, kernels)
        await manager.unload("mlp")
        first = process.memory_info().rss
        freed = []
        for _ in range(10):
            before = process.memory_info().rss
            await manager.load("mlp")
            loaded = process.memory_info().rss
            await manager.unload("mlp")
            freed.append((loaded - process.memory_info().rss) / (loaded - before))
        return freed, first, process.memory_info().rss

    freed, first, last = asyncio.run(scenario())
    assert min(freed) >= 0.9, freed
    assert (last - first) / first < 0.05, (first, last)


def test_a_garbage_usage_file_is_ignored_with_a_warning_and_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = _models_repo(tmp_path, "a")
    usage = repo / ".kiln" / "usage.json"
    usage.parent.mkdir()
    usage.write_bytes(b'{"format": 1, "loaded": ["../../etc", "a"], "models": {"a": {"first": 1e999}}, "x": [[[')
    service = _managed(repo, _Clock())

    async def scenario() -> None:
        await service.manager.start()
        assert await _ask(service, "a") == 0.0
        await service.manager.close()

    with caplog.at_level(logging.WARNING, "kiln.serving"):
        asyncio.run(scenario())
    assert "ignoring usage file" in caplog.text and "not JSON" in caplog.text
    assert list(json.loads(usage.read_text())["models"]) == ["a"]  # rewritten whole at shutdown


def test_a_request_whose_model_is_evicted_under_it_loads_it_again_in_lazy_mode(tmp_path: Path) -> None:
    repo = _models_repo(tmp_path, "abc")
    probe = _managed(repo, _Clock()).manager
    service = _managed(repo, _Clock(), eviction="lru", max_memory=int(probe.need_bytes("a") * 1.5))  # room for one

    async def scenario() -> list[float]:
        await service.manager.start()
        resolved = await service.resolve("a", None)  # a request has resolved a, and is reading its body...
        assert await _ask(service, "b") == 1.0  # ...when b's load evicts a
        assert not service.manager.is_ready("a")
        out = await service.infer(resolved, _x())  # it followed a into a reload instead of failing 503
        first = float(out["y"][0, 0])
        # 36 requests at once over three models that fit one at a time: every one answered, exactly
        answers = await asyncio.gather(*(_ask(service, "abc"[k % 3]) for k in range(36)))
        await service.manager.close()
        return [first, *answers]

    first, *answers = asyncio.run(scenario())
    assert first == 0.0
    assert answers == [float(k % 3) for k in range(36)]
    assert service.metrics.evictions._value.get() >= 2
