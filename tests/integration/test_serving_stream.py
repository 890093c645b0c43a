"""gRPC ``ModelStreamInfer`` (Triton's bidirectional stream), through tritonclient's ``start_stream`` and the
raw stub, against a server in this process: ids, errors in the stream, completion order, half-close,
cancellation and flow control."""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2

import kiln
from kiln.serving.grpc_stream import MAX_IN_FLIGHT
from kiln.serving.server import ServerThread
from kiln.serving.settings import ServerSettings
from tests import models
from tests.fixtures.serving_engines import GATE, Gate, Hold, add_gate_variant, gate

WIDE = 2**14  # floats per row of model 'wide': a 64 KiB answer, so that unread answers fill the window
_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    d = tmp_path_factory.mktemp("stream")
    repo = d / "repo"
    kiln.import_model(models.add_model(d / "m.onnx", const=1.0), repo, name="m")
    add_gate_variant(repo, "m", const=10.0)  # chosen: x + 10, on the test-gate engine the tests hold
    kiln.import_model(models.add_model(d / "add.onnx", const=1.0), repo, name="add")  # x + 1
    kiln.import_model(models.add_model(d / "wide.onnx", const=2.0, width=WIDE), repo, name="wide")  # x + 2
    server = ServerThread(ServerSettings(repo=repo, http_port=0, grpc_port=0, engine_threads=1)).start()
    try:
        yield server
    finally:
        GATE.hook = None
        server.stop()


@pytest.fixture
def g(srv: ServerThread) -> Iterator[Gate]:
    with gate() as g:
        yield g


def _request(model: str, x: np.ndarray, request_id: str, name: str = "x") -> Any:
    req = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    req.inputs.add(name=name, datatype="FP32", shape=x.shape)
    req.raw_input_contents.append(x.astype(np.float32).tobytes())
    return req


def _y(response: Any) -> np.ndarray:
    out = response.outputs[0]
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tuple(out.shape))


def _inputs(x: np.ndarray) -> list[Any]:
    i = grpcclient.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return [i]


def _sample(srv: ServerThread, name: str, **labels: str) -> float:
    return srv.server.metrics.registry.get_sample_value(name, labels) or 0.0


def _count(srv: ServerThread, model: str, outcome: str) -> float:
    labels = {"model": model, "version": "1", "protocol": "grpc", "outcome": outcome}
    return _sample(srv, "kiln_requests_total", **labels)


def _until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not hold within the deadline")
        time.sleep(0.005)  # polling interval of a wait with a deadline


class Raw:
    """The raw stub's stream, fed from a queue: ``send`` a message (or bytes), ``close`` half-closes."""

    def __init__(self, srv: ServerThread) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}")
        self._out: queue.Queue[Any] = queue.Queue()
        self.closed = threading.Event()  # set once the client has half-closed
        stream = self.channel.stream_stream(
            _METHOD,
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        self.call = stream(self._requests())

    def _requests(self) -> Iterator[Any]:
        while (m := self._out.get()) is not None:
            yield m
        self.closed.set()

    def send(self, *messages: Any) -> None:
        for m in messages:
            self._out.put(m)

    def close(self) -> None:
        self._out.put(None)

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.call.cancel()
        self.channel.close()


def test_fifty_requests_on_a_stream_are_answered_each_under_its_id(srv: ServerThread) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    try:
        client.start_stream(lambda result, error: answers.put((result, error)))
        for i in range(50):
            client.async_stream_infer("add", _inputs(np.full((1, 4), i, np.float32)), request_id=f"r{i}")
        got = {}
        for _ in range(50):
            result, error = answers.get(timeout=20)
            assert error is None
            got[result.get_response().id] = result.as_numpy("y")
        client.stop_stream()
    finally:
        client.close()
    assert sorted(got) == sorted(f"r{i}" for i in range(50))
    for i in range(50):
        np.testing.assert_array_equal(got[f"r{i}"], np.full((1, 4), i + 1, np.float32))


def test_a_bad_request_is_answered_in_the_stream_under_its_id_and_the_stream_goes_on(srv: ServerThread) -> None:
    x = np.ones((1, 4), np.float32)
    with Raw(srv) as raw:
        raw.send(
            _request("add", x, "good-1"),
            _request("add", x, "bad-input", name="nope"),
            _request("ghost", x, "bad-model"),
            b"\xff\xff\xff",  # not a ModelInferRequest
            _request("add", 2 * x, "good-2"),
        )
        raw.close()
        answers = {r.infer_response.id: r for r in raw.call}
        assert raw.call.code() == grpc.StatusCode.OK
    assert sorted(answers) == ["", "bad-input", "bad-model", "good-1", "good-2"]
    assert answers["good-1"].error_message == ""
    np.testing.assert_array_equal(_y(answers["good-1"].infer_response), x + 1)
    np.testing.assert_array_equal(_y(answers["good-2"].infer_response), 2 * x + 1)
    assert "input 'nope'" in answers["bad-input"].error_message
    assert "'ghost'" in answers["bad-model"].error_message
    assert "not a valid inference.ModelInferRequest" in answers[""].error_message


def test_answers_come_in_completion_order(srv: ServerThread, g: Gate) -> None:
    hold = Hold()
    g.hook = hold
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    try:
        client.start_stream(lambda result, error: answers.put((result, error)))
        client.async_stream_infer("m", _inputs(np.zeros((1, 4), np.float32)), request_id="held")
        assert hold.entered.wait(20)
        client.async_stream_infer("add", _inputs(np.zeros((1, 4), np.float32)), request_id="fast")
        first, error = answers.get(timeout=20)
        assert error is None and first.get_response().id == "fast"
        hold.release()
        second, error = answers.get(timeout=20)
        assert error is None and second.get_response().id == "held"
        np.testing.assert_array_equal(second.as_numpy("y"), np.full((1, 4), 10, np.float32))
        client.stop_stream()
    finally:
        hold.release()
        client.close()


def test_half_close_ends_the_stream_once_every_answer_is_written(srv: ServerThread, g: Gate) -> None:
    hold = Hold()
    g.hook = hold
    with Raw(srv) as raw:
        raw.send(*(_request("m", np.full((1, 4), i, np.float32), f"r{i}") for i in range(3)))
        raw.close()
        assert raw.closed.wait(20) and hold.entered.wait(20)  # half-closed while the first is in the engine
        hold.release()
        answers = {r.infer_response.id: r for r in raw.call}
        assert raw.call.code() == grpc.StatusCode.OK
    assert sorted(answers) == ["r0", "r1", "r2"]
    for i in range(3):
        np.testing.assert_array_equal(_y(answers[f"r{i}"].infer_response), np.full((1, 4), i + 10, np.float32))


def test_a_cancelled_stream_cancels_its_requests_and_the_server_serves_on(srv: ServerThread, g: Gate) -> None:
    hold = Hold()
    g.hook = hold
    cancelled = _count(srv, "m", "cancelled")
    with Raw(srv) as raw:
        raw.send(_request("m", np.zeros((1, 4), np.float32), "running"))
        assert hold.entered.wait(20)
        raw.send(_request("m", np.zeros((2, 4), np.float32), "queued"))  # two rows: told apart in g.rows
        _until(lambda: _sample(srv, "kiln_queue_depth", model="m", version="1") == 1)
        raw.call.cancel()
        _until(lambda: _count(srv, "m", "cancelled") == cancelled + 2)
    hold.release()
    g.hook = None
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    try:
        y = client.infer("m", _inputs(np.zeros((3, 4), np.float32))).as_numpy("y")
    finally:
        client.close()
    np.testing.assert_array_equal(y, np.full((3, 4), 10, np.float32))
    assert g.rows == [1, 3]  # the queued request never ran
    assert _sample(srv, "kiln_inflight_requests", protocol="grpc") == 0


def test_the_streams_deadline_holds_for_its_requests(srv: ServerThread, g: Gate) -> None:
    hold = Hold()
    g.hook = hold
    timeouts = _count(srv, "m", "timeout")
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    try:
        client.start_stream(lambda result, error: answers.put((result, error)), stream_timeout=0.3)
        client.async_stream_infer("m", _inputs(np.zeros((1, 4), np.float32)), request_id="late")
        result, error = answers.get(timeout=20)
        # the request's timer (from the stream's deadline) and the deadline itself race: a 504 in the stream
        # or the stream's DEADLINE_EXCEEDED, well before the held engine would answer. The time left when the
        # request arrives is 0.2x s, or 0.300x s when it arrives at once (gRPC's timeout header rounds up)
        assert result is None and (
            re.search(r"did not finish within 0\.(2|30)", str(error)) or "Deadline" in str(error)
        )
        _until(lambda: _count(srv, "m", "timeout") == timeouts + 1)
        client.stop_stream()
    finally:
        hold.release()
        client.close()


def test_a_client_that_does_not_read_stops_the_server_reading_its_stream(srv: ServerThread) -> None:
    total = 500
    x = np.zeros((1, WIDE), np.float32)
    served = _count(srv, "wide", "ok")
    with Raw(srv) as raw:
        raw.send(*(_request("wide", x + i, f"r{i}") for i in range(total)))
        raw.close()
        _until(lambda: _sample(srv, "kiln_inflight_requests", protocol="grpc") == MAX_IN_FLIGHT)
        peak = 0.0
        for _ in range(100):  # a while without reading: the stream stays at the limit, the rest unread
            peak = max(peak, _sample(srv, "kiln_inflight_requests", protocol="grpc"))
            time.sleep(0.005)
        assert peak == MAX_IN_FLIGHT
        assert _count(srv, "wide", "ok") - served < total - MAX_IN_FLIGHT  # requests are left unread
        ids = [r.infer_response.id for r in raw.call]  # now read: every answer comes
        assert raw.call.code() == grpc.StatusCode.OK
    assert sorted(ids) == sorted(f"r{i}" for i in range(total))
    assert _count(srv, "wide", "ok") - served == total
