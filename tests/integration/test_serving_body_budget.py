"""The bytes of all requests in flight bounded (``max_inflight_bytes``): while one upload holds the budget,
another that would pass it is refused at once (HTTP 503 with Retry-After, before its body is read; gRPC
UNAVAILABLE) naming the setting, small requests still pass, and every byte is given back once the requests
are answered, whatever their outcome."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import kiln
from kiln.serving.server import ServerThread
from kiln.serving.settings import ServerSettings
from tests import models

MAX_BODY = 2**20
BUDGET = 5 * 2**18  # 1.25 MiB: one full-size request and a small one fit, a full and a half-size one do not
WIDTH = 4096  # 16 KiB a row: half of max_body_bytes in 32 rows, the model's largest batch


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    d = tmp_path_factory.mktemp("budget")
    kiln.import_model(models.add_model(d / "add.onnx"), d / "repo", name="add")
    kiln.import_model(models.add_model(d / "wide.onnx", width=WIDTH), d / "repo", name="wide")
    settings = ServerSettings(
        repo=d / "repo", http_port=0, grpc_port=0, engine_threads=1, max_body_bytes=MAX_BODY,
        max_inflight_bytes=BUDGET,
    )  # fmt: skip
    with ServerThread(settings) as srv:
        yield srv


def exchange(port: int, request: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


def small_infer(http: httpclient.InferenceServerClient) -> np.ndarray:
    x = np.array([[1, 2, 3, 4]], np.float32)
    i = httpclient.InferInput("x", [1, 4], "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    out: np.ndarray = http.infer("add", [i]).as_numpy("y")
    return out


def test_an_upload_past_the_budget_is_refused_before_it_is_read_and_all_is_given_back(server: ServerThread) -> None:
    budget = server.server.service.body_budget
    post = b"POST /v2/models/add/infer HTTP/1.1\r\nhost: kiln\r\ncontent-type: application/json\r\n"
    holder = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
    try:  # a full-size upload that has sent its headers and 10 bytes: its declared length is held
        holder.sendall(post + b'content-length: %d\r\nconnection: close\r\n\r\n{"inputs":' % MAX_BODY)
        http = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        np.testing.assert_array_equal(small_infer(http), [[2, 3, 4, 5]])  # the loop has read the holder's head
        assert budget.held == MAX_BODY
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=30) as resp:
            metrics = resp.read().decode()
        (gauge,) = [line for line in metrics.splitlines() if line.startswith("kiln_inflight_request_bytes ")]
        assert float(gauge.split()[1]) == MAX_BODY
        head, body = exchange(server.http_port, post + b"content-length: %d\r\n\r\n" % (MAX_BODY // 2))
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower(), head
        error = json.loads(body)["error"]
        assert f"holding {MAX_BODY} bytes" in error and "KILN_SERVE_MAX_INFLIGHT_BYTES" in error, error
        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        try:
            big = grpcclient.InferInput("x", [32, WIDTH], "FP32")  # half of max_body_bytes
            big.set_data_from_numpy(np.zeros((32, WIDTH), np.float32))
            with pytest.raises(InferenceServerException, match="MAX_INFLIGHT_BYTES") as info:
                grpc.infer("wide", [big])
            assert "UNAVAILABLE" in str(info.value.status())
            holder.sendall(b" " * (MAX_BODY - 10))  # the holder's body ends, not valid JSON: a 400
            answer = b""
            while chunk := holder.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
            assert budget.held == 0
            np.testing.assert_array_equal(grpc.infer("wide", [big]).as_numpy("y"), np.ones((32, WIDTH)))
        finally:
            grpc.close()
        http.close()
    finally:
        holder.close()
    assert budget.held == 0 and budget.peak >= MAX_BODY


def test_chunked_uploads_are_held_as_they_arrive(server: ServerThread) -> None:
    budget = server.server.service.body_budget
    x = np.zeros((16, WIDTH), np.float32)
    doc = json.dumps(
        {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    )
    body = doc.encode()
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 65536]), body[i : i + 65536]) for i in range(0, len(body), 65536)
    )
    request = (
        b"POST /v2/models/wide/infer HTTP/1.1\r\nhost: kiln\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        + chunked
        + b"0\r\n\r\n"
    )
    head, answer = exchange(server.http_port, request)
    assert head.startswith(b"HTTP/1.1 200"), (head, answer[:200])
    assert json.loads(answer)["outputs"][0]["shape"] == list(x.shape)
    assert budget.held == 0 and budget.peak >= len(body)
