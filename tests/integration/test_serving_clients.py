"""``kiln serve`` driven by Triton's own clients at their defaults (binary tensors on), HTTP and gRPC."""

from __future__ import annotations

import gzip
import http.client as httplib
import json
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import kiln
from kiln.repository import Repository
from tests import models
from tests.integration.conftest import ServeProcess

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("serve")
    root = d / "repo"
    kiln.import_model(models.add_model(d / "add.onnx"), root, name="add")
    kiln.import_model(models.mixed_model(d / "mixed.onnx"), root, name="mixed")
    kiln.import_model(models.add_model(d / "cached.onnx", const=5.0), root, name="cached")
    repository = Repository(root)
    spec = repository.spec("cached")
    repository.save_spec(spec.model_copy(update={"serving": spec.serving.model_copy(update={"response_cache": True})}))
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    proc = ServeProcess(
        repo, "--token", TOKEN, "--max-body-bytes", "1MB", "--access-log", log=tmp_path_factory.mktemp("log") / "s.log"
    )
    try:
        yield proc.wait_ready()
    finally:
        assert proc.terminate() == 0, proc.output()


@pytest.fixture(scope="module")
def http(server: ServeProcess) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(server.http_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(server: ServeProcess) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def _inputs(module: object, arrays: dict[str, np.ndarray]) -> list[object]:
    types = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(object): "BYTES"}
    out = []
    for name, arr in arrays.items():
        i = module.InferInput(name, list(arr.shape), types[arr.dtype])  # type: ignore[attr-defined]
        i.set_data_from_numpy(arr)
        out.append(i)
    return out


def test_health_and_server_metadata(
    http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    assert http.is_server_live() and http.is_server_ready()
    assert grpc.is_server_live() and grpc.is_server_ready()
    assert http.is_model_ready("add") and grpc.is_model_ready("add", "1")
    assert not http.is_model_ready("add", "7")
    md = http.get_server_metadata()
    assert md["name"] == "kiln" and "binary_tensor_data" in md["extensions"]
    assert "model_repository" in grpc.get_server_metadata(as_json=True)["extensions"]


def test_model_metadata_and_config(
    http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    md = http.get_model_metadata("mixed")
    assert md["versions"] == ["1"]
    assert {t["name"]: (t["datatype"], t["shape"]) for t in md["inputs"]} == {
        "text": ("BYTES", [-1, 2]), "ids": ("INT64", [-1, 3]), "x": ("FP32", [-1, 2]),
    }  # fmt: skip
    gmd = grpc.get_model_metadata("mixed", as_json=True)
    assert [t["datatype"] for t in gmd["outputs"]] == ["BYTES", "INT64", "FP32"]
    for cfg in (http.get_model_config("add"), grpc.get_model_config("add", as_json=True)["config"]):
        assert int(cfg["max_batch_size"]) == 32
        assert cfg["input"][0]["name"] == "x" and cfg["input"][0]["data_type"] == "TYPE_FP32"
        assert [int(d) for d in cfg["input"][0]["dims"]] == [4]
        assert "dynamic_batching" in cfg
    assert grpc.get_model_config("mixed", as_json=True)["config"]["input"][0]["data_type"] == "TYPE_STRING"


def test_fp32_infer_equals_in_process_predict(
    repo: Path, http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    with kiln.load(repo, "add") as p:
        want = p.predict({"x": x})["y"]
    got_http = http.infer("add", _inputs(httpclient, {"x": x})).as_numpy("y")
    got_grpc = grpc.infer("add", _inputs(grpcclient, {"x": x})).as_numpy("y")
    np.testing.assert_array_equal(got_http, want)
    np.testing.assert_array_equal(got_grpc, want)
    # JSON outputs too (binary_data=False), and a specific version in the URL
    out = httpclient.InferRequestedOutput("y", binary_data=False)
    np.testing.assert_array_equal(
        http.infer("add", _inputs(httpclient, {"x": x}), "1", outputs=[out]).as_numpy("y"), want
    )


def test_bytes_int64_fp32_infer_equals_in_process_predict(
    repo: Path, http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    feed = {
        "text": np.array([["héllo", ""], ["a", "wörld"]], dtype=object),
        "ids": np.array([[1, -2, 3], [2**40, 0, 7]], dtype=np.int64),
        "x": np.array([[0.5, -1], [3, 4]], dtype=np.float32),
    }
    with kiln.load(repo, "mixed") as p:
        want = p.predict(feed)
    for module, client in ((httpclient, http), (grpcclient, grpc)):
        res = client.infer("mixed", _inputs(module, feed))  # type: ignore[attr-defined]
        text = res.as_numpy("text_out")
        assert [b.decode() for b in text.reshape(-1)] == list(want["text_out"].reshape(-1))
        np.testing.assert_array_equal(res.as_numpy("ids_out"), want["ids_out"])
        np.testing.assert_array_equal(res.as_numpy("z"), want["z"])


def test_repository_index_load_unload_need_the_token(
    server: ServeProcess, http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with pytest.raises(InferenceServerException, match="token"):
        http.get_model_repository_index()
    with pytest.raises(InferenceServerException, match="token") as info:
        grpc.unload_model("add")
    assert "UNAUTHENTICATED" in str(info.value.status())
    index = {(r["name"], r["version"]): r["state"] for r in http.get_model_repository_index(headers=auth)}
    assert index[("add", "1")] == "READY" and index[("mixed", "1")] == "READY"
    with pytest.raises(InferenceServerException, match=r"\['config'\] are not supported"):
        http.load_model("add", headers=auth, config='{"max_batch_size": 1}')
    http.unload_model("add", headers=auth)
    assert not http.is_model_ready("add")
    with pytest.raises(InferenceServerException, match="not loaded"):
        http.infer("add", _inputs(httpclient, {"x": np.zeros((1, 4), np.float32)}))
    grpc_auth = {"authorization": f"Bearer {TOKEN}"}  # gRPC metadata keys are lower case
    grpc.load_model("add", headers=grpc_auth)
    assert grpc.is_model_ready("add")
    rows = grpc.get_model_repository_index(headers=grpc_auth, as_json=True)["models"]
    assert {"name": "add", "version": "1", "state": "READY"} in [
        {k: r.get(k) for k in ("name", "version", "state")} for r in rows
    ]
    assert http.infer("add", _inputs(httpclient, {"x": np.zeros((1, 4), np.float32)})).as_numpy("y").sum() == 4


def _request(
    server: ServeProcess, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = httplib.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        conn.request(method, path, body, headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _post(
    server: ServeProcess, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str]]:
    status, _, payload = _request(server, "POST", path, body, headers)
    return status, json.loads(payload or b"{}")


def test_model_ready_for_an_unknown_version_is_404_and_a_bad_version_400(
    server: ServeProcess, grpc: grpcclient.InferenceServerClient
) -> None:
    status, _, body = _request(server, "GET", "/v2/models/add/versions/7/ready")
    assert status == 404 and "no served version 7" in json.loads(body)["error"]
    status, _, body = _request(server, "GET", "/v2/models/add/versions/x/ready")
    assert status == 400 and "'x' is not a version number" in json.loads(body)["error"]
    assert _request(server, "GET", "/v2/models/add/versions/1/ready")[0] == 200
    with pytest.raises(InferenceServerException, match="no served version 7") as info:
        grpc.is_model_ready("add", "7")
    assert "NOT_FOUND" in str(info.value.status())


def test_compressed_requests_and_responses_as_tritonclient_sends_them(
    server: ServeProcess, http: httpclient.InferenceServerClient
) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for request_coding in ("gzip", "deflate"):
        for response_coding in (None, "gzip", "deflate"):
            for binary in (True, False):
                out = httpclient.InferRequestedOutput("y", binary_data=binary)
                inputs = [httpclient.InferInput("x", [2, 4], "FP32")]
                inputs[0].set_data_from_numpy(x, binary_data=binary)
                res = http.infer(
                    "add", inputs, outputs=[out], request_compression_algorithm=request_coding,
                    response_compression_algorithm=response_coding,
                )  # fmt: skip
                np.testing.assert_array_equal(res.as_numpy("y"), x + 1)
    rows = [i + 0.1 for i in range(128)]  # 32 rows (the largest batch) of float32 noise: KiBs worth compressing
    big = json.dumps({"inputs": [{"name": "x", "shape": [32, 4], "datatype": "FP32", "data": rows}]}).encode()
    status, headers, payload = _request(
        server, "POST", "/v2/models/add/infer", gzip.compress(big), {"Content-Encoding": "gzip", "Accept-Encoding": "gzip"}
    )  # fmt: skip
    assert status == 200 and headers["content-encoding"] == "gzip"
    np.testing.assert_allclose(json.loads(gzip.decompress(payload))["outputs"][0]["data"], np.add(rows, 1), rtol=1e-6)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()
    status, headers, payload = _request(
        server, "POST", "/v2/models/add/infer", body, {"Accept-Encoding": "gzip, deflate"}
    )  # aiohttp's default header: a response this small goes as it is
    assert status == 200 and "content-encoding" not in headers
    assert json.loads(payload)["outputs"][0]["data"] == [2, 3, 4, 5]
    status, headers, payload = _request(
        server,
        "POST",
        "/v2/models/add/infer",
        zlib.compress(body),
        {"Content-Encoding": "deflate", "Accept-Encoding": "br"},
    )
    assert status == 200 and "content-encoding" not in headers  # nothing it can send: left uncompressed
    assert json.loads(payload)["outputs"][0]["data"] == [2, 3, 4, 5]


def test_compressed_bodies_are_held_to_the_body_limit_and_unknown_codings_refused(server: ServeProcess) -> None:
    bomb = gzip.compress(b" " * (8 * 2**20))  # 8 KiB on the wire, 8 MiB inflated: over the 1 MiB limit
    assert len(bomb) < 64 * 2**10
    status, doc = _post(server, "/v2/models/add/infer", bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "decompresses (gzip) to more than 1048576 bytes" in doc["error"]
    status, doc = _post(server, "/v2/models/add/infer", b"\x1f\x8bnot gzip", {"Content-Encoding": "gzip"})
    assert status == 400 and "body: is not valid gzip data" in doc["error"]
    status, doc = _post(server, "/v2/models/add/infer", b"{}", {"Content-Encoding": "br"})
    assert status == 415 and doc["error"].startswith("Content-Encoding: 'br' is not supported")


def test_bad_requests_get_4xx_naming_the_problem_and_the_server_keeps_serving(
    server: ServeProcess, http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    ok = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()
    short = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                    "parameters": {"binary_data_size": 16}}]}).encode()  # fmt: skip
    cases = [
        ("/v2/models/add/infer", b"{not json", {}, 400, "not valid JSON"),
        ("/v2/models/add/infer", ok.replace(b"FP32", b"INT64"), {}, 400, "datatype must be FP32"),
        ("/v2/models/add/infer", ok.replace(b"[1, 4]", b"[1, 5]"), {}, 400, "holds 4 elements but shape [1, 5] needs 5"),
        ("/v2/models/add/infer", ok.replace(b"[1, 4]", b"[2, 2]"), {}, 400, "dimension 1 must be 4"),
        ("/v2/models/nope/infer", ok, {}, 404, "model 'nope' is not in the repository"),
        ("/v2/models/add/versions/9/infer", ok, {}, 404, "has no version 9"),
        ("/v2/models/add/versions/x/infer", ok, {}, 400, "not a version number"),
        ("/v2/models/mixed/infer", json.dumps({"inputs": [
            {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1.9, -2.7, 3]},
            {"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]},
            {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}).encode(), {}, 400,
         "input 'ids': data: must hold integers for INT64, got non-integer numbers"),
        ("/v2/models/add/infer", ok.replace(b"[1, 2, 3, 4]", b"[true, false, true, false]"), {}, 400,
         "input 'x': data: must hold numbers for FP32, got true/false"),
        ("/v2/models/add/infer", b"x" * (2 * 2**20), {}, 413, "exceeds the limit of 1048576 bytes"),
        ("/v2/models/add/infer", short + b"\0" * 8, {"Inference-Header-Content-Length": str(len(short))}, 400,
         "16 bytes announced but only 8 binary bytes remain"),
        ("/v2/repository/models/add/load", b"", {"Authorization": "Bearer wrong"}, 401, "token"),
    ]  # fmt: skip
    for path, body, headers, status, message in cases:
        got, doc = _post(server, path, body, headers)
        assert got == status, (path, doc)
        assert message in doc["error"], (message, doc)
    with pytest.raises(InferenceServerException, match="datatype must be FP32") as info:
        bad = grpcclient.InferInput("x", [1, 4], "INT64")
        bad.set_data_from_numpy(np.zeros((1, 4), np.int64))
        grpc.infer("add", [bad])
    assert "INVALID_ARGUMENT" in str(info.value.status())
    twice = [grpcclient.InferRequestedOutput("y"), grpcclient.InferRequestedOutput("y")]
    with pytest.raises(InferenceServerException, match="output 'y' is requested more than once") as info:
        grpc.infer("add", _inputs(grpcclient, {"x": np.zeros((1, 4), np.float32)}), outputs=twice)
    assert "INVALID_ARGUMENT" in str(info.value.status())
    with pytest.raises(InferenceServerException, match="not in the repository") as info:
        grpc.infer("nope", _inputs(grpcclient, {"x": np.zeros((1, 4), np.float32)}))
    assert "NOT_FOUND" in str(info.value.status())
    with pytest.raises(InferenceServerException) as big:  # over --max-body-bytes: refused by the transport
        grpc.infer("add", _inputs(grpcclient, {"x": np.zeros((70_000, 4), np.float32)}))
    assert "RESOURCE_EXHAUSTED" in str(big.value.status())
    with pytest.raises(InferenceServerException, match="batch size must be at most 32"):
        http.infer("add", _inputs(httpclient, {"x": np.zeros((33, 4), np.float32)}))
    # still serving, and the outcomes were counted
    assert http.infer("add", _inputs(httpclient, {"x": np.ones((1, 4), np.float32)})).as_numpy("y").sum() == 8
    assert server.metric("kiln_requests_total", model="add", protocol="http", outcome="client_error") >= 3
    assert server.metric("kiln_requests_total", model="", protocol="http", outcome="not_found") >= 1


def test_response_cache_counts_hits_and_misses(server: ServeProcess, http: httpclient.InferenceServerClient) -> None:
    x = np.full((2, 4), 1.5, np.float32)
    first = http.infer("cached", _inputs(httpclient, {"x": x})).as_numpy("y")
    second = http.infer("cached", _inputs(httpclient, {"x": x})).as_numpy("y")
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, x + 5)
    assert server.metric("kiln_cache_total", model="cached", result="miss") == 1
    assert server.metric("kiln_cache_total", model="cached", result="hit") == 1


def test_metrics_cover_requests_latency_batches_and_models(
    server: ServeProcess, http: httpclient.InferenceServerClient
) -> None:
    http.infer("mixed", _inputs(httpclient, {
        "text": np.array([["a", "b"]], dtype=object), "ids": np.zeros((1, 3), np.int64), "x": np.zeros((1, 2), np.float32),
    }))  # fmt: skip
    assert server.metric("kiln_requests_total", model="mixed", version="1", protocol="http", outcome="ok") >= 1
    assert server.metric("kiln_request_seconds_count", model="mixed", protocol="http") >= 1
    assert server.metric("kiln_compute_seconds_count", model="mixed") >= 1
    assert server.metric("kiln_batch_size_count", model="mixed") >= 1
    assert server.metric("kiln_models_loaded") == 3
    assert server.metric("kiln_model_load_seconds_count", model="mixed") == 1


def test_statistics_extension_counts_inferences(
    http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    before = http.get_inference_statistics("add")["model_stats"]
    count0 = before[0]["inference_count"] if before else 0
    http.infer("add", _inputs(httpclient, {"x": np.zeros((3, 4), np.float32)}))
    stats = http.get_inference_statistics("add", "1")["model_stats"][0]
    assert stats["inference_count"] == count0 + 3
    assert stats["inference_stats"]["success"]["count"] >= 1
    gstats = grpc.get_inference_statistics("add", as_json=True)["model_stats"][0]
    assert int(gstats["inference_count"]) >= count0 + 3 and int(gstats["execution_count"]) >= 1
    # perf_analyzer's rule: queue and compute input/infer/output count the same requests
    inf = stats["inference_stats"]
    counts = {k: inf[k]["count"] for k in ("queue", "compute_input", "compute_infer", "compute_output")}
    assert len(set(counts.values())) == 1 and counts["queue"] >= 1, counts
    assert inf["compute_infer"]["ns"] > 0
    assert sum(b["compute_infer"]["count"] for b in stats["batch_stats"]) == stats["execution_count"]
    assert all(b["compute_input"]["count"] == b["compute_infer"]["count"] for b in stats["batch_stats"])
    with pytest.raises(InferenceServerException, match="not in the repository"):
        http.get_inference_statistics("nope")
    with pytest.raises(InferenceServerException, match="no served version 9"):
        http.get_inference_statistics("add", "9")


def test_logs_are_json_lines_carrying_the_request_id(server: ServeProcess) -> None:
    status, _ = _post(server, "/v2/models/add/infer", b"{broken", {"X-Request-ID": "trace-me-42"})
    assert status == 400
    mine: list[dict[str, object]] = []
    for _ in range(500):  # the line is written just after the response is sent: poll, with a bound
        lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
        mine = [d for d in lines if d.get("request_id") == "trace-me-42"]
        if mine:
            break
        threading.Event().wait(0.01)
    assert mine and mine[-1]["status"] == 400 and mine[-1]["model"] == "add" and mine[-1]["level"] == "info"
