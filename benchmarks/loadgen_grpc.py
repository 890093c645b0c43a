"""A minimal gRPC client for ``overload.py``: HTTP/2 on an asyncio protocol, with its own HPACK decoding of
the few headers a unary call answers with."""

from __future__ import annotations

import asyncio
import struct
import time
import urllib.parse
from collections import deque
from typing import Any

import numpy as np
from loadgen_http import OK, Done, GrpcioClient, Reply

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
