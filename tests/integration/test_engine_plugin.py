"""An engine defined only here, in the test, goes the whole road: the optimizer plans what it offers, builds,
checks, times and chooses its variant, ``kiln.load`` runs it, and ``kiln serve`` serves it (with its Triton
platform name) — without a line of ``src/`` knowing it exists."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pytest

import kiln
from kiln.engines import base
from kiln.engines.base import Engine, EngineOptions, LabelParts, RunOptions
from kiln.errors import SpecError
from kiln.recipe import PlanContext, Recipe, Skipped
from kiln.repository import ONNX_FILE, Repository
from kiln.serving.server import ServerThread
from kiln.serving.settings import ServerSettings
from kiln.spec import ModelSpec
from tests import models

NAME = "wrapped-ort"


class WrappedOptions(RunOptions):
    graph: Literal["basic", "all"] = "all"  # ONNX Runtime's graph optimization level


class WrappedOrt(Engine):
    """ONNX Runtime behind another name, with its own typed run option and its own candidates."""

    name = NAME
    artifact = ONNX_FILE
    Options = WrappedOptions
    triton_platform = "wrapped_onnx"
    triton_backend = "wrapped"
    concurrent_runs = True
    loads: ClassVar[list[str]] = []  # the graph level of every load

    def __init__(self, spec: ModelSpec, options: EngineOptions, session: Any) -> None:
        super().__init__(spec, options)
        self.session = session
        self.outputs = [o.name for o in session.get_outputs()]

    @classmethod
    def candidates(cls, ctx: PlanContext) -> tuple[list[Recipe], list[Skipped]]:
        skipped = [] if "bf16" not in ctx.precisions else [Skipped(f"{NAME} bf16", "it runs fp32 only")]
        return [Recipe(engine=NAME), Recipe(engine=NAME, options={"graph": "basic"})], skipped

    @classmethod
    def describe(cls, options: Mapping[str, Any]) -> LabelParts:
        return LabelParts(tail=(f"[{options['graph']}]",) if "graph" in options else ())

    @classmethod
    def is_plain(cls, options: Mapping[str, Any]) -> bool:
        return "graph" not in options

    @classmethod
    def load(cls, artifact_dir: Path, spec: ModelSpec, options: EngineOptions) -> WrappedOrt:
        import onnxruntime as ort

        run = WrappedOptions.of(options)
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads or 1
        levels = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        so.graph_optimization_level = levels[run.graph]
        cls.loads.append(run.graph)
        session = ort.InferenceSession(str(artifact_dir / cls.artifact), so, providers=["CPUExecutionProvider"])
        return cls(spec, options, session)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(self.outputs, dict(inputs)), strict=True))


@pytest.fixture
def wrapped(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[WrappedOrt]]:
    """The engine registered for this test only (the registry is the only place kiln learns of it)."""
    monkeypatch.setitem(base._REGISTRY, NAME, WrappedOrt)
    WrappedOrt.loads = []
    yield WrappedOrt


def test_an_engine_defined_in_a_test_is_planned_built_checked_timed_chosen_loaded_and_served(
    tmp_path: Path, wrapped: type[WrappedOrt]
) -> None:
    repo = tmp_path / "repo"
    kiln.import_model(models.add_model(tmp_path / "add.onnx", const=2.0), repo, name="add")
    assert NAME in kiln.OptimizeConfig().engines  # a registered engine is searched by default

    result = kiln.optimize(repo, "add", engines=[NAME], min_time_s=0.05, warmup=2, finalists=0)
    ours = [v for v in result.variants if v.recipe is not None and v.recipe.engine == NAME]
    assert sorted(v.label for v in ours) == [f"{NAME} fp32", f"{NAME} fp32 [basic]"]
    assert all(v.built and v.accuracy is not None and v.timing is not None for v in ours), [v.reason for v in ours]
    assert any(v.label == f"{NAME} bf16" for v in result.variants if v.status == "skipped")
    assert result.chosen in {v.id for v in ours}
    chosen = Repository(repo).variant("add")
    assert chosen.id == result.chosen and chosen.engine == NAME
    assert chosen.recipe is not None and chosen.recipe.label in {v.label for v in ours}

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with kiln.load(repo, "add") as predictor:
        assert predictor.engine.name == NAME and predictor.variant == result.chosen
        np.testing.assert_array_equal(predictor.predict(x)["y"], x + 2)
    with pytest.raises(SpecError, match="graph"):
        kiln.load(repo, "add", graph="fastest")  # its typed options check what a caller passes

    settings = ServerSettings(repo=repo, http_port=0, grpc_port=0, engine_threads=1, drain_timeout_s=2)
    srv = ServerThread(settings).start()
    try:
        url = f"http://127.0.0.1:{srv.http_port}/v2/models/add"
        body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
        request = urllib.request.Request(url + "/infer", data=json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=30) as r:
            answer = json.loads(r.read())
        assert answer["outputs"][0]["data"] == (x + 2).reshape(-1).tolist()
        with urllib.request.urlopen(url, timeout=30) as r:
            assert json.loads(r.read())["platform"] == "wrapped_onnx"
        with urllib.request.urlopen(url + "/config", timeout=30) as r:
            config = json.loads(r.read())
        assert (config["platform"], config["backend"]) == ("wrapped_onnx", "wrapped")
    finally:
        srv.stop()
    assert wrapped.loads  # every load above went through the test's engine
