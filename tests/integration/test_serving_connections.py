"""HTTP connections held to their limits, over raw sockets as an attacker would write them: a request head
past ``max_header_bytes`` (sent whole, or trickled without end) gets 431, a head that trickles in past
``header_timeout_s`` (slowloris) and a body that stalls past ``body_timeout_s`` get 408, a connection that
never sends a byte is closed after ``keep_alive_s``; a method a path does not take gets 405 with ``Allow``;
every refusal is a JSON error, and the same server keeps answering ordinary, pipelined and piecewise
requests exactly."""

from __future__ import annotations

import http.client
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import tritonclient.http as httpclient

import kiln
from kiln.serving.server import ServerThread
from kiln.serving.settings import ServerSettings
from tests import models

HEAD_LIMIT = 4096
HEAD_TIMEOUT = 0.6
BODY_TIMEOUT = 0.6
IDLE = 0.6
# uvloop's timers count from the loop's cached time, in whole milliseconds: one may fire a little before its
# delay has passed on the clock the test reads (CI saw 0.5998 s for 0.6)
TIMER_SLACK = 0.02
PATIENCE = 10.0  # the most a test waits for the server to act on a limit


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    d = tmp_path_factory.mktemp("connections")
    kiln.import_model(models.add_model(d / "add.onnx"), d / "repo", name="add")
    settings = ServerSettings(
        repo=d / "repo", http_port=0, grpc_port=None, engine_threads=1, max_header_bytes=HEAD_LIMIT,
        header_timeout_s=HEAD_TIMEOUT, body_timeout_s=BODY_TIMEOUT, keep_alive_s=IDLE,
    )  # fmt: skip
    with ServerThread(settings) as srv:
        yield srv


def connect(server: ServerThread) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=PATIENCE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout fails the test)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def refusal(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert "connection: close" in [line.lower() for line in lines[1:]], head
    assert "content-type: application/json" in [line.lower() for line in lines[1:]], head
    return int(lines[0].split()[1]), json.loads(body)["error"]


def infer_request(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /v2/models/add/infer HTTP/1.1\r\nhost: kiln\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%s\r\n" % (len(body), extra)
    ) + body


BODY = b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}'


def response_of(reader: BinaryIO) -> tuple[int, dict[str, object]]:
    """One keep-alive response's status and JSON body, read to exactly its content-length (pipelined
    answers follow it)."""
    status = reader.readline()
    assert status.startswith(b"HTTP/1.1 "), status
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    out: dict[str, object] = json.loads(reader.read(length))
    return int(status.split()[1]), out


def answer_of(reader: BinaryIO) -> dict[str, object]:
    status, out = response_of(reader)
    assert status == 200, out
    return out


def test_a_head_past_the_limit_in_one_piece_gets_431(server: ServerThread) -> None:
    with connect(server) as sock:
        sock.sendall(infer_request(BODY, b"x-junk: " + b"a" * (2 * HEAD_LIMIT) + b"\r\n"))
        status, error = refusal(read_all(sock))
    assert status == 431 and f"larger than {HEAD_LIMIT} bytes" in error and "MAX_HEADER_BYTES" in error


def test_a_long_url_counts_as_head_too(server: ServerThread) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /v2/models/" + b"m" * (2 * HEAD_LIMIT) + b" HTTP/1.1\r\nhost: kiln\r\n\r\n")
        status, _ = refusal(read_all(sock))
    assert status == 431


def test_a_header_that_never_ends_is_cut_off_at_the_limit_not_buffered(server: ServerThread) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nx-endless: ")
        sent = 0
        while sent < 100 * HEAD_LIMIT:  # far past the limit if the server kept buffering it
            sock.sendall(b"b" * 1024)
            sent += 1024
            if select.select([sock], [], [], 0.01)[0]:  # the server has answered: stop sending
                break
        answer = read_all(sock)  # the server ends its side after the answer, and drops what still comes
    status, _ = refusal(answer)
    assert status == 431 and sent < 100 * HEAD_LIMIT, sent


def test_an_answer_given_before_the_body_is_read_survives_the_client_still_sending(server: ServerThread) -> None:
    # 413 on the declared length while the client pushes the body anyway (as http.client does): closing at
    # once would reset the connection and could destroy the answer; the server lingers, as nginx does
    for _ in range(20):
        with connect(server) as sock:
            sock.sendall(b"POST /v2/models/add/infer HTTP/1.1\r\nhost: kiln\r\ncontent-length: %d\r\n\r\n" % 2**27)
            try:
                for _ in range(64):
                    sock.sendall(b"x" * 65536)  # 4 MiB of the 128 MiB announced
            except (BrokenPipeError, ConnectionResetError):
                pytest.fail("the server reset the connection while the client was sending")
            head = read_all(sock).partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 413"), head


def test_many_headers_within_the_limit_are_served(server: ServerThread) -> None:
    extra = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 40) for i in range(HEAD_LIMIT // 80))
    with connect(server) as sock, sock.makefile("rb") as reader:
        sock.sendall(infer_request(BODY, extra))
        assert answer_of(reader)["outputs"][0]["data"] == [2, 3, 4, 5]  # type: ignore[index]


def test_slowloris_headers_get_408_at_the_header_deadline(server: ServerThread) -> None:
    with connect(server) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\n")
        sock.settimeout(0.1)
        answer = b""
        while time.monotonic() - start < PATIENCE:
            try:
                sock.sendall(b"x-slow-%d: 1\r\n" % int((time.monotonic() - start) * 1e3))  # a header every 0.1 s
                answer = sock.recv(65536)  # the client's pace: it waits 0.1 s for an answer between headers
                break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(PATIENCE)
        answer += read_all(sock)
        took = time.monotonic() - start
    status, error = refusal(answer)
    assert status == 408 and "headers did not arrive" in error
    assert HEAD_TIMEOUT - TIMER_SLACK <= took < HEAD_TIMEOUT + 3, took


def test_a_stalled_body_gets_408_after_the_body_timeout(server: ServerThread) -> None:
    with connect(server) as sock:
        start = time.monotonic()
        sock.sendall(infer_request(BODY)[: -len(BODY) + 10])  # headers and 10 bytes of the body, then silence
        answer = read_all(sock)
        took = time.monotonic() - start
    status, error = refusal(answer)
    assert status == 408 and "request body" in error
    assert BODY_TIMEOUT - TIMER_SLACK <= took < BODY_TIMEOUT + 3, took


def test_a_body_that_keeps_arriving_is_not_timed_out(server: ServerThread) -> None:
    with connect(server) as sock, sock.makefile("rb") as reader:
        request = infer_request(BODY)
        head_end = request.index(b"\r\n\r\n") + 4
        sock.sendall(request[:head_end])
        body = request[head_end:]
        start = time.monotonic()
        for i in range(0, len(body), 8):  # 8 bytes every 0.1 s: longer than the body timeout in all
            sock.sendall(body[i : i + 8])
            time.sleep(0.1)  # the client's pace, not synchronisation
        assert time.monotonic() - start > BODY_TIMEOUT
        assert answer_of(reader)["outputs"][0]["data"] == [2, 3, 4, 5]  # type: ignore[index]


def test_a_connection_that_never_speaks_is_closed_after_the_keep_alive_time(server: ServerThread) -> None:
    start = time.monotonic()  # before connecting: the server (a thread here) may accept before connect() returns
    with connect(server) as sock:
        assert read_all(sock) == b""
        assert IDLE - TIMER_SLACK <= time.monotonic() - start < IDLE + 3


def test_not_http_gets_a_json_400(server: ServerThread) -> None:
    with connect(server) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello TLS\r\n\r\n")
        status, error = refusal(read_all(sock))
    assert status == 400 and "not valid HTTP/1.1" in error


def test_keep_alive_and_pipelined_requests_are_answered_in_order(server: ServerThread) -> None:
    bodies = [BODY.replace(b"[1, 2, 3, 4]", b"[%d, 0, 0, 0]" % i) for i in range(5)]
    with connect(server) as sock, sock.makefile("rb") as reader:
        sock.sendall(b"".join(infer_request(b) for b in bodies))  # all five in one write
        for i in range(5):
            assert answer_of(reader)["outputs"][0]["data"] == [i + 1, 1, 1, 1]  # type: ignore[index]
        sock.sendall(infer_request(BODY))  # and the connection stays usable
        assert answer_of(reader)["outputs"][0]["data"] == [2, 3, 4, 5]  # type: ignore[index]


def test_the_server_answers_exactly_after_every_refusal(server: ServerThread) -> None:
    with httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}") as client:
        assert client.is_server_ready()
        x = np.array([[1, 2, 3, 4]], np.float32)
        i = httpclient.InferInput("x", [1, 4], "FP32")
        i.set_data_from_numpy(x, binary_data=True)
        np.testing.assert_array_equal(client.infer("add", [i]).as_numpy("y"), x + 1)


def test_the_limits_are_settings_with_sane_bounds(tmp_path: Path) -> None:
    s = ServerSettings(repo=tmp_path, max_header_bytes="16KB")  # type: ignore[arg-type]
    assert s.max_header_bytes == 16 * 2**10 and s.header_timeout_s > 0 and s.body_timeout_s > 0
    with pytest.raises(ValueError, match="max_header_bytes"):
        ServerSettings(repo=tmp_path, max_header_bytes=10)
    with pytest.raises(ValueError, match="header_timeout_s"):
        ServerSettings(repo=tmp_path, header_timeout_s=0)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v2/models/add/infer", "POST"),
        ("PUT", "/v2/models/add/versions/1/infer", "POST"),
        ("DELETE", "/v2/models/nope/infer", "POST"),  # the path's shape decides, not whether the model exists
        ("POST", "/v2/health/ready", "GET"),
        ("DELETE", "/v2/models/add", "GET"),
    ],
)
def test_a_method_the_path_does_not_take_gets_405_naming_what_it_takes(
    server: ServerThread, method: str, path: str, allow: str
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=PATIENCE)
    try:
        conn.request(method, path, body=b"{}" if method != "GET" else None)
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 405, body
    assert allow in (resp.getheader("allow") or "") and f"{method} is not allowed" in body["error"], body


def test_a_refused_body_left_unread_closes_the_connection_instead_of_being_read_and_dropped(
    server: ServerThread,
) -> None:
    with connect(server) as sock:  # 1 GiB announced: refused on its length, before a byte of it is read
        sock.sendall(b"POST /v2/models/add/infer HTTP/1.1\r\nhost: kiln\r\ncontent-length: %d\r\n\r\n" % 2**30)
        answer = read_all(sock)  # the server closes: it does not wait for the gigabyte
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower(), head
    assert "exceeds the limit" in json.loads(body)["error"]
    with connect(server) as sock:  # an unknown model with a large body: answered, then closed
        big = BODY.replace(b"[1, 2, 3, 4]", b"[" + b"0, " * 40_000 + b"0]")
        sock.sendall(infer_request(big).replace(b"/models/add/", b"/models/nope/"))
        head = read_all(sock).partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 404") and b"connection: close" in head.lower(), head


def test_a_refused_small_request_keeps_its_connection(server: ServerThread) -> None:
    with connect(server) as sock, sock.makefile("rb") as reader:
        sock.sendall(infer_request(BODY).replace(b"/models/add/", b"/models/nope/"))
        status, out = response_of(reader)
        assert status == 404 and "not in the repository" in str(out["error"]), out
        sock.sendall(infer_request(BODY))
        assert answer_of(reader)["outputs"][0]["data"] == [2, 3, 4, 5]  # type: ignore[index]
