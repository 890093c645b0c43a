"""Thousands of malformed V2 requests over HTTP and gRPC against a real ``kiln serve``: each gets a 4xx
(gRPC INVALID_ARGUMENT, NOT_FOUND, …) whose message names the field, within 2 s, on a connection that
stays answered; afterwards the server is healthy, answers a correct request exactly, and has not grown.

The generators live in ``tests/fixtures/v2_fuzz.py`` (``benchmarks/fuzz_serving.py`` runs them at volume).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings

from tests.fixtures import v2_fuzz
from tests.fixtures.v2_fuzz import GrpcCase, GrpcSender, HttpCase, HttpSender, Tally
from tests.integration.conftest import ServeProcess

HTTP_EXAMPLES = 2500
GRPC_EXAMPLES = 1200
RSS_GROWTH_LIMIT = 100 * 2**20
TALLY = Tally()
RAN: set[str] = set()


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,  # the server's own answer time is checked per request (2 s)
        derandomize=True,  # the same requests on every run
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    work = tmp_path_factory.mktemp("fuzz")
    repo = v2_fuzz.build_repo(work / "repo", work)
    proc = ServeProcess(repo, "--max-body-bytes", str(v2_fuzz.LIMIT), log=work / "serve.log")
    try:
        yield proc.wait_ready()
    finally:
        assert proc.terminate() == 0, proc.output()


@pytest.fixture(scope="module")
def rss_before(server: ServeProcess) -> int:
    """The server's RSS once every path has run once (JSON, binary, gzip, gRPC, each model)."""
    check_correct_answers(server)
    return int(psutil.Process(server.proc.pid).memory_info().rss)


@pytest.fixture(scope="module")
def http_sender(server: ServeProcess, rss_before: int) -> Iterator[HttpSender]:
    sender = HttpSender(server.http_port)
    yield sender
    sender.close()


@pytest.fixture(scope="module")
def grpc_sender(server: ServeProcess, rss_before: int) -> Iterator[GrpcSender]:
    sender = GrpcSender(server.grpc_port)
    yield sender
    sender.close()


def check_correct_answers(server: ServeProcess) -> None:
    x = np.array([[1, 2, 3, 4]], np.float32)
    with httpclient.InferenceServerClient(server.http_url) as http:
        assert http.is_server_live() and http.is_server_ready()
        for binary in (True, False):
            i = httpclient.InferInput("x", [1, 4], "FP32")
            i.set_data_from_numpy(x, binary_data=binary)
            res = http.infer("add", [i], request_compression_algorithm="gzip" if binary else None)
            np.testing.assert_array_equal(res.as_numpy("y"), x + 1)
        text = httpclient.InferInput("text", [1, 2], "BYTES")
        text.set_data_from_numpy(np.array([["héllo", ""]], dtype=object))
        ids = httpclient.InferInput("ids", [1, 3], "INT64")
        ids.set_data_from_numpy(np.array([[1, -2, 2**40]], np.int64))
        xm = httpclient.InferInput("x", [1, 2], "FP32")
        xm.set_data_from_numpy(np.array([[0.5, -1]], np.float32))
        res = http.infer("mixed", [text, ids, xm])
        assert [b.decode() for b in res.as_numpy("text_out").reshape(-1)] == ["héllo", ""]
        np.testing.assert_array_equal(res.as_numpy("ids_out"), [[2, -1, 2**40 + 1]])
        np.testing.assert_array_equal(res.as_numpy("z"), [[1.0, -2.0]])
        raw = httpclient.InferInput("raw", [1], "BYTES")
        raw.set_data_from_numpy(np.array([v2_fuzz.png()], dtype=object))
        res = http.infer("img", [raw])
        top = json.loads(res.as_numpy("predictions")[0])
        assert len(top) == 2 and {p["label"] for p in top} <= {"a", "b", "c"}, top
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert grpc.is_server_live() and grpc.is_model_ready("add")
        i = grpcclient.InferInput("x", [1, 4], "FP32")
        i.set_data_from_numpy(x)
        np.testing.assert_array_equal(grpc.infer("add", [i]).as_numpy("y"), x + 1)
    finally:
        grpc.close()


@fuzz_settings(HTTP_EXAMPLES)
@given(case=v2_fuzz.http_cases())
def test_malformed_http_requests_get_a_4xx_naming_the_field(case: HttpCase, http_sender: HttpSender) -> None:
    RAN.add("http")
    answer = http_sender.send(case)
    TALLY.add(case, answer)
    assert not answer.problems, (case.kind, answer.status, answer.error, answer.problems)


@fuzz_settings(GRPC_EXAMPLES)
@given(case=v2_fuzz.grpc_cases())
def test_malformed_grpc_calls_get_invalid_argument_or_not_found(case: GrpcCase, grpc_sender: GrpcSender) -> None:
    RAN.add("grpc")
    answer = grpc_sender.send(case)
    TALLY.add(case, answer)
    assert not answer.problems, (case.kind, answer.status, answer.error, answer.problems)


def test_afterwards_the_server_is_healthy_exact_and_has_not_grown(server: ServeProcess, rss_before: int) -> None:
    check_correct_answers(server)
    growth = psutil.Process(server.proc.pid).memory_info().rss - rss_before
    assert growth < RSS_GROWTH_LIMIT, f"the server grew by {growth / 2**20:.0f} MiB over {TALLY.sent} requests"
    log = Path(server.log).read_text(errors="replace")
    assert "unexpected error while serving" not in log, server.output()
    if {"http", "grpc"} <= RAN:  # the whole module ran
        assert TALLY.sent >= 2000, TALLY.by_class
        assert not TALLY.problems
