"""The bytes of requests the server holds at once, bounded.

``max_body_bytes`` bounds one request; nothing bounded them all. A queue of 256 requests at 64 MiB each
is 16 GiB held while they wait, and a few hundred clients uploading bodies at once would take the process
past its memory before admission sees a single one. The budget counts each HTTP body from its declared
length (or chunk by chunk as it arrives, when it has none) and each gRPC message once it is received, and
gives the bytes back when the request is answered. A request that would take the total past
``max_inflight_bytes`` is refused at once (HTTP 503 with ``Retry-After``, gRPC UNAVAILABLE) before any more
of it is read; one request alone always fits, so the limit never refuses what ``max_body_bytes`` allows on
an idle server. The server runs it on its event loop's thread only: no lock.
"""

from __future__ import annotations

from kiln.errors import RequestMemoryFullError


class BodyBudget:
    """Bytes held by requests in flight (read, queued or computing), at most ``limit`` but for a lone one."""

    __slots__ = ("held", "limit", "peak")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0

    def take(self, n: int) -> int:
        """Hold ``n`` more bytes, or raise :class:`RequestMemoryFullError` (nothing held then)."""
        if self.held and self.held + n > self.limit:
            raise RequestMemoryFullError(self.held, n, self.limit)
        self.held += n
        self.peak = max(self.peak, self.held)
        return n

    def give(self, n: int) -> None:
        self.held -= n
