"""HTTP content codings: gzip and deflate request bodies (tritonclient's ``request_compression_algorithm``)
and responses (its ``response_compression_algorithm``), as Triton supports them.

A compressed body is inflated incrementally as it arrives, and refused (413) once its decompressed size
passes the server's body limit, so a small compressed body cannot expand without bound. A response
is compressed only when ``Accept-Encoding`` asks for gzip or deflate, and only successful responses (the
clients read error bodies as plain JSON).
"""

from __future__ import annotations

import gzip
import zlib
from typing import Literal

from kiln.errors import DecompressedTooLargeError, ProtocolError, UnsupportedEncodingError

Coding = Literal["gzip", "deflate"]
_CODINGS: dict[str, Coding | None] = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate", "identity": None}
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # deflate in HTTP is the zlib format


def request_coding(header: str | None) -> Coding | None:
    """The coding named by ``Content-Encoding``; None for none or identity; 415 for anything else."""
    if header is None:
        return None
    value = header.strip().lower()
    if not value:
        return None
    if value not in _CODINGS:
        raise UnsupportedEncodingError(
            "Content-Encoding", f"{header!r} is not supported; send the body as gzip, deflate or identity"
        )
    return _CODINGS[value]


class Inflater:
    """Decompresses a body chunk by chunk, never holding more than ``limit`` decompressed bytes."""

    def __init__(self, coding: Coding, limit: int) -> None:
        self.coding = coding
        self.limit = limit
        self.size = 0
        self._z = zlib.decompressobj(_WBITS[coding])
        self._parts: list[bytes] = []

    def feed(self, data: bytes) -> None:
        z = self._z
        while data:
            if z.eof:
                raise ProtocolError("body", f"data follows the end of the {self.coding} stream")
            try:
                piece = z.decompress(data, self.limit - self.size + 1)
            except zlib.error as exc:
                raise ProtocolError("body", f"is not valid {self.coding} data ({exc})") from None
            self._add(piece)
            data = z.unconsumed_tail
            if z.eof and z.unused_data:
                raise ProtocolError("body", f"data follows the end of the {self.coding} stream")

    def finish(self) -> bytes:
        try:
            self._add(self._z.flush())
        except zlib.error as exc:
            raise ProtocolError("body", f"is not valid {self.coding} data ({exc})") from None
        if not self._z.eof:
            raise ProtocolError("body", f"the {self.coding} stream ends early (truncated body?)")
        parts, self._parts = self._parts, []
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _add(self, piece: bytes) -> None:
        if piece:
            self.size += len(piece)
            if self.size > self.limit:
                raise DecompressedTooLargeError(self.size, self.limit, self.coding)
            self._parts.append(piece)


def response_coding(accept: str | None) -> Coding | None:
    """gzip or deflate when ``Accept-Encoding`` lists one of them (gzip first), else None (identity)."""
    if not accept:
        return None
    wanted: set[str] = set()
    for item in accept.lower().split(","):
        coding, _, params = item.partition(";")
        q = params.strip()
        if q.startswith("q="):
            try:
                if float(q[2:]) <= 0:
                    continue
            except ValueError:
                continue
        wanted.add(coding.strip())
    if "gzip" in wanted or "x-gzip" in wanted:
        return "gzip"
    if "deflate" in wanted:
        return "deflate"
    return None


MIN_COMPRESS_BYTES = 1024  # below this a response goes as it is: compressing it costs more than it saves


def compress(payload: bytes | memoryview, coding: Coding) -> bytes:
    """Level 1: most of the size saving of the default level at a fraction of the CPU on the event loop."""
    if coding == "gzip":
        return gzip.compress(payload, compresslevel=1, mtime=0)
    return zlib.compress(payload, 1)


__all__ = [
    "MIN_COMPRESS_BYTES",
    "Coding",
    "Inflater",
    "compress",
    "request_coding",
    "response_coding",
]
