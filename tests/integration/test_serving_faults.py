"""Faults and overload through the public interfaces of a server in this process: an engine that raises,
cannot allocate, hangs or (as a process instance) exits fails only its own requests, is counted, and the
model is marked not ready and reloaded while the other model keeps serving; a request that would wait
past its budget is refused at once; a queued request whose client went away never runs."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

import kiln
from kiln.serving.server import ServerThread
from kiln.serving.settings import ServerSettings
from tests import models
from tests.fixtures.serving_engines import GATE, add_gate_variant, gate

Hook = Callable[[Mapping[str, np.ndarray]], None]


def _repo(tmp_path: Path, **serving: object) -> Path:
    """'g': the test-gate engine (y = x + 10, no fallback) whose runs the test controls; 'ok': plain ORT."""
    repo = tmp_path / "repo"
    kiln.import_model(models.add_model(tmp_path / "g.onnx", const=1.0), repo, name="g")
    kiln.import_model(models.add_model(tmp_path / "ok.onnx", const=2.0), repo, name="ok")
    add_gate_variant(repo, "g", const=10.0, **{"fallback": False, "unhealthy_after": 2, **serving})
    return repo


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def run(repo: Path, **settings: object) -> ServerThread:
        defaults: dict[str, object] = {"http_port": 0, "grpc_port": 0, "engine_threads": 1, "drain_timeout_s": 2}
        srv = ServerThread(ServerSettings(repo=repo, **{**defaults, **settings})).start()  # type: ignore[arg-type]
        servers.append(srv)
        return srv

    with gate():
        try:
            yield run
        finally:
            GATE.hook = None
            for srv in servers:
                srv.stop()


def _infer(srv: ServerThread, model: str, x: np.ndarray, timeout: float = 30) -> tuple[int, dict[str, object]]:
    body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()  # fmt: skip
    req = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/v2/models/{model}/infer", data=body)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        doc = json.loads(exc.read())
        doc["retry-after"] = exc.headers.get("retry-after")
        return exc.code, doc


def _y(doc: dict[str, object]) -> list[float]:
    return doc["outputs"][0]["data"]  # type: ignore[index,no-any-return]


def _ready(srv: ServerThread, model: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/v2/models/{model}/ready", timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _metric(srv: ServerThread, name: str, **labels: str) -> float:
    text = srv.server.metrics.render().decode()
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(w in line for w in want)
    )


def _until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        threading.Event().wait(0.01)  # polling with a deadline, not synchronisation
    pytest.fail(f"{what} did not happen within {timeout} s")


def _x(value: float, rows: int = 1) -> np.ndarray:
    return np.full((rows, 4), value, np.float32)


class FailFirst:
    """A hook raising ``error`` on its first ``times`` runs (the probe's run included), then passing."""

    def __init__(self, times: int, error: BaseException) -> None:
        self.left = times
        self.error = error
        self.lock = threading.Lock()

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> None:
        with self.lock:
            if self.left <= 0:
                return
            self.left -= 1
        raise self.error


def test_an_engine_that_raises_fails_its_requests_and_the_model_reloads(tmp_path: Path, start: Callable) -> None:
    srv = start(_repo(tmp_path))
    loads = GATE.loads
    GATE.hook = FailFirst(4, RuntimeError("the engine broke: /secret/path"))  # two requests: a run and a probe each
    status, doc = _infer(srv, "g", _x(1))
    assert status == 500
    assert "model 'g' failed to run this batch" in str(doc["error"]) and "/secret" not in str(doc["error"])
    status, doc = _infer(srv, "ok", _x(1))  # the other model serves throughout
    assert status == 200 and _y(doc) == [3.0] * 4
    assert _infer(srv, "g", _x(1))[0] == 500  # the second failure in a row: not ready, and reloaded
    _until(lambda: _metric(srv, "kiln_model_unhealthy_total", model="g") == 1, "the model marked unhealthy")
    _until(lambda: GATE.loads == loads + 1 and _ready(srv, "g") == 200, "the reload")
    assert _metric(srv, "kiln_engine_failures_total", model="g", kind="error") == 2
    status, doc = _infer(srv, "g", _x(1))
    assert status == 200 and _y(doc) == [11.0] * 4


def test_inputs_the_engine_refuses_fail_alone_as_a_400_and_count_nothing(tmp_path: Path, start: Callable) -> None:
    srv = start(_repo(tmp_path))
    held, release = threading.Event(), threading.Event()

    def hook(inputs: Mapping[str, np.ndarray]) -> None:
        if not held.is_set():  # hold the first run, so that the next two batch up behind it
            held.set()
            release.wait(30)
        if (inputs["x"] == -7).any():
            raise ValueError("the engine cannot take -7")

    GATE.hook = hook
    batcher = srv.server.manager.entries["g"].default.batcher  # type: ignore[union-attr]
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(_infer, srv, "g", _x(0))
        assert held.wait(30)
        bad = pool.submit(_infer, srv, "g", _x(-7))
        good = pool.submit(_infer, srv, "g", _x(5))
        _until(lambda: batcher.depth == 2, "two queued requests")
        release.set()
        assert first.result(30)[0] == 200
        status, doc = bad.result(30)
        assert status == 400 and "could not run this request's inputs" in str(doc["error"]), doc
        status, doc = good.result(30)
        assert status == 200 and _y(doc) == [15.0] * 4  # batched with the bad one, rerun alone: answered
    assert 2 in GATE.rows  # they did run as one batch first
    assert _metric(srv, "kiln_engine_failures_total", model="g") == 0  # a client cannot make a model unhealthy
    assert _ready(srv, "g") == 200


def test_a_failed_allocation_is_a_503_naming_the_model(tmp_path: Path, start: Callable) -> None:
    srv = start(_repo(tmp_path))
    GATE.hook = FailFirst(1, MemoryError())
    status, doc = _infer(srv, "g", _x(1))
    assert status == 503 and "model 'g'" in str(doc["error"]) and "oom" in str(doc["error"])
    assert _metric(srv, "kiln_engine_failures_total", model="g", kind="oom") == 1
    assert _infer(srv, "g", _x(1))[0] == 200  # one failure is not a failing model


def test_a_hanging_engine_is_answered_at_its_compute_timeout_and_replaced(tmp_path: Path, start: Callable) -> None:
    srv = start(_repo(tmp_path, compute_timeout_ms=300))
    hung, release = threading.Event(), threading.Event()
    loads = GATE.loads

    def hook(inputs: Mapping[str, np.ndarray]) -> None:
        if not hung.is_set():
            hung.set()
            release.wait(60)  # hangs until the test ends

    GATE.hook = hook
    try:
        with ThreadPoolExecutor(1) as pool:
            t0 = time.monotonic()
            pending = pool.submit(_infer, srv, "g", _x(1))
            assert hung.wait(30)
            for _ in range(5):  # while 'g' hangs, 'ok' answers as fast as ever
                s0 = time.monotonic()
                assert _infer(srv, "ok", _x(1), timeout=5)[0] == 200
                assert time.monotonic() - s0 < 1.0
            status, doc = pending.result(30)
        assert status == 503 and "model 'g'" in str(doc["error"]) and "compute_timeout_ms" in str(doc["error"])
        assert time.monotonic() - t0 < 5  # answered at the timeout, not at the request's 30 s
        _until(lambda: GATE.loads == loads + 1 and _ready(srv, "g") == 200, "the replacement instance")
        status, doc = _infer(srv, "g", _x(2))
        assert status == 200 and _y(doc) == [12.0] * 4
        assert _metric(srv, "kiln_engine_failures_total", model="g", kind="timeout") == 1
    finally:
        release.set()


def test_a_process_instance_that_exits_fails_fast_and_is_restarted(tmp_path: Path, start: Callable) -> None:
    repo = tmp_path / "repo"
    kiln.import_model(models.add_model(tmp_path / "p.onnx"), repo, name="p")
    add_gate_variant(repo, "p", const=10.0, engine="test-gate-gil", exit_on=-1.0, instances=2, fallback=False)
    srv = start(repo)
    t0 = time.monotonic()
    status, doc = _infer(srv, "p", _x(-1))  # the child process running it exits
    assert status == 503 and "exited" in str(doc["error"]) and "model 'p'" in str(doc["error"])
    assert time.monotonic() - t0 < 10
    for v in (1.0, 2.0, 3.0):  # both instances answer again (the dead one restarted)
        status, doc = _infer(srv, "p", _x(v))
        assert status == 200 and _y(doc) == [v + 10] * 4
    assert _metric(srv, "kiln_engine_failures_total", model="p", kind="exit") == 1


def test_a_queued_request_whose_client_left_never_runs(tmp_path: Path, start: Callable) -> None:
    srv = start(_repo(tmp_path))
    release = threading.Event()
    GATE.hook = lambda inputs: None if release.is_set() else release.wait(30)  # type: ignore[func-returns-value]
    batcher = srv.server.manager.entries["g"].default.batcher  # type: ignore[union-attr]
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_infer, srv, "g", _x(0))
        _until(lambda: batcher.busy == 1, "the first run")  # busy counts a batch only once it is taken
        body = json.dumps({"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": [0.0] * 12}]})
        sock = socket.create_connection(("127.0.0.1", srv.http_port))
        sock.sendall(
            f"POST /v2/models/g/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        _until(lambda: batcher.depth == 1, "the second request queued")
        sock.close()  # the client gives up
        _until(lambda: _metric(srv, "kiln_requests_total", model="g", outcome="cancelled") == 1, "the drop")
        release.set()
        assert first.result(30)[0] == 200
    assert _infer(srv, "g", _x(1))[0] == 200
    assert 3 not in GATE.rows  # the 3-row request never reached the engine


def test_overload_is_refused_at_once_with_retry_after_over_http_and_grpc(tmp_path: Path, start: Callable) -> None:
    srv = start(_repo(tmp_path, max_batch_size=0, queue_budget_ms=40))
    GATE.hook = lambda inputs: time.sleep(0.02)  # a 20 ms engine
    for _ in range(12):  # the batcher learns the 20 ms
        assert _infer(srv, "g", _x(1))[0] == 200
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: (time.monotonic(), *_infer(srv, "g", _x(1)), time.monotonic()), range(12)))
    refused = [(t1 - t0, doc) for t0, status, doc, t1 in results if status == 503]
    served = [doc for _, status, doc, _ in results if status == 200]
    assert refused and served and len(refused) + len(served) == 12
    for _, doc in refused:
        assert "model 'g' is overloaded" in str(doc["error"]) and "estimated wait" in str(doc["error"])
        assert doc["retry-after"] == "1"
    assert min(s for s, _ in refused) < 0.5  # refused at once, not after waiting
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = service_pb2.ModelInferRequest(model_name="g")
        req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        req.raw_input_contents.append(_x(1).tobytes())
        futures = [stub.ModelInfer.future(req) for _ in range(12)]
        codes = []
        for f in futures:
            try:
                f.result(timeout=30)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and "overloaded" in (exc.details() or "")
        assert grpc.StatusCode.UNAVAILABLE in codes and grpc.StatusCode.OK in codes
        # a deadline of its own replaces the budget: a client that will wait 5 s is admitted
        slow = [stub.ModelInfer.future(req, timeout=5) for _ in range(6)]
        assert all(f.result(timeout=30) is not None for f in slow)
