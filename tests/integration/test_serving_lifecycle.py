"""Reload under load, drain on SIGTERM, back-pressure, memory on unload, LRU eviction, fallback."""

from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

import kiln
from kiln.repository import VARIANTS_DIR, Repository
from tests import models
from tests.integration.conftest import ServeProcess

Start = Callable[..., ServeProcess]


def _x(rows: int, width: int, value: float = 1.0) -> np.ndarray:
    return np.full((rows, width), value, np.float32)


def _http_input(x: np.ndarray) -> list[httpclient.InferInput]:
    i = httpclient.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return [i]


def _grpc_input(x: np.ndarray) -> list[grpcclient.InferInput]:
    i = grpcclient.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return [i]


def test_hot_reload_under_a_steady_stream_loses_no_request(tmp_path: Path, serve_process: Start) -> None:
    repo = tmp_path / "repo"
    kiln.import_model(models.add_model(tmp_path / "v1.onnx", const=1.0), repo, name="m")
    server = serve_process(repo)
    stop = threading.Event()
    results: list[tuple[str, float | str]] = []
    lock = threading.Lock()

    def stream(kind: str) -> None:
        if kind == "http":
            client: object = httpclient.InferenceServerClient(server.http_url)
        else:
            client = grpcclient.InferenceServerClient(server.grpc_url)
        x = _x(1, 4, 0.0)
        for _ in range(5000):  # bounded, whatever happens
            if stop.is_set():
                break
            try:
                ins = _http_input(x) if kind == "http" else _grpc_input(x)
                y = float(client.infer("m", ins).as_numpy("y")[0, 0])  # type: ignore[attr-defined]
                with lock:
                    results.append((kind, y))
            except InferenceServerException as exc:
                with lock:
                    results.append((kind, str(exc)))
        client.close()  # type: ignore[attr-defined]

    threads = [threading.Thread(target=stream, args=(k,)) for k in ("http", "grpc")]
    for t in threads:
        t.start()
    try:
        admin = httpclient.InferenceServerClient(server.http_url)
        kiln.import_model(models.add_model(tmp_path / "v2.onnx", const=2.0), repo, name="m")
        with lock:
            before = len(results)
        admin.load_model("m")  # reload: version 2 loads and warms, then replaces version 1
        with lock:
            after = len(results)
        assert admin.get_model_metadata("m")["versions"] == ["2"]
        # keep streaming until each client got a few answers from the new version (bounded by the stream)
        seen = threading.Event()

        def enough() -> bool:
            with lock:
                return sum(1 for _, y in results[after:] if y == 2.0) >= 20

        for _ in range(10_000):
            if enough() or not any(t.is_alive() for t in threads):
                seen.set()
                break
            threading.Event().wait(0.005)  # poll interval with a bound, not synchronisation
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    errors = [r for r in results if not isinstance(r[1], float)]
    assert not errors, errors[:3]
    values = [y for _, y in results]
    assert 1.0 in values[: max(before, 1)] and values[-1] == 2.0
    assert {k for k, y in results[after:] if y == 2.0} == {"http", "grpc"}
    assert after > before, "no request was answered while the new version loaded"


def test_full_queue_answers_503_at_once_and_sigterm_drains_in_flight_requests(
    tmp_path: Path, serve_process: Start
) -> None:
    repo = tmp_path / "repo"
    # ~1 s a run on a quiet machine: the three in flight must outlast the listeners closing (up to ~0.5 s
    # after SIGTERM) even when the machine runs the model faster than expected
    kiln.import_model(models.slow_model(tmp_path / "slow.onnx", layers=600), repo, name="slow")
    repository = Repository(repo)
    spec = repository.spec("slow")
    # the hard cap, not the wait budget (tested in test_serving_faults.py), is what refuses here
    serving = spec.serving.model_copy(update={"max_batch_size": 256, "max_queue_size": 2, "queue_budget_ms": 6e5})
    repository.save_spec(spec.model_copy(update={"serving": serving}))
    server = serve_process(repo, "--drain-timeout", "60")
    x = _x(256, 512)  # one request fills a batch, so queued requests never merge

    def call() -> float:
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
        try:
            return float(client.infer("slow", _http_input(x)).as_numpy("y")[0, 0])
        finally:
            client.close()

    def wait_for(metric: str, value: float) -> None:
        for _ in range(3000):  # readiness polling with a deadline
            if server.metric(metric, model="slow") == value:
                return
            threading.Event().wait(0.01)
        pytest.fail(f"{metric} never reached {value}:\n{server.output()}")

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(call)]
        wait_for("kiln_instances_busy", 1)  # the first request runs ...
        futures += [pool.submit(call) for _ in range(2)]
        wait_for("kiln_queue_depth", 2)  # ... and two wait: the queue is full
        client = httpclient.InferenceServerClient(server.http_url)
        with pytest.raises(InferenceServerException, match="overloaded") as info:
            client.infer("slow", _http_input(x))
        assert "503" in str(info.value.status())
        gclient = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException, match="overloaded") as ginfo:
            gclient.infer("slow", _grpc_input(x))
        assert "UNAVAILABLE" in str(ginfo.value.status())
        client.close()
        server.proc.send_signal(signal.SIGTERM)  # while three requests are in flight
        refused = grpc_refused = ""
        for _ in range(2000):  # until the listeners close (uvicorn checks its exit flag every 0.1 s), bounded
            try:
                socket.create_connection(("127.0.0.1", server.http_port), timeout=5).close()
            except ConnectionRefusedError as exc:
                refused = str(exc)
            try:
                gclient.infer("slow", _grpc_input(_x(1, 512)))
                grpc_refused = "answered"  # not refused: fails the assertion below
            except InferenceServerException as exc:
                if "overloaded" not in str(exc):  # the full queue, before the gRPC server stopped taking calls
                    grpc_refused = str(exc.status())
            if refused and grpc_refused:
                break
            threading.Event().wait(0.01)
        in_flight = sum(not f.done() for f in futures)
        gclient.close()
        code = server.terminate()  # waits for the drain and the exit
        values = [f.result(timeout=120) for f in futures]
    assert refused, "a new HTTP connection was still accepted after SIGTERM"
    assert "UNAVAILABLE" in grpc_refused, grpc_refused
    assert in_flight > 0, "the requests in flight finished before new ones were refused: nothing was shown"
    assert code == 0, server.output()
    assert values == [1.0, 1.0, 1.0]  # identity weights: every request was answered in full
    assert "draining" in server.output()


def _rss(server: ServeProcess) -> int:
    return int(psutil.Process(server.proc.pid).memory_info().rss)


def test_lazy_load_unload_frees_memory_and_lru_eviction(tmp_path: Path, serve_process: Start) -> None:
    repo = tmp_path / "repo"
    kiln.import_model(models.big_model(tmp_path / "big.onnx", megabytes=64), repo, name="big")
    kiln.import_model(models.big_model(tmp_path / "big2.onnx", megabytes=64), repo, name="big2")
    server = serve_process(repo, "--lazy", "--max-memory", "100MB")
    client = httpclient.InferenceServerClient(server.http_url)
    assert not client.is_model_ready("big")
    base = _rss(server)
    client.infer("big", _http_input(_x(1, 1)))  # lazy: loads on the first request
    assert client.is_model_ready("big")
    loaded = _rss(server)
    assert loaded - base > 48 * 2**20, (base, loaded)
    client.unload_model("big")
    unloaded = _rss(server)
    # the 64 MiB weight comes back (what stays is ONNX Runtime's one-time set-up: thread pools, kernels)
    assert loaded - unloaded > 56 * 2**20, (base, loaded, unloaded)
    client.load_model("big")
    assert _rss(server) - unloaded > 56 * 2**20
    client.unload_model("big")
    assert _rss(server) - unloaded < 16 * 2**20, "a second load/unload cycle must not leak"
    # the budget holds one 64 MiB model: loading the second evicts the least recently used first
    client.load_model("big")
    client.infer("big2", _http_input(_x(1, 1)))
    index = {r["name"]: r for r in client.get_model_repository_index()}
    assert index["big2"]["state"] == "READY"
    assert index["big"]["state"] == "UNAVAILABLE" and "evicted" in index["big"]["reason"]
    assert server.metric("kiln_evictions_total") == 1
    assert _rss(server) - unloaded < 100 * 2**20  # one 64 MiB model resident, not two (that would be 128+)
    client.close()


def _broken_variant(repo: Path, model: str) -> None:
    """A chosen variant that fails at batch 2 only: it passes warm-up (batch 1 and max_batch_size, under
    ``dynamic_batching: on``; auto would warm batch 2 too and refuse the variant at load)."""
    vdir = repo / model / "1" / VARIANTS_DIR / "fails-at-2"
    vdir.mkdir(parents=True)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    then = helper.make_graph(  # batch 2: reshape to one row, which cannot hold 8 values
        [helper.make_node("Reshape", ["x", "one_row"], ["r"]), helper.make_node("Add", ["r", "c"], ["y"])],
        "then",
        [],
        [y],
    )
    other = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"])], "else", [], [y])
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "zero"], ["n"]),
            helper.make_node("Equal", ["n", "two"], ["is_two"]),
            helper.make_node("If", ["is_two"], ["y"], then_branch=then, else_branch=other),
        ],
        "fails-at-2",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(np.array([1, 4], np.int64), "one_row"),
            numpy_helper.from_array(np.array(0, np.int64), "zero"),
            numpy_helper.from_array(np.array(2, np.int64), "two"),
            numpy_helper.from_array(np.ones(4, np.float32), "c"),
        ],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 9
    (vdir / "model.onnx").write_bytes(onnx_model.SerializeToString())
    (vdir / "recipe.json").write_text(json.dumps({"engine": "onnxruntime", "precision": "fp32"}))
    repository = Repository(repo)
    spec = repository.spec(model)
    serving = spec.serving.model_copy(update={"dynamic_batching": "on"})
    repository.save_spec(spec.model_copy(update={"chosen_variant": "fails-at-2", "serving": serving}))


def test_failing_chosen_variant_falls_back_to_the_reference(
    tmp_path: Path, serve_process: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    kiln.import_model(models.add_model(tmp_path / "add.onnx"), repo, name="m")
    _broken_variant(repo, "m")
    monkeypatch.setenv("KILN_SERVE_INLINE_BELOW_MS", "0")  # every batch in a batcher thread, as under load
    server = serve_process(repo)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    one = client.infer("m", _grpc_input(_x(1, 4, 2.0))).as_numpy("y")  # batch 1: the chosen variant runs
    np.testing.assert_array_equal(one, _x(1, 4, 3.0))
    assert server.metric("kiln_fallback_total", model="m") == 0
    for i in range(4):  # batch 2 fails on the chosen variant; the reference answers every time
        y = client.infer("m", _grpc_input(_x(2, 4, float(i))), request_id=f"fb-{i}").as_numpy("y")
        np.testing.assert_array_equal(y, _x(2, 4, i + 1.0))
    # three consecutive failures latch the fallback: the fourth request never reached the chosen variant
    assert server.metric("kiln_fallback_total", model="m") == 3
    server.output()  # flushes the log; read all of it (output() keeps only its tail)
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    fallbacks = [d for d in lines if "reran the batch on the reference" in str(d.get("msg"))]
    assert [d.get("request_id") for d in fallbacks] == ["fb-0", "fb-1", "fb-2"]  # from the batcher's thread
    assert client.get_model_metadata("m", as_json=True)["platform"] == "onnxruntime_onnx"
    client.close()
