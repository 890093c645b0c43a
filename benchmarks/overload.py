"""How ``kiln serve`` behaves past its capacity: does it keep serving at full rate with bounded latency, and
refuse the surplus quickly, instead of letting every request wait?

One run, one server, per protocol (HTTP with binary tensors, gRPC with raw contents):

1. closed loop: a few clients send back to back; their completed infer/s is the capacity, with its p99;
2. open loop at multiples of that capacity (default 0.5, 1.5, 3, 10): requests are fired at Poisson
   arrival times whatever happened to the earlier ones, for a bounded time, and every outcome is counted
   (200, 503 / UNAVAILABLE as rejections, 504 / DEADLINE_EXCEEDED, other statuses, connection errors and
   client timeouts); admitted and rejected requests get their own latencies.

The model is a small CNN on ONNX Runtime with 1 engine thread, sized so that one image takes about
``--model-ms`` (5 ms: a few hundred infer/s), which lets the Python client offer 10x capacity on two
cores. The server is a separate ``kiln serve`` process on 127.0.0.1; the client is this process, one
event loop (uvloop when installed). It shares the cores with the server, so it is built to cost little
per request: HTTP/1.1 and gRPC (HTTP/2) clients of its own on asyncio protocols, each request serialized
once, answers judged by their status alone (``--grpc-client grpcio`` drives grpcio instead, for
comparison); aiohttp-free, grpcio only for metadata and the correctness check. Its CPU time per request
is printed for each level and for a probe at ``--probe-rps``. The client's *achieved* offered rate and
its scheduling lag are printed next to the target: where they fall short, the client, not the server,
was the limit.
At the end: the server's memory, whether it is still ready and still answers correctly (against an
in-process ``kiln.load(...).predict``), and PASS/FAIL check lines. The exit code is 0 unless ``--strict``
is given and a check fails.

    .venv/bin/python benchmarks/overload.py [--seconds 8] [--levels 0.5 1.5 3 10] [--protocols http grpc]
                                            [--model-ms 5] [--budget-ms 0] [--grpc-client raw|grpcio]
                                            [--probe-rps 1000] [--json overload.json] [--strict]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

Outcome = Literal["ok", "rejected", "timeout", "other", "conn"]
Protocol = Literal["http", "grpc"]
MODEL = "cnn"
CNN_FACTORY = f"{Path(__file__).resolve().with_name('serve_overhead.py')}:build_cnn"  # fully convolutional
MAX_REQUESTS_PER_LEVEL = 200_000  # a bound on the open loop whatever --seconds and the capacity say


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    """Percentile in ms of durations in seconds; NaN for none."""
    return float(np.percentile(np.array(values) * 1e3, q)) if values else math.nan


# -- the model ---------------------------------------------------------------------------------------------


def engine_ms(repo: Path, side: int) -> float:
    import kiln

    x = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
    with kiln.load(repo, MODEL, threads=1) as p:
        feed = {p.spec.inputs[0].name: x}
        for _ in range(20):
            p.engine.run(feed)
        times = []
        for _ in range(100):
            t = time.perf_counter()
            p.engine.run(feed)
            times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def import_cnn(work: Path, target_ms: float) -> tuple[Path, int, float]:
    """Import the CNN at an image size whose batch-1 engine time is near ``target_ms`` (two tries at most)."""
    import kiln

    side, repo, ms = 64, work / "repo-64", 0.0
    for attempt in range(2):
        repo = work / f"repo-{side}"
        kiln.import_model(CNN_FACTORY, repo, name=MODEL, input_shapes=[(1, 3, side, side)], input_names=["input"],
                          output_names=["logits"])  # fmt: skip
        ms = engine_ms(repo, side)
        guess = int(min(192, max(32, round(side * math.sqrt(target_ms / ms) / 8) * 8)))
        if attempt == 1 or abs(ms / target_ms - 1) < 0.25 or guess == side:
            break
        side = guess
    return repo, side, ms


# -- clients: one request, one outcome ----------------------------------------------------------------------
#
# The load generator shares the cores with the server, so each request must cost it as little as possible:
# no task, coroutine or timer per request, the request serialized once, the answer's body left unparsed.
# ``send(done, token)`` starts one request and later calls ``done(token, started, finished, reply)`` on the
# event loop's thread, ``started`` taken just before the request is written and ``finished`` just after its
# last byte is read. Client timeouts come from a sweep twice a second, not from a timer per request.


@dataclass(frozen=True, slots=True)
class Reply:
    outcome: Outcome
    retry_after: str | None = None  # HTTP 503's Retry-After header, as sent
    json_error: bool = False  # HTTP 503 body was JSON with an "error" key
    detail: str = ""


Done = Callable[[Any, float, float, Reply], None]  # (token, started, finished, reply)
OK = Reply("ok")
MAX_CONNECTIONS = 2000  # HTTP keep-alive connections at most (the pool grows on demand up to this)
PREOPEN = 16  # HTTP connections opened up front
JSON_SAMPLE = 50  # HTTP 503 bodies per level parsed as JSON; the rest are matched by prefix


class _HttpConn(asyncio.Protocol):
    """One persistent HTTP/1.1 connection, one request at a time, its answer parsed as it arrives."""

    def __init__(self, pool: HttpClient) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.status = 0  # of the answer being read; 0 until its head is complete
        self.need = 0  # that answer's Content-Length
        self.retry_after: str | None = None
        self.close_after = False  # the answer said Connection: close
        self.done: Done | None = None  # the request in flight
        self.token: Any = None
        self.sent = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def request(self, wire: bytes, done: Done, token: Any) -> None:
        self.done, self.token = done, token
        transport = self.transport
        self.sent = time.perf_counter()
        try:
            if transport is None or transport.is_closing():
                raise ConnectionResetError
            transport.write(wire)
        except (OSError, RuntimeError) as exc:
            self.fail(Reply("conn", detail=type(exc).__name__))

    def data_received(self, data: bytes) -> None:
        t = time.perf_counter()
        buf = self.buf
        buf += data
        if self.done is None:
            self.fail(Reply("other", detail="data with no request in flight"))
            return
        if not self.status:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self.fail(Reply("other", detail="answer head over 64 KiB"))
                return
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            if not self._head(head):
                self.fail(Reply("other", detail=f"unreadable answer head {head[:60]!r}"))
                return
        if len(buf) < self.need:
            return
        status, need = self.status, self.need
        body = bytes(buf[:need]) if status != 200 else b""
        del buf[:need]
        self.status = 0
        done, token, sent = self.done, self.token, self.sent
        self.done = None
        reply = self.pool.reply(status, self.retry_after, body)
        if buf or self.close_after:
            self.abort()  # more than one answer, or the server will close: do not reuse
        else:
            self.pool.ready(self)  # may start the next request on this connection at once
        done(token, sent, t, reply)

    def _head(self, head: bytes) -> bool:
        """Status, Content-Length, Retry-After and Connection from the lower-cased head; False if unreadable."""
        try:
            self.status = int(head[9:12])
            i = head.find(b"\r\ncontent-length:")
            if i < 0:  # chunked or close-delimited bodies: kiln does not send them; not parsed here
                if self.status not in (204, 304):
                    return False
                self.need = 0
            else:
                j = head.find(b"\r\n", i + 17)
                self.need = int(head[i + 17 : j if j >= 0 else len(head)])
        except ValueError:
            self.status = 0
            return False
        self.retry_after = None
        if self.status == 503 and (i := head.find(b"\r\nretry-after:")) >= 0:
            j = head.find(b"\r\n", i + 14)
            self.retry_after = head[i + 14 : j if j >= 0 else len(head)].strip().decode("latin-1")
        self.close_after = b"\r\nconnection: close" in head
        return True

    def fail(self, reply: Reply) -> None:
        """Answer the request in flight (if any) with ``reply`` and drop the connection."""
        done, self.done = self.done, None
        self.abort()
        if done is not None:
            done(self.token, self.sent, time.perf_counter(), reply)

    def abort(self) -> None:
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.fail(Reply("conn", detail=type(exc).__name__ if exc else "closed by the server"))


class HttpClient:
    """A minimal HTTP/1.1 client on asyncio protocols: a pool of keep-alive connections, one identical
    pre-serialized request (binary tensor extension), answers judged by their status line and headers."""

    def __init__(self, port: int, x: np.ndarray, timeout_s: float, budget_ms: float) -> None:
        self.port, self.x, self.timeout_s, self.budget_ms = port, x, timeout_s, budget_ms
        self.base = f"http://127.0.0.1:{port}"
        self.idle: list[_HttpConn] = []
        self.conns: set[_HttpConn] = set()
        self.waiting: deque[tuple[Done, Any, float]] = deque()  # requests that found no idle connection
        self.connecting = 0
        self.growing: set[asyncio.Task[None]] = set()
        self.replies: dict[tuple[int, str | None, bool], Reply] = {}
        self.json_left = JSON_SAMPLE
        self.sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    async def open(self) -> None:
        self.loop = asyncio.get_running_loop()
        meta = await self.loop.run_in_executor(None, self._get_json, f"/v2/models/{MODEL}")
        self.in_name, self.out_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
        raw = self.x.tobytes()
        header: dict[str, Any] = {
            "inputs": [{"name": self.in_name, "shape": list(self.x.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": self.out_name, "parameters": {"binary_data": True}}],
        }  # fmt: skip
        if self.budget_ms > 0:
            header["parameters"] = {"timeout": int(self.budget_ms * 1e3)}
        head = json.dumps(header).encode()
        self.body = head + raw
        self.headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(head)),
            "Accept-Encoding": "identity",
        }
        self.path = f"/v2/models/{MODEL}/infer"
        self.wire = (
            f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
            + f"Content-Length: {len(self.body)}\r\n\r\n"
        ).encode() + self.body
        for conn in await asyncio.gather(*(self._connect() for _ in range(PREOPEN))):
            self.ready(conn)
        self.sweeper = self.loop.call_later(0.5, self._sweep)

    def _get_json(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return json.loads(r.read())

    async def _connect(self) -> _HttpConn:
        _, conn = await self.loop.create_connection(lambda: _HttpConn(self), "127.0.0.1", self.port)
        self.conns.add(conn)
        return conn

    def begin(self) -> None:
        """A new level: parse the first few 503 bodies in full again."""
        self.json_left = JSON_SAMPLE

    def send(self, done: Done, token: Any) -> None:
        if self.idle:
            self.idle.pop().request(self.wire, done, token)
            return
        self.waiting.append((done, token, time.perf_counter()))
        self._grow()

    def _grow(self) -> None:
        if self.connecting < len(self.waiting) and len(self.conns) + self.connecting < MAX_CONNECTIONS:
            self.connecting += 1
            task = self.loop.create_task(self._grow_one())
            self.growing.add(task)
            task.add_done_callback(self.growing.discard)

    async def _grow_one(self) -> None:
        try:
            conn = await self._connect()
        except OSError as exc:
            self.connecting -= 1
            if self.waiting:  # the oldest waiter learns that connecting failed
                done, token, _ = self.waiting.popleft()
                now = time.perf_counter()
                done(token, now, now, Reply("conn", detail=type(exc).__name__))
            return
        self.connecting -= 1
        self.ready(conn)

    def ready(self, conn: _HttpConn) -> None:
        """``conn`` is free: give it the oldest waiting request, or keep it idle."""
        if self.closed:
            conn.abort()
        elif self.waiting:
            done, token, _ = self.waiting.popleft()
            conn.request(self.wire, done, token)
        else:
            self.idle.append(conn)

    def forget(self, conn: _HttpConn) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            if conn in self.idle:
                self.idle.remove(conn)
            if self.waiting and not self.closed:
                self._grow()

    def reply(self, status: int, retry_after: str | None, body: bytes) -> Reply:
        if status == 200:  # the body (the output tensor) is not looked at
            return OK
        is_json = False
        if status == 503:
            if self.json_left > 0:
                self.json_left -= 1
                try:
                    is_json = "error" in json.loads(body)
                except (ValueError, TypeError):
                    is_json = False
            else:  # kiln's JSONResponse: {"error":"..."}
                is_json = body.startswith(b'{"error":') and body.endswith(b"}")
        key = (status, retry_after, is_json)
        reply = self.replies.get(key)
        if reply is None:
            if status == 503:
                reply = Reply("rejected", retry_after, is_json)
            else:
                reply = Reply("timeout" if status == 504 else "other", detail=str(status))
            self.replies[key] = reply
        return reply

    def _sweep(self) -> None:
        """Client timeouts: a request unanswered after ``timeout_s`` loses its connection."""
        limit = time.perf_counter() - self.timeout_s
        for conn in [c for c in self.conns if c.done is not None and c.sent < limit]:
            conn.fail(Reply("conn", detail="TimeoutError"))
        while self.waiting and self.waiting[0][2] < limit:
            done, token, queued = self.waiting.popleft()
            done(token, queued, time.perf_counter(), Reply("conn", detail="TimeoutError (no connection)"))
        if not self.closed:
            self.sweeper = self.loop.call_later(0.5, self._sweep)

    async def infer(self) -> tuple[float, float, Reply]:
        fut: asyncio.Future[tuple[float, float, Reply]] = self.loop.create_future()
        self.send(lambda _, s, d, r: fut.set_result((s, d, r)), None)
        return await fut

    def _post(self) -> np.ndarray:
        req = urllib.request.Request(self.base + self.path, data=self.body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                body = r.read()
                hlen = int(r.headers["Inference-Header-Content-Length"])
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"HTTP {exc.code}: {exc.read()[:200]!r}") from None
        out = json.loads(body[:hlen])["outputs"][0]
        return np.frombuffer(body[hlen:], np.float32).reshape(out["shape"])

    async def result(self) -> np.ndarray:
        return await self.loop.run_in_executor(None, self._post)

    async def close(self) -> None:
        self.closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
        for conn in list(self.conns):
            conn.abort()
        for task in list(self.growing):
            task.cancel()


class GrpcioClient:
    """grpcio's synchronous channel, driven without blocking: ``future()`` per request (the C core does the
    I/O on its own threads), a done callback that hands the answer to the event loop. Request and answer
    travel as raw bytes: the request (raw_input_contents) is serialized once, answers are not parsed."""

    INFER = "/inference.GRPCInferenceService/ModelInfer"

    def __init__(self, port: int, x: np.ndarray, timeout_s: float, budget_ms: float) -> None:
        self.target, self.x, self.timeout_s, self.budget_ms = f"127.0.0.1:{port}", x, timeout_s, budget_ms
        self.channel: Any = None
        self.inflight: dict[Any, float] = {}  # call -> started, for the timeout sweep
        self.landed: deque[tuple[Any, Done, Any, float, float]] = deque()  # answered, for the loop to take
        self.woken = False  # a drain of ``landed`` is already scheduled on the loop
        self.replies: dict[tuple[str, str], Reply] = {}
        self.sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    async def open(self) -> None:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self.loop = asyncio.get_running_loop()
        self.grpc = grpc
        self.channel = grpc.insecure_channel(self.target)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        meta_req = service_pb2.ModelMetadataRequest(name=MODEL)
        meta = await self.loop.run_in_executor(None, lambda: self.stub.ModelMetadata(meta_req, timeout=10))
        self.in_name, self.out_name = meta.inputs[0].name, meta.outputs[0].name
        req = service_pb2.ModelInferRequest(model_name=MODEL)
        inp = req.inputs.add()
        inp.name, inp.datatype = self.in_name, "FP32"
        inp.shape.extend(self.x.shape)
        req.outputs.add().name = self.out_name
        req.raw_input_contents.append(self.x.tobytes())
        if self.budget_ms > 0:
            req.parameters["timeout"].int64_param = int(self.budget_ms * 1e3)
        self.request = req
        self.wire = req.SerializeToString()
        self.raw_infer = self.channel.unary_unary(self.INFER)  # no serializers: bytes in, bytes out
        # Like tritonclient's default, no gRPC deadline unless a budget is asked for: the server takes a
        # deadline as the time the client is willing to wait. The client's own limit is a local timeout.
        self.deadline = self.budget_ms / 1e3 if self.budget_ms > 0 else None
        self.sweeper = self.loop.call_later(0.5, self._sweep)

    def begin(self) -> None:
        pass

    def send(self, done: Done, token: Any) -> None:
        started = time.perf_counter()
        call = self.raw_infer.future(self.wire, timeout=self.deadline)
        self.inflight[call] = started
        call.add_done_callback(lambda c: self._landed(c, done, token, started))

    def _landed(self, call: Any, done: Done, token: Any, started: float) -> None:
        """On a grpc thread (or this one, for a call already over): queue the answer, wake the loop once."""
        self.landed.append((call, done, token, started, time.perf_counter()))
        if not self.woken:
            self.woken = True
            with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is closed, the run is over
                self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self.woken = False
        landed, inflight = self.landed, self.inflight
        while landed:
            call, done, token, started, finished = landed.popleft()
            inflight.pop(call, None)
            done(token, started, finished, self._reply(call))

    def _reply(self, call: Any) -> Reply:
        if call.cancelled():  # only our own sweep cancels
            return self._cached("timeout", "client timeout")
        code = call.code()
        status = self.grpc.StatusCode
        if code is status.OK:
            return OK
        details = call.details() or ""
        if code is status.UNAVAILABLE:
            return self._cached("rejected", details[:120])
        if code is status.DEADLINE_EXCEEDED:
            return self._cached("timeout", "DEADLINE_EXCEEDED")
        return self._cached("other", f"{code.name} {details[:80]!r}")

    def _cached(self, outcome: Outcome, detail: str) -> Reply:
        reply = self.replies.get((outcome, detail))
        if reply is None:
            reply = self.replies[(outcome, detail)] = Reply(outcome, detail=detail)
        return reply

    def _sweep(self) -> None:
        limit = time.perf_counter() - self.timeout_s
        for call in [c for c, started in list(self.inflight.items()) if started < limit]:
            call.cancel()  # its done callback answers "timeout"
        if not self.closed:
            self.sweeper = self.loop.call_later(0.5, self._sweep)

    async def infer(self) -> tuple[float, float, Reply]:
        fut: asyncio.Future[tuple[float, float, Reply]] = self.loop.create_future()
        self.send(lambda _, s, d, r: fut.set_result((s, d, r)), None)
        return await fut

    async def result(self) -> np.ndarray:
        resp = await self.loop.run_in_executor(None, lambda: self.stub.ModelInfer(self.request, timeout=10))
        return np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(list(resp.outputs[0].shape))

    async def close(self) -> None:
        self.closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
        if self.channel is not None:
            self.channel.close()


# A minimal gRPC client: HTTP/2 on an asyncio protocol, just what a unary call needs. grpcio, sync or aio,
# spends some 300-500 µs of this process's CPU per call here (its Python layer and threads), which at 10x
# capacity is most of a core taken from the server; this one spends a fraction of that. One connection,
# streams multiplexed on it; flow control both ways; the request (headers and gRPC-framed message) built
# once; answers judged by grpc-status/grpc-message from the trailers, the message itself not parsed. We
# advertise a zero-size HPACK dynamic table, so each answer's header block decodes on its own (and is cached).

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_FRAME = struct.Struct(">IBI")  # length << 8 | type, flags, stream id
H2_WINDOW_MAX = 2**31 - 1
GRPC_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
              "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")  # fmt: skip
H2_RST = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR", 5: "STREAM_CLOSED",
          6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL", 11: "ENHANCE_YOUR_CALM"}  # fmt: skip
# RFC 7541 appendix A: the static table's names (1-61); the entries that carry a value too.
HPACK_NAMES = (
    b":authority :method :method :path :path :scheme :scheme :status :status :status :status :status :status "
    b":status accept-charset accept-encoding accept-language accept-ranges accept access-control-allow-origin age "
    b"allow authorization cache-control content-disposition content-encoding content-language content-length "
    b"content-location content-range content-type cookie date etag expect expires from host if-match "
    b"if-modified-since if-none-match if-range if-unmodified-since last-modified link location max-forwards "
    b"proxy-authenticate proxy-authorization range referer refresh retry-after server set-cookie "
    b"strict-transport-security transfer-encoding user-agent vary via www-authenticate"
).split()
HPACK_VALUES = dict(enumerate(b"GET POST / /index.html http https 200 204 206 304 400 404 500".split(), 2)) | {
    16: b"gzip, deflate"
}
# RFC 7541 appendix B: the Huffman code's bit length per symbol (0-255, then EOS), as chr(48 + length). The
# code is canonical: codes of one length are consecutive, in symbol order, so the lengths define it.
HPACK_HUFFMAN_LENGTHS = (
    "=GLLLLLLLHNLLNLLLLLLLLNLLLLLLLLL6::<=68;::8;8666555666666678?6<:=67777777777777777777777878=C=>6?56565666577"
    "666567655677777?;>=LDFDDFFFGFGGGGGHGHHFGHGGGGEFGFGGHFEDFFGGEGFFHEFGGEEFEGFGGDFFFGFFGJJDCFGFIJJJKKJHICEJKKJK"
    "HEEJJLKKKDHDEFEEGFFIIHHJGJKJJKKKKKLKKKKKJN"
)


def _huffman_table() -> dict[tuple[int, int], int]:
    table, code, prev = {}, 0, 0
    for length, sym in sorted((ord(c) - 48, s) for s, c in enumerate(HPACK_HUFFMAN_LENGTHS)):
        code <<= length - prev
        table[(length, code)] = sym
        code, prev = code + 1, length
    return table


HUFFMAN = _huffman_table()


def huffman_decode(data: bytes) -> bytes:
    out, code, n = bytearray(), 0, 0
    for byte in data:
        for shift in range(7, -1, -1):
            code, n = code << 1 | (byte >> shift) & 1, n + 1
            sym = HUFFMAN.get((n, code))
            if sym is not None:
                if sym == 256:
                    raise ValueError("EOS inside a Huffman string")
                out.append(sym)
                code, n = 0, 0
    if n > 7 or code != (1 << n) - 1:
        raise ValueError("bad Huffman padding")
    return bytes(out)


def hpack_int(block: bytes, i: int, prefix: int) -> tuple[int, int]:
    mask = (1 << prefix) - 1
    value = block[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    while True:
        b = block[i]
        i += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def hpack_str(block: bytes, i: int) -> tuple[bytes, int]:
    huffman = block[i] & 0x80
    n, i = hpack_int(block, i, 7)
    raw = block[i : i + n]
    if len(raw) < n:
        raise ValueError("truncated HPACK string")
    return (huffman_decode(raw) if huffman else raw), i + n


def hpack_decode(block: bytes) -> list[tuple[bytes, bytes]]:
    """A header block, for a decoder whose dynamic table holds nothing (we advertise a size of 0)."""
    fields, i = [], 0
    while i < len(block):
        b = block[i]
        if b & 0x80:  # indexed field
            index, i = hpack_int(block, i, 7)
            if not 1 <= index <= len(HPACK_NAMES):
                raise ValueError(f"HPACK index {index} outside the static table")
            fields.append((HPACK_NAMES[index - 1], HPACK_VALUES.get(index, b"")))
        elif b & 0xE0 == 0x20:  # dynamic table size update
            _, i = hpack_int(block, i, 5)
        else:  # literal: with incremental indexing (01), without (0000) or never indexed (0001)
            index, i = hpack_int(block, i, 6 if b & 0x40 else 4)
            if index > len(HPACK_NAMES):
                raise ValueError(f"HPACK name index {index} outside the static table")
            name = HPACK_NAMES[index - 1] if index else None
            if name is None:
                name, i = hpack_str(block, i)
            value, i = hpack_str(block, i)
            fields.append((name, value))
    return fields


def hpack_literal(name: bytes, value: bytes) -> bytes:
    """A literal field without indexing, new name, no Huffman (names and values here are short)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


class _H2Stream:
    __slots__ = ("closed", "done", "http", "message", "queued", "sent", "sid", "started", "status", "token", "window")

    def __init__(self, sid: int, done: Done, token: Any, window: int) -> None:
        self.sid, self.done, self.token, self.window = sid, done, token, window
        self.started, self.sent, self.queued, self.closed = 0.0, 0, False, False
        self.http: bytes | None = None
        self.status: bytes | None = None
        self.message = b""


class _H2Conn(asyncio.Protocol):
    """One HTTP/2 connection carrying gRPC unary calls."""

    def __init__(self, client: GrpcClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.streams: dict[int, _H2Stream] = {}
        self.next_sid = 1
        self.send_window = 65535  # the connection's, as the server grants it
        self.peer_initial, self.peer_max_frame, self.peer_max_streams = 65535, 16384, H2_WINDOW_MAX
        self.received = 0  # DATA bytes since our last connection WINDOW_UPDATE
        self.blocked: deque[_H2Stream] = deque()  # streams with DATA left to send, waiting for window
        self.fragment: tuple[int, int, bytearray] | None = None  # a header block awaiting CONTINUATION
        self.ready: asyncio.Future[None] = client.loop.create_future()  # the server's first SETTINGS came
        self.usable = True  # no GOAWAY, not lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # SETTINGS: HEADER_TABLE_SIZE 0, ENABLE_PUSH 0, INITIAL_WINDOW_SIZE max; then the connection window
        settings = struct.pack(">HIHIHI", 1, 0, 2, 0, 4, H2_WINDOW_MAX)
        transport.write(  # type: ignore[attr-defined]
            H2_PREFACE + H2_FRAME.pack(len(settings) << 8 | 4, 0, 0) + settings
            + H2_FRAME.pack(4 << 8 | 8, 0, 0) + struct.pack(">I", H2_WINDOW_MAX - 65535)
        )  # fmt: skip

    def start(self, done: Done, token: Any) -> None:
        sid = self.next_sid
        self.next_sid += 2
        st = _H2Stream(sid, done, token, self.peer_initial)
        self.streams[sid] = st
        block = self.client.header_block
        out: list[bytes | memoryview] = [H2_FRAME.pack(len(block) << 8 | 1, 0x4, sid), block]  # END_HEADERS
        self._push(st, out)
        st.started = time.perf_counter()
        try:
            assert self.transport is not None
            self.transport.writelines(out)
        except (OSError, RuntimeError, AssertionError) as exc:
            self._finish(st, time.perf_counter(), Reply("conn", detail=type(exc).__name__))

    def _push(self, st: _H2Stream, out: list[bytes | memoryview]) -> None:
        """Append the DATA frames that the windows allow for ``st``; queue it if some data must wait."""
        msg = self.client.message
        total = len(msg)
        while st.sent < total:
            n = min(total - st.sent, self.peer_max_frame, st.window, self.send_window)
            if n <= 0:
                if not st.queued:
                    st.queued = True
                    self.blocked.append(st)
                return
            end = st.sent + n
            out.append(H2_FRAME.pack(n << 8, 1 if end == total else 0, st.sid))  # END_STREAM on the last
            out.append(msg[st.sent : end])
            st.sent, st.window, self.send_window = end, st.window - n, self.send_window - n

    def _flush(self) -> None:
        out: list[bytes | memoryview] = []
        for _ in range(len(self.blocked)):
            if self.send_window <= 0:
                break
            st = self.blocked.popleft()
            st.queued = False
            if not st.closed:
                self._push(st, out)
        if out and self.transport is not None:
            self.transport.writelines(out)

    def data_received(self, data: bytes) -> None:
        t = time.perf_counter()
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        try:
            while end - pos >= 9:
                lt, flags, sid = H2_FRAME.unpack_from(buf, pos)
                n, typ, sid = lt >> 8, lt & 0xFF, sid & 0x7FFFFFFF
                if end - pos - 9 < n:
                    break
                p, pos = pos + 9, pos + 9 + n
                if typ == 0:  # DATA: the answer's message is not looked at; it counts against our window
                    self._data(sid, flags, n, t)
                elif typ == 1 or typ == 9:  # HEADERS, CONTINUATION
                    self._headers(typ, sid, flags, bytes(buf[p:pos]), t)
                elif typ == 3:  # RST_STREAM
                    st = self.streams.get(sid)
                    if st is not None:
                        code = int.from_bytes(buf[p : p + 4], "big")
                        name = H2_RST.get(code, str(code))
                        if code == 7:  # not processed at all
                            self._finish(st, t, Reply("conn", detail=f"RST_STREAM {name}"))
                        else:
                            self._finish(st, t, self.client.reply_for(None, b"1" if code == 8 else b"13",
                                                                      f"RST_STREAM {name}".encode()))  # fmt: skip
                elif typ == 4 and not flags & 1:  # SETTINGS (not an ACK)
                    self._settings(bytes(buf[p:pos]))
                elif typ == 6 and not flags & 1:  # PING: answer it
                    assert self.transport is not None
                    self.transport.write(H2_FRAME.pack(8 << 8 | 6, 1, 0) + bytes(buf[p:pos]))
                elif typ == 7:  # GOAWAY: streams above last-stream-id were not processed
                    last = int.from_bytes(buf[p : p + 4], "big") & 0x7FFFFFFF
                    code = int.from_bytes(buf[p + 4 : p + 8], "big")
                    self.usable = False
                    self.client.conn_gone(self)
                    for st in [s for s in self.streams.values() if s.sid > last]:
                        self._finish(st, t, Reply("conn", detail=f"GOAWAY {H2_RST.get(code, code)}"))
                elif typ == 8:  # WINDOW_UPDATE
                    inc = int.from_bytes(buf[p : p + 4], "big") & 0x7FFFFFFF
                    if sid == 0:
                        self.send_window += inc
                    elif (st := self.streams.get(sid)) is not None:
                        st.window += inc
                    if self.blocked:
                        self._flush()
        except (ValueError, IndexError, struct.error) as exc:  # a frame we cannot read: the connection is lost
            del buf[:pos]
            self.broken(f"{type(exc).__name__}: {exc}")
            return
        del buf[:pos]
        if not self.usable and not self.streams and self.transport is not None:
            self.transport.close()

    def _data(self, sid: int, flags: int, n: int, t: float) -> None:
        self.received += n
        if self.received > H2_WINDOW_MAX // 2 and self.transport is not None:
            self.transport.write(H2_FRAME.pack(4 << 8 | 8, 0, 0) + struct.pack(">I", self.received))
            self.received = 0
        # Each stream's window (2^31 - 1) is far more than one answer here, so no stream WINDOW_UPDATE.
        if flags & 1 and (st := self.streams.get(sid)) is not None:
            self._end(st, t)

    def _headers(self, typ: int, sid: int, flags: int, payload: bytes, t: float) -> None:
        if typ == 1:
            if flags & 0x8:  # PADDED
                payload = payload[1 : len(payload) - payload[0]]
            if flags & 0x20:  # PRIORITY
                payload = payload[5:]
            if not flags & 0x4:  # no END_HEADERS: CONTINUATION follows
                self.fragment = (sid, flags, bytearray(payload))
                return
            block = payload
        else:
            if self.fragment is None or self.fragment[0] != sid:
                raise ValueError("CONTINUATION out of place")
            self.fragment[2].extend(payload)
            if not flags & 0x4:
                return
            flags, block = self.fragment[1], bytes(self.fragment[2])
            self.fragment = None
        http, status, message = self.client.fields(block)
        st = self.streams.get(sid)
        if st is None:
            return
        if http is not None:
            st.http = http
        if status is not None:
            st.status, st.message = status, message
        if flags & 1:  # END_STREAM
            self._end(st, t)

    def _settings(self, payload: bytes) -> None:
        grew = False
        for i in range(0, len(payload) - 5, 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == 3:
                self.peer_max_streams = value
            elif key == 4:
                delta, self.peer_initial = value - self.peer_initial, value
                for st in self.streams.values():
                    st.window += delta
                grew = delta > 0
            elif key == 5:
                self.peer_max_frame = value
        assert self.transport is not None
        self.transport.write(H2_FRAME.pack(4, 1, 0))  # SETTINGS ACK
        if not self.ready.done():
            self.ready.set_result(None)
        if grew and self.blocked:
            self._flush()

    def _end(self, st: _H2Stream, t: float) -> None:
        """The server closed its side of ``st``: the answer is complete."""
        if st.sent < len(self.client.message) and self.transport is not None:
            self.transport.write(H2_FRAME.pack(4 << 8 | 3, 0, st.sid) + struct.pack(">I", 8))  # RST_STREAM CANCEL
        self._finish(st, t, self.client.reply_for(st.http, st.status, st.message))

    def _finish(self, st: _H2Stream, t: float, reply: Reply) -> None:
        if self.streams.pop(st.sid, None) is None:
            return
        st.closed = True
        self.client.freed(self)
        st.done(st.token, st.started, t, reply)

    def cancel(self, st: _H2Stream, reply: Reply) -> None:
        """The client gave up on ``st`` (its timeout): RST_STREAM CANCEL, as grpcio does."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(H2_FRAME.pack(4 << 8 | 3, 0, st.sid) + struct.pack(">I", 8))
        self._finish(st, time.perf_counter(), reply)

    def broken(self, why: str) -> None:
        self.usable = False
        self.client.conn_gone(self)
        if self.transport is not None:
            self.transport.abort()
        self._fail_all(why)

    def _fail_all(self, why: str) -> None:
        t = time.perf_counter()
        for st in list(self.streams.values()):
            self._finish(st, t, Reply("conn", detail=why))
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.usable = False
        self.client.conn_gone(self)
        self._fail_all(type(exc).__name__ if exc else "closed by the server")


class GrpcClient:
    """gRPC on the minimal HTTP/2 client above: one connection (another one opened if it is lost or sent
    GOAWAY), at most the server's MAX_CONCURRENT_STREAMS streams on it, the rest waiting their turn."""

    def __init__(self, port: int, x: np.ndarray, timeout_s: float, budget_ms: float) -> None:
        self.port, self.x, self.timeout_s, self.budget_ms = port, x, timeout_s, budget_ms
        self.conn: _H2Conn | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.waiting: deque[tuple[Done, Any, float]] = deque()
        self.blocks: dict[bytes, tuple[bytes | None, bytes | None, bytes]] = {}
        self.replies: dict[tuple[bytes | None, bytes | None, bytes], Reply] = {}
        self.sweeper: asyncio.TimerHandle | None = None
        self.closed = False
        self.setup = GrpcioClient(port, x, timeout_s, budget_ms)  # metadata and the correctness check

    async def open(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.setup.open()
        wire = self.setup.wire
        self.message = memoryview(b"\x00" + len(wire).to_bytes(4, "big") + wire)  # uncompressed, length-prefixed
        block = b"\x83\x86" + b"".join(  # :method POST, :scheme http (static table), then literals
            hpack_literal(k, v)
            for k, v in [(b":path", GrpcioClient.INFER.encode()), (b":authority", f"127.0.0.1:{self.port}".encode()),
                         (b"content-type", b"application/grpc"), (b"te", b"trailers")]
        )  # fmt: skip
        if self.budget_ms > 0:  # as grpcio sends a deadline: grpc-timeout, here in whole microseconds
            block += hpack_literal(b"grpc-timeout", f"{min(int(self.budget_ms * 1e3), 99_999_999)}u".encode())
        self.header_block = block
        await self._connect()
        if self.conn is None:
            raise RuntimeError(f"no HTTP/2 connection to the gRPC port {self.port}")
        self.sweeper = self.loop.call_later(0.5, self._sweep)

    async def _connect(self) -> None:
        """Open a connection; where that fails, the requests waiting for it fail ("conn")."""
        try:
            _, conn = await self.loop.create_connection(lambda: _H2Conn(self), "127.0.0.1", self.port)
            await asyncio.wait_for(conn.ready, 10)
        except (OSError, TimeoutError) as exc:
            self.connecting = None
            now = time.perf_counter()
            while self.waiting:
                done, token, _ = self.waiting.popleft()
                done(token, now, now, Reply("conn", detail=type(exc).__name__))
            return
        self.connecting = None
        self.conn = conn
        self.freed(conn)

    def begin(self) -> None:
        pass

    def send(self, done: Done, token: Any) -> None:
        conn = self.conn
        if conn is not None and conn.usable and len(conn.streams) < conn.peer_max_streams and not self.waiting:
            conn.start(done, token)
            return
        self.waiting.append((done, token, time.perf_counter()))
        if (conn is None or not conn.usable) and self.connecting is None and not self.closed:
            self.conn = None
            self.connecting = self.loop.create_task(self._connect())

    def freed(self, conn: _H2Conn) -> None:
        """A stream on ``conn`` ended (or ``conn`` is new): start waiting requests while it has room."""
        while self.waiting and conn is self.conn and conn.usable and len(conn.streams) < conn.peer_max_streams:
            done, token, _ = self.waiting.popleft()
            conn.start(done, token)

    def conn_gone(self, conn: _H2Conn) -> None:
        if conn is self.conn:
            self.conn = None
            if self.waiting and self.connecting is None and not self.closed:
                self.connecting = self.loop.create_task(self._connect())

    def fields(self, block: bytes) -> tuple[bytes | None, bytes | None, bytes]:
        """(:status, grpc-status, grpc-message) of a header block; each distinct block decoded once."""
        found = self.blocks.get(block)
        if found is None:
            got = dict(hpack_decode(block))
            found = (got.get(b":status"), got.get(b"grpc-status"), got.get(b"grpc-message", b""))
            if len(self.blocks) < 100_000:
                self.blocks[block] = found
        return found

    def reply_for(self, http: bytes | None, status: bytes | None, message: bytes) -> Reply:
        key = (http, status, message)
        reply = self.replies.get(key)
        if reply is None:
            reply = self.replies[key] = self._reply(http, status, message)
        return reply

    @staticmethod
    def _reply(http: bytes | None, status: bytes | None, message: bytes) -> Reply:
        details = urllib.parse.unquote(message.decode("utf-8", "replace"))
        if status is None:
            return Reply("other", detail=f"HTTP {http.decode() if http else '?'}, no grpc-status")
        code = int(status) if status.isdigit() else -1
        if code == 0:
            return OK
        if code == 14:
            return Reply("rejected", detail=details[:120])
        if code == 4:
            return Reply("timeout", detail="DEADLINE_EXCEEDED")
        name = GRPC_CODES[code] if 0 <= code < len(GRPC_CODES) else f"status {status.decode()}"
        return Reply("other", detail=f"{name} {details[:80]!r}")

    def _sweep(self) -> None:
        limit = time.perf_counter() - self.timeout_s
        if self.conn is not None:
            for st in [s for s in self.conn.streams.values() if s.started < limit]:
                self.conn.cancel(st, Reply("timeout", detail="client timeout"))
        while self.waiting and self.waiting[0][2] < limit:
            done, token, queued = self.waiting.popleft()
            done(token, queued, time.perf_counter(), Reply("timeout", detail="client timeout (not sent)"))
        if not self.closed:
            self.sweeper = self.loop.call_later(0.5, self._sweep)

    async def infer(self) -> tuple[float, float, Reply]:
        fut: asyncio.Future[tuple[float, float, Reply]] = self.loop.create_future()
        self.send(lambda _, s, d, r: fut.set_result((s, d, r)), None)
        return await fut

    async def result(self) -> np.ndarray:
        return await self.setup.result()

    async def close(self) -> None:
        self.closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
        if self.connecting is not None:
            self.connecting.cancel()
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.close()
        await self.setup.close()


Client = HttpClient | GrpcClient | GrpcioClient


# -- load ---------------------------------------------------------------------------------------------------


@dataclass
class Level:
    level: float  # multiple of capacity; 0 for the closed loop
    target_rps: float
    offered_rps: float
    window_s: float
    admitted_rps: float
    counts: dict[str, int]
    ok_p50_ms: float
    ok_p99_ms: float
    rej_p50_ms: float
    rej_p99_ms: float
    lag_p99_ms: float  # how late the client started requests against their schedule
    drain_s: float  # from the last request fired to the last answer: the queue left behind
    server_rows_rps: float = math.nan  # rows the server's engine ran per second during the window (/metrics)
    engine_busy: float = math.nan  # share of the window the engine was computing (/metrics)
    retry_after: dict[str, int] = field(default_factory=dict)
    json_error: int = 0
    details: dict[str, int] = field(default_factory=dict)
    client_cpu_us: float = math.nan  # this process's CPU time (all threads) per request sent, in µs


def summarize(level: float, target: float, t0: float, samples: list[tuple[float, float, float, Reply]]) -> Level:
    """``samples``: (scheduled, started, done, reply), times on one perf_counter clock."""
    starts = [s for _, s, _, _ in samples]
    window = max(starts) - t0 if starts else 0.0
    ok = [(s, d) for _, s, d, r in samples if r.outcome == "ok"]
    rej = [d - s for _, s, d, r in samples if r.outcome == "rejected"]
    done_in_window = sum(1 for _, d in ok if d <= t0 + window)
    rejected = [r for *_, r in samples if r.outcome == "rejected"]
    return Level(
        level=level, target_rps=target, offered_rps=len(samples) / window if window > 0 else math.nan,
        window_s=window, admitted_rps=done_in_window / window if window > 0 else math.nan,
        counts=dict(Counter(r.outcome for *_, r in samples)),
        ok_p50_ms=pct([d - s for s, d in ok], 50), ok_p99_ms=pct([d - s for s, d in ok], 99),
        rej_p50_ms=pct(rej, 50), rej_p99_ms=pct(rej, 99),
        lag_p99_ms=pct([s - sc for sc, s, _, _ in samples], 99),
        drain_s=max((d for _, _, d, _ in samples), default=t0 + window) - (t0 + window),
        retry_after=dict(Counter(str(r.retry_after) for r in rejected if r.retry_after is not None)),
        json_error=sum(r.json_error for r in rejected),
        details=dict(Counter(f"{r.outcome}: {r.detail}" for *_, r in samples if r.outcome != "ok" and r.detail)),
    )  # fmt: skip


async def closed_loop(client: Client, concurrency: int, seconds: float, port: int) -> Level:
    for _ in range(10 * concurrency):  # warm connections and the server's path
        await client.infer()
    samples: list[tuple[float, float, float, Reply]] = []
    loop = asyncio.get_running_loop()
    window = await loop.run_in_executor(None, EngineWindow, port, seconds)
    t0 = time.perf_counter()
    end = t0 + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            asked = time.perf_counter()
            started, done, reply = await client.infer()
            samples.append((asked, started, done, reply))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    out = summarize(0.0, math.nan, t0, samples)
    n_ok = out.counts.get("ok", 0)
    out.window_s, out.admitted_rps, out.offered_rps = elapsed, n_ok / elapsed, len(samples) / elapsed
    await loop.run_in_executor(None, window.apply, out)
    return out


def engine_counters(port: int) -> tuple[float, float, float] | None:
    """(time, rows run, engine seconds) from the server's /metrics, for the model; None where it has none."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("kiln_batch_size_sum", "kiln_compute_seconds_sum"):
            if line.startswith(name + "{") and f'model="{MODEL}"' in line:
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    if len(found) < 2:
        return None
    return time.perf_counter(), found["kiln_batch_size_sum"], found["kiln_compute_seconds_sum"]


class EngineWindow:
    """The server's engine counters at the start of a window and, from a timer thread (so that a busy event
    loop in this process does not delay it), at its planned end."""

    def __init__(self, port: int, seconds: float) -> None:
        self.port, self.seconds = port, seconds
        self.end: tuple[float, float, float] | None = None
        self.start = engine_counters(port)
        self.timer = threading.Timer(seconds, self._take)
        self.timer.start()

    def _take(self) -> None:
        self.end = engine_counters(self.port)

    def apply(self, level: Level) -> None:
        self.timer.join(self.seconds + 10)
        if self.start and self.end and self.end[0] > self.start[0]:
            wall = self.end[0] - self.start[0]
            level.server_rows_rps = (self.end[1] - self.start[1]) / wall
            level.engine_busy = (self.end[2] - self.start[2]) / wall


def schedule(rate: float, seconds: float, arrivals: str, rng: np.random.Generator) -> np.ndarray:
    n = min(MAX_REQUESTS_PER_LEVEL, max(1, int(rate * seconds)))
    if arrivals == "fixed":
        return np.arange(n) / rate
    return np.cumsum(rng.exponential(1 / rate, n))


async def open_loop(
    client: Client, level: float, rate: float, seconds: float, arrivals: str, args: argparse.Namespace, seed: int
) -> Level:
    """Fire each request at its scheduled time, whether or not the earlier ones have finished.

    One timer callback fires everything due within the next millisecond (or late), then sleeps until the
    next one is due: no task or coroutine per request."""
    times: list[float] = schedule(rate, seconds, arrivals, np.random.default_rng(seed)).tolist()
    n = len(times)
    samples: list[tuple[float, float, float, Reply]] = []
    append = samples.append
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def done(scheduled: float, started: float, answered: float, reply: Reply) -> None:
        append((scheduled, started, answered, reply))
        if len(samples) == n and not finished.done():
            finished.set_result(None)

    send = client.send
    i = 0

    def tick() -> None:
        nonlocal i
        now = time.perf_counter() - t0 + 1e-3  # everything due within 1 ms (or late) goes now
        while i < n and times[i] <= now:
            send(done, t0 + times[i])
            i += 1
        if i < n:
            loop.call_later(times[i] - (time.perf_counter() - t0), tick)

    window = await loop.run_in_executor(None, EngineWindow, args.http_port, times[-1])
    client.begin()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    tick()
    # every request has a client timeout; this bound is only a safety net
    await asyncio.wait({finished}, timeout=times[-1] + args.client_timeout + 5)
    cpu = time.process_time() - cpu0
    out = summarize(level, rate, t0, list(samples))
    out.client_cpu_us = cpu / len(samples) * 1e6 if samples else math.nan
    await loop.run_in_executor(None, window.apply, out)
    return out


# -- the server ---------------------------------------------------------------------------------------------


def http_get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return -1


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of the server and its children, from /proc/<pid>/status."""
    import psutil

    out = {"VmRSS": 0, "VmHWM": 0}
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in out:
                out[key] += int(line.split()[1])
    out["processes"] = len(procs)
    return out


def start_server(repo: Path, work: Path, http_port: int, grpc_port: int, timeout_s: float) -> subprocess.Popen[bytes]:
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - the child holds it; closed when this process exits
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "serve", str(repo), "--host", "127.0.0.1", "--http-port", str(http_port),
         "--grpc-port", str(grpc_port), "--engine-threads", "1", "--log-format", "text", "--timeout", str(timeout_s)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while http_get(http_port, "/v2/health/ready") != 200:
        if time.monotonic() > deadline or proc.poll() is not None:
            stop_server(proc)
            raise RuntimeError("kiln serve did not become ready:\n" + (work / "serve.log").read_text()[-4000:])
        time.sleep(0.1)
    return proc


def stop_server(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(45)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None  # did not stop on SIGTERM


# -- report -------------------------------------------------------------------------------------------------


def fmt(v: float, spec: str = ".1f") -> str:
    """``format(v, spec)``, or a dash as wide as ``spec`` asks where there is no figure."""
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if math.isnan(v) else format(v, spec)


def print_table(
    protocol: str, cap: Level, levels: list[Level], base_p99: float, concurrency: int, probe: Level | None
) -> None:
    print(f"\n{protocol}: capacity {cap.admitted_rps:.1f} infer/s (closed loop, {concurrency} clients, "
          f"{cap.window_s:.1f} s), p50 {fmt(cap.ok_p50_ms, '.2f')} ms, p99 {fmt(cap.ok_p99_ms, '.2f')} ms, "
          f"errors {sum(v for k, v in cap.counts.items() if k != 'ok')}; server engine ran "
          f"{fmt(cap.server_rows_rps)} rows/s, busy {fmt(cap.engine_busy, '.2f')} of the time")  # fmt: skip
    print(f"{'load':>5} {'target/s':>9} {'offered/s':>9} {'lag p99':>8} {'admit/s':>8} {'adm/cap':>7} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'p99/0.5x':>8} {'rejected':>8} {'rej p50':>8} {'rej p99':>8} {'504/DL':>6} {'other':>5} "
          f"{'conn/to':>7} {'srv rows/s':>10} {'busy':>5}")  # fmt: skip
    for lv in levels:
        c = lv.counts
        print(f"{lv.level:>4g}x {lv.target_rps:9.1f} {lv.offered_rps:9.1f} {fmt(lv.lag_p99_ms, '8.2f')} "
              f"{lv.admitted_rps:8.1f} {lv.admitted_rps / cap.admitted_rps:7.2f} {fmt(lv.ok_p50_ms, '8.2f')} "
              f"{fmt(lv.ok_p99_ms, '8.2f')} {fmt(lv.ok_p99_ms / base_p99, '8.2f')} {c.get('rejected', 0):8d} "
              f"{fmt(lv.rej_p50_ms, '8.2f')} {fmt(lv.rej_p99_ms, '8.2f')} {c.get('timeout', 0):6d} "
              f"{c.get('other', 0):5d} {c.get('conn', 0):7d} {fmt(lv.server_rows_rps, '10.1f')} "
              f"{fmt(lv.engine_busy, '5.2f')}")  # fmt: skip
    for lv in levels:
        n_rej = lv.counts.get("rejected", 0)
        notes = []
        if n_rej and protocol == "http":
            ra = ", ".join(f"{k!r}×{v}" for k, v in lv.retry_after.items()) or "none"
            notes.append(f"503s with Retry-After {sum(lv.retry_after.values())}/{n_rej} ({ra}), "
                         f"JSON error body {lv.json_error}/{n_rej} (the first {JSON_SAMPLE} parsed, "
                         "the rest matched on their prefix)")  # fmt: skip
        if lv.drain_s > 0.5:
            notes.append(f"last answer {lv.drain_s:.1f} s after the last request was fired "
                         f"({lv.counts.get('ok', 0)} admitted in all)")  # fmt: skip
        odd = {k: v for k, v in lv.details.items() if not k.startswith("rejected")}
        if odd:
            notes.append("other outcomes: " + ", ".join(f"{k} ×{v}" for k, v in sorted(odd.items())))
        if n_rej and protocol == "grpc":
            top = sorted(((v, k) for k, v in lv.details.items() if k.startswith("rejected")), reverse=True)[:2]
            notes.append("UNAVAILABLE details: " + "; ".join(f"{k[10:]!r} ×{v}" for v, k in top))
        if notes:
            print(f"  {lv.level:g}x: " + "; ".join(notes))
    per_level = ", ".join(f"{lv.level:g}x {fmt(lv.client_cpu_us)}" for lv in levels)
    if probe is not None:
        n = sum(probe.counts.values())
        print(f"  client CPU per request (µs): {fmt(probe.client_cpu_us)} at {probe.target_rps:g}/s for "
              f"{probe.window_s:.1f} s ({n} requests, offered {probe.offered_rps:.0f}/s, lag p99 "
              f"{fmt(probe.lag_p99_ms, '.2f')} ms, {probe.counts.get('ok', 0)} admitted, "
              f"{probe.counts.get('rejected', 0)} rejected); per level: {per_level}")  # fmt: skip
    else:
        print(f"  client CPU per request (µs), per level: {per_level}")


def checks_for(protocol: str, cap: Level, levels: list[Level], base_p99: float, rej_ms: float) -> list[str]:
    lines = []
    for lv in levels:
        if lv.level < 3:
            continue
        tag = f"{protocol} {lv.level:g}x"
        share = lv.admitted_rps / cap.admitted_rps
        lines.append(f"{tag}: admitted {lv.admitted_rps:.1f}/s = {share:.2f} × capacity (needs ≥ 0.9): "
                     f"{'PASS' if share >= 0.9 else 'FAIL'}")  # fmt: skip
        ratio = lv.ok_p99_ms / base_p99
        lines.append(f"{tag}: admitted p99 {fmt(lv.ok_p99_ms, '.2f')} ms = {fmt(ratio, '.2f')} × p99 at the lowest "
                     f"level (needs ≤ 2): {'PASS' if ratio <= 2 else 'FAIL'}")  # fmt: skip
        if lv.counts.get("rejected", 0):
            lines.append(f"{tag}: rejection p99 {lv.rej_p99_ms:.2f} ms (needs ≤ {rej_ms:g}): "
                         f"{'PASS' if lv.rej_p99_ms <= rej_ms else 'FAIL'}")  # fmt: skip
        else:
            lines.append(f"{tag}: no request was rejected (nothing to time; the two lines above judge it): PASS")
    return lines


async def after_checks(clients: dict[str, Client], expected: np.ndarray) -> dict[str, str]:
    out = {}
    for protocol, client in clients.items():
        try:
            got = await client.result()
            err = float(np.max(np.abs(got - expected)))
            out[protocol] = f"max |served - in-process| {err:.2e}" + ("" if err <= 1e-4 else " (too large)")
        except Exception as exc:
            out[protocol] = f"failed: {type(exc).__name__}: {exc}"
    return out


# -- main ---------------------------------------------------------------------------------------------------


async def drive(args: argparse.Namespace, ports: dict[str, int], x: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    grpc_maker: type[GrpcClient] | type[GrpcioClient] = GrpcClient if args.grpc_client == "raw" else GrpcioClient
    makers: dict[str, type[Client]] = {"http": HttpClient, "grpc": grpc_maker}
    clients: dict[str, Client] = {}
    results: dict[str, Any] = {}
    try:
        for protocol in args.protocols:
            client = makers[protocol](ports[protocol], x, args.client_timeout, args.budget_ms)
            clients[protocol] = client
            await client.open()
            cap = await closed_loop(client, args.concurrency, args.capacity_seconds, args.http_port)
            if not cap.admitted_rps > 0:
                raise RuntimeError(f"{protocol}: no request succeeded in the closed loop: {cap.details}")
            levels = []
            for i, level in enumerate(args.levels):
                await asyncio.sleep(0.5)  # let the previous level's stragglers clear
                rate = level * cap.admitted_rps
                levels.append(await open_loop(client, level, rate, args.seconds, args.arrivals, args, 1000 * i + 7))
            probe = None
            if args.probe_rps > 0 and args.probe_seconds > 0:  # the client's own cost, at a fixed rate
                await asyncio.sleep(0.5)
                probe = await open_loop(client, math.nan, args.probe_rps, args.probe_seconds, "fixed", args, 99)
            lowest = min(levels, key=lambda lv: lv.level) if levels else None
            base_p99 = lowest.ok_p99_ms if lowest is not None and lowest.level < 1 else cap.ok_p99_ms
            print_table(protocol, cap, levels, base_p99, args.concurrency, probe)
            results[protocol] = {"capacity": cap, "levels": levels, "base_p99_ms": base_p99, "cpu_probe": probe}
        results["after"] = await after_checks(clients, expected)
    finally:
        for client in clients.values():
            await client.close()
    return results


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro), "asyncio"
    return uvloop.run(coro), "uvloop"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each open-loop level")
    ap.add_argument("--capacity-seconds", type=float, default=4.0, help="length of the closed-loop capacity run")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.5, 1.5, 3.0, 10.0], help="multiples of capacity")
    ap.add_argument("--protocols", nargs="+", choices=["http", "grpc"], default=["http", "grpc"])
    ap.add_argument("--concurrency", type=int, default=4, help="clients in the closed loop")
    ap.add_argument("--model-ms", type=float, default=5.0, help="batch-1 engine time to size the CNN for")
    ap.add_argument("--arrivals", choices=["poisson", "fixed"], default="poisson")
    ap.add_argument("--client-timeout", type=float, default=30.0, help="seconds before the client gives up")
    ap.add_argument("--server-timeout", type=float, default=30.0, help="kiln serve --timeout")
    ap.add_argument("--budget-ms", type=float, default=0.0, help="per-request timeout sent to the server; 0: none")
    ap.add_argument("--rejection-ms", type=float, default=5.0, help="the rejection p99 check's bound")
    ap.add_argument(
        "--grpc-client",
        choices=["raw", "grpcio"],
        default="raw",
        help="gRPC load generator: a minimal HTTP/2 client (cheap) or grpcio's (for comparison)",
    )
    ap.add_argument("--probe-rps", type=float, default=1000.0, help="rate of the client CPU probe; 0: none")
    ap.add_argument("--probe-seconds", type=float, default=2.0, help="length of the client CPU probe")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.capacity_seconds <= 0 or args.seconds > 600 or min(args.levels) <= 0:
        ap.error("--seconds and --capacity-seconds must be in (0, 600] and every level > 0")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 10x capacity opens many sockets at once
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))

    work = Path(tempfile.mkdtemp(prefix="kiln-overload-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    import kiln

    repo, side, ms = import_cnn(work, args.model_ms)
    x = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
    with kiln.load(repo, MODEL) as p:
        expected = next(iter(p.predict(x).values()))
    print(f"machine: {os.cpu_count()} logical cores, shared by server and client; server engine threads: 1")
    print(f"model: CNN on {side}x{side} images, batch-1 engine {ms:.2f} ms in process "
          f"(~{1e3 / ms:.0f} infer/s); open loop {args.seconds:g} s per level, {args.arrivals} arrivals, "
          f"client timeout {args.client_timeout:g} s, budget sent {args.budget_ms or 'none'}")  # fmt: skip

    ports = {"http": free_port(), "grpc": free_port()}
    args.http_port = ports["http"]
    proc = start_server(repo, work, ports["http"], ports["grpc"], args.server_timeout)
    exit_code: int | None = None
    try:
        mem_start = memory_kb(proc.pid)
        results, loop_kind = run_async(drive(args, ports, x, expected))
        alive = proc.poll() is None
        ready = http_get(ports["http"], "/v2/health/ready")
        mem_end = memory_kb(proc.pid) if alive else {}
    finally:
        exit_code = stop_server(proc)
    print(f"\nclient event loop: {loop_kind}")
    if mem_end:
        print(f"server memory: VmRSS {mem_start['VmRSS'] / 1024:.0f} MiB after start, "
              f"{mem_end['VmRSS'] / 1024:.0f} MiB at the end, peak VmHWM {mem_end['VmHWM'] / 1024:.0f} MiB "
              f"({mem_end['processes']} process(es))")  # fmt: skip
    print(f"after the run: /v2/health/ready {ready}; "
          + "; ".join(f"{k} inference {v}" for k, v in results["after"].items()))  # fmt: skip
    print(f"kiln serve exited with {exit_code} after SIGTERM")

    checks = []
    for protocol in args.protocols:
        r = results[protocol]
        checks += checks_for(protocol, r["capacity"], r["levels"], r["base_p99_ms"], args.rejection_ms)
    healthy = ready == 200 and all(v.startswith("max") and "too large" not in v for v in results["after"].values())
    checks.append(f"server healthy afterwards (ready, correct answers): {'PASS' if healthy else 'FAIL'}")
    checks.append(f"no crash (alive at the end, exit {exit_code} on SIGTERM): "
                  f"{'PASS' if alive and exit_code == 0 else 'FAIL'}")  # fmt: skip
    print("\nchecks")
    for line in checks:
        print(line)
    if args.json:
        figures = {
            "machine_cores": os.cpu_count(), "image_side": side, "engine_ms": ms,
            "args": vars(args) | {"json": str(args.json)},
            "protocols": {p: {"capacity": asdict(results[p]["capacity"]), "base_p99_ms": results[p]["base_p99_ms"],
                              "levels": [asdict(lv) for lv in results[p]["levels"]],
                              "cpu_probe": asdict(results[p]["cpu_probe"]) if results[p]["cpu_probe"] else None}
                          for p in args.protocols},
            "memory_kb": {"start": mem_start, "end": mem_end}, "ready_after": ready, "after": results["after"],
            "exit_code": exit_code, "checks": checks,
        }  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        print(f"figures written to {args.json}")
    failed = not all(line.endswith("PASS") for line in checks)
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
