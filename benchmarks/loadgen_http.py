"""The load generator's HTTP/1.1 client (and grpcio's, for comparison), for ``overload.py``: each request
costs this process as little as possible, so the client is not the limit of a server on the same cores."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Outcome = Literal["ok", "rejected", "timeout", "other", "conn"]
MODEL = "cnn"

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
