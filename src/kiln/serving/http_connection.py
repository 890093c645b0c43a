"""One HTTP/1.1 connection with the limits uvicorn leaves out: a bounded request head, a deadline for it,
and an idle limit while a body is arriving.

uvicorn's httptools protocol puts no bound on the request line and headers (httptools buffers a header value
until it ends), arms its keep-alive timer only after a first response (a connection that never sends a
byte is held for ever) and never times out a request that trickles in a byte at a time (slowloris). These
are the guards nginx applies with ``large_client_header_buffers``, ``client_header_timeout`` and
``client_body_timeout``:

- the request line and headers together may take at most ``max_header_bytes`` (431, then close);
- they must all arrive within ``header_timeout_s`` of the request's first byte (408, then close);
- while a body is arriving, at most ``body_timeout_s`` may pass between two reads of it (408, then close;
  not while kiln itself has paused reading);
- a connection that sends nothing is closed after the keep-alive timeout, as it is between requests.

Every refusal is JSON, like the server's other errors, and closes the connection: after a bad head the rest
of the stream cannot be trusted to start a request. Such closes, and those after an answer given before the
request's body was read (413, an unknown model), linger as nginx's do: FIN after the answer, what still
arrives dropped unparsed, the close when the client ends its side or after ``LINGER_S``, so that the kernel
never resets a connection whose answer the client has not read yet.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

log = logging.getLogger("kiln.serving")

LINGER_S = 5.0  # nginx's lingering_timeout
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class _HeadTooLarge(Exception):
    pass


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded, timed request head and a timed body.

    ``uvicorn.Config(http=guarded_http(...))`` builds it; each limit is a class attribute of the subclass
    that :func:`guarded_http` makes, so uvicorn constructs it with its usual arguments."""

    max_header_bytes = 64 * 2**10
    header_timeout_s = 20.0
    body_timeout_s = 20.0

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any], **kw: Any) -> None:
        super().__init__(config, server_state, app_state, **kw)
        self._in_head = False  # between a request's first byte and the end of its headers
        self._in_body = False  # between the end of its headers and the end of its body
        self._head_bytes = 0  # the bytes of a head that spans chunks, counted as they arrive
        self._head_began_here = False  # the head began inside the chunk being parsed
        self._chunk = 0  # the length of the chunk being parsed
        self._head_deadline = 0.0
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False

    # connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms the keep-alive timer only after a response: a connection that never speaks is idle too
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def close_lingering(self) -> None:
        """Close after an answer given before the request's body was read (413, an unknown model, a refusal).

        Closing at once with the client still sending makes the kernel reset the connection, and a reset
        can destroy the answer before the client reads it. As nginx's ``lingering_close``: end our side
        (FIN after the answer), drop what still arrives unparsed, close when the client ends its side (the
        transport closes itself on EOF) or after ``LINGER_S``."""
        if not self._in_body:
            self.transport.close()
            return
        self._linger()

    def _linger(self) -> None:
        self._refused = True  # data_received drops whatever else arrives
        self._cancel_timer()
        self._unset_keepalive_if_required()
        transport = self.transport
        if transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._timer = self.loop.call_later(LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # closing, or lingering: what the client still sends is dropped unparsed
        self._chunk = len(data)
        super().data_received(data)
        if self._refused or not (self._in_head or self._in_body):
            return  # the usual case: whole requests in the chunk, no timer armed
        if self._in_head:
            if self._head_began_here:  # an unknown part of this chunk ended the previous request
                self._head_began_here = False
            else:
                self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:  # a head still arriving: httptools buffers it whole
                self._refuse(431, self._too_large())
                return
        now = self.loop.time()
        if self._in_body:
            self._last_read = now
        if self._timer is None:  # a request left incomplete at the end of a chunk: from now on it is timed
            self._timer = self.loop.call_later(self._remaining(now), self._check_deadline)

    def send_400_response(self, msg: str) -> None:  # uvicorn's answer to bytes that are not HTTP
        if not self._refused:
            self._refuse(400, "the request is not valid HTTP/1.1", logged=True)  # uvicorn has logged it

    # parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._head_began_here = True, 0, True
        self._head_deadline = self.loop.time() + self.header_timeout_s

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        if not self._head_began_here or self._chunk > self.max_header_bytes:  # else the chunk bounds the head
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)  # "name: value\r\n"
            if size > self.max_header_bytes:
                self._refuse(431, self._too_large())
                raise _HeadTooLarge  # stops httptools; uvicorn's answer to the parse error is then dropped
        self._in_head, self._in_body = False, True
        super().on_headers_complete()
        if self.scope["method"] in _WITH_BODY and self.cycle is not None:
            self.cycle.transport = _LingeringClose(self.transport, self)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._timer is not None:
            self._cancel_timer()
        super().on_message_complete()

    # limits
    def _too_large(self) -> str:
        return (
            f"the request line and headers are larger than {self.max_header_bytes} bytes (KILN_SERVE_MAX_HEADER_BYTES)"
        )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _remaining(self, now: float) -> float:
        if self._in_head:
            return max(0.0, self._head_deadline - now)
        return max(0.0, self._last_read + self.body_timeout_s - now)

    def _check_deadline(self) -> None:
        self._timer = None
        if self._refused or self.transport.is_closing() or not (self._in_head or self._in_body):
            return
        now = self.loop.time()
        if self._in_body and self.flow.read_paused:  # kiln stopped reading, not the client stopped sending
            self._last_read = now
        left = self._remaining(now)
        if left > 0:
            self._timer = self.loop.call_later(left, self._check_deadline)
        elif self._in_head:
            self._refuse(408, f"the request headers did not arrive within {self.header_timeout_s:g} s")
        else:
            self._refuse(408, f"no part of the request body arrived for {self.body_timeout_s:g} s")

    def _refuse(self, status: int, message: str, logged: bool = False) -> None:
        """Answer ``status`` with a JSON error where no response is under way, and close the connection."""
        self._refused = True
        self._cancel_timer()
        self._unset_keepalive_if_required()
        if not logged:
            log.warning("HTTP %d to %s: %s", status, _peer(self.client), message)
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            if self._in_head:  # a pipelined request's head while the one before it is answered: let that
                self.cycle.keep_alive = False  # answer finish, then close; nothing may interleave with it
                return
            if self.cycle.response_started:  # the app is answering: cut it off rather than interleave
                self.transport.close()
                return
            self.cycle.disconnected = True  # the app's later answer to this request is dropped
            self.cycle.message_event.set()
        body = orjson.dumps({"error": message})
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS[status], len(body))
            + body
        )
        self._linger()


class _LingeringClose:
    """A request's view of its transport whose ``close`` lingers while the request's body is unread."""

    __slots__ = ("_protocol", "_transport")

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._protocol.close_lingering()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"


def guarded_http(max_header_bytes: int, header_timeout_s: float, body_timeout_s: float) -> type[HttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these limits."""
    return type(
        "KilnHttpProtocol",
        (GuardedHttpProtocol,),
        {"max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s},
    )
