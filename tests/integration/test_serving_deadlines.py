"""Deadlines, cancellations, per-request timeouts and the platform reported, through Triton's clients
against a server in this process whose engine (``test-gate``) the test holds, fails or lets run."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import kiln
from kiln.serving.metadata import triton_backend, triton_platform
from kiln.serving.server import ServerThread
from kiln.serving.settings import ServerSettings
from tests import models
from tests.fixtures.serving_engines import GATE, Gate, Hold, add_gate_variant, gate


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServerThread, Gate]]:
    repo = tmp_path / "repo"
    kiln.import_model(models.add_model(tmp_path / "add.onnx", const=1.0), repo, name="m")  # reference: x + 1
    add_gate_variant(repo, "m", const=10.0)  # chosen: x + 10
    settings = ServerSettings(repo=repo, http_port=0, grpc_port=0, engine_threads=1, inline_below_ms=0)
    with gate() as g:
        srv = ServerThread(settings).start()
        try:
            yield srv, g
        finally:
            GATE.hook = None
            srv.stop()


def _inputs(module: Any, x: np.ndarray) -> list[Any]:
    i = module.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return [i]


class Recorded:
    """Wraps ``Service.record`` to signal when the server has counted a request of ``protocol``."""

    def __init__(self, srv: ServerThread, protocol: str) -> None:
        self.done = threading.Event()
        self.service = srv.server.service
        real = self.service.record

        def record(model: str, version: str, proto: str, status: int, seconds: float) -> None:
            real(model, version, proto, status, seconds)
            if proto == protocol:
                self.done.set()

        self.service.record = record  # type: ignore[method-assign,assignment]

    def count(self, outcome: str) -> float:
        return float(self.service.metrics.requests.labels("m", "1", "grpc", outcome)._value.get())


def test_a_grpc_deadline_that_passes_is_counted_as_a_timeout_not_a_success(
    server: tuple[ServerThread, Gate],
) -> None:
    srv, g = server
    hold = Hold()
    g.hook = hold
    recorded = Recorded(srv, "grpc")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer("m", _inputs(grpcclient, np.zeros((1, 4), np.float32)), client_timeout=0.2)
        assert "DEADLINE_EXCEEDED" in str(info.value.status())
        assert recorded.done.wait(10)
    finally:
        hold.release()
        client.close()
    assert recorded.count("timeout") == 1
    assert recorded.count("ok") == 0


def test_a_grpc_request_the_client_cancels_is_counted_as_cancelled(server: tuple[ServerThread, Gate]) -> None:
    srv, g = server
    hold = Hold()
    g.hook = hold
    recorded = Recorded(srv, "grpc")
    answered = threading.Event()
    errors: list[Any] = []

    def callback(result: Any, error: Any) -> None:
        errors.append(error)
        answered.set()

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    try:
        call = client.async_infer("m", _inputs(grpcclient, np.zeros((1, 4), np.float32)), callback)
        assert hold.entered.wait(10)  # the request is in the engine
        call.cancel()
        assert answered.wait(10) and recorded.done.wait(10)
    finally:
        hold.release()
        client.close()
    assert errors[0] is not None and "CANCELLED" in str(errors[0].status())
    assert recorded.count("cancelled") == 1
    assert recorded.count("ok") == 0


def test_the_clients_timeout_parameter_is_honoured_over_http_and_grpc(server: tuple[ServerThread, Gate]) -> None:
    srv, g = server
    hold = Hold()
    g.hook = hold
    http = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http_port}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    x = np.zeros((1, 4), np.float32)
    try:
        with pytest.raises(InferenceServerException, match=r"did not finish within 0\.05 s") as info:
            http.infer("m", _inputs(httpclient, x), timeout=50_000)  # microseconds; the model's timeout is 30 s
        assert "504" in str(info.value.status())
        with pytest.raises(InferenceServerException, match=r"did not finish within 0\.05 s") as ginfo:
            grpc.infer("m", _inputs(grpcclient, x), timeout=50_000)
        assert "DEADLINE_EXCEEDED" in str(ginfo.value.status())
        hold.release()
        g.hook = None
        y = http.infer("m", _inputs(httpclient, x), timeout=10_000_000).as_numpy("y")
        assert float(y[0, 0]) == 10.0
    finally:
        hold.release()
        http.close()
        grpc.close()


def test_metadata_and_config_report_the_engine_serving_now(server: tuple[ServerThread, Gate]) -> None:
    srv, g = server
    http = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http_port}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")

    def platforms() -> set[str]:
        return {
            http.get_model_metadata("m")["platform"],
            http.get_model_config("m")["platform"],
            grpc.get_model_metadata("m", as_json=True)["platform"],
            grpc.get_model_config("m", as_json=True)["config"]["platform"],
        }

    def broken(inputs: Mapping[str, np.ndarray]) -> None:
        raise RuntimeError("the chosen variant broke")

    try:
        assert platforms() == {"test-gate"}  # the chosen variant's engine (no Triton name: shown as it is)
        g.hook = broken
        for _ in range(3):  # fallback_after: 3 failures latch the reference
            y = http.infer("m", _inputs(httpclient, np.zeros((1, 4), np.float32))).as_numpy("y")
            assert float(y[0, 0]) == 1.0
        assert platforms() == {"onnxruntime_onnx"}
        assert http.get_model_config("m")["backend"] == "onnxruntime"
    finally:
        http.close()
        grpc.close()
    assert (triton_platform("torch"), triton_backend("torch")) == ("pytorch_libtorch", "pytorch")
    assert (triton_platform("openvino"), triton_platform("onnxruntime")) == ("openvino", "onnxruntime_onnx")
