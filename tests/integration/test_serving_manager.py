"""The model manager and service in process: version policies, reload races, lazy loads, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.errors import ModelNotReadyError, NotFoundError, RequestTimeoutError
from kiln.repository import Repository
from kiln.serving.manager import ModelManager
from kiln.serving.metrics import Metrics
from kiln.serving.protocol import InferRequest
from kiln.serving.service import Service
from kiln.serving.settings import ServerSettings
from tests import models


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
        with pytest.raises(NotFoundError, match="'nope' is not in repository"):
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
    repository = Repository(repo)
    spec = repository.spec("m")
    repository.save_spec(spec.model_copy(update={"serving": spec.serving.model_copy(update={"instances": 2})}))
    service = _service(repo, inline_below_ms=0)

    async def scenario() -> list[float]:
        await service.manager.start()
        sv = await service.resolve("m", None)
        assert len(sv.batcher.runners) == 2
        assert sv.memory_bytes == 2 * (repo / "m" / "1" / "model.onnx").stat().st_size  # one copy per instance
        reqs = [InferRequest(id="", inputs={"x": np.full((1, 4), i, np.float32)}) for i in range(16)]
        outs = await asyncio.gather(*(service.infer(sv, r) for r in reqs))
        await service.manager.close()
        return [float(o["y"][0, 0]) for o in outs]

    assert asyncio.run(scenario()) == [i + 1.0 for i in range(16)]


def test_a_request_past_its_timeout_is_answered_504_while_the_engine_finishes(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    kiln.import_model(models.slow_model(tmp_path / "slow.onnx", layers=120), repo, name="slow")
    repository = Repository(repo)
    spec = repository.spec("slow")
    serving = spec.serving.model_copy(update={"timeout_ms": 20, "max_batch_size": 256})
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
