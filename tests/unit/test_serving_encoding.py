"""Content codings of HTTP bodies: incremental inflation within the limit, and Accept-Encoding."""

from __future__ import annotations

import gzip
import zlib

import pytest

from kiln.errors import PayloadTooLargeError, ProtocolError, UnsupportedEncodingError
from kiln.serving.encoding import Inflater, compress, request_coding, response_coding


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_a_body_inflates_chunk_by_chunk(coding: str) -> None:
    body = bytes(range(256)) * 400
    packed = gzip.compress(body) if coding == "gzip" else zlib.compress(body)
    inflater = Inflater(request_coding(coding) or "gzip", limit=len(body))
    for chunk in _chunks(packed, 100):
        inflater.feed(chunk)
    assert inflater.finish() == body


def test_inflation_stops_at_the_limit_without_inflating_the_rest() -> None:
    inflater = Inflater("gzip", limit=1000)
    with pytest.raises(PayloadTooLargeError, match="decompresses \\(gzip\\) to more than 1000 bytes") as info:
        inflater.feed(gzip.compress(b"\0" * 10**8))  # 100 MB inflated, were it not stopped
    assert info.value.http_status == 413
    assert info.value.size <= 1001  # it inflated one byte past the limit, no more


def test_bad_truncated_and_trailing_data_are_protocol_errors() -> None:
    packed = gzip.compress(b"hello")
    with pytest.raises(ProtocolError, match="not valid gzip data"):
        Inflater("gzip", 100).feed(b"nope, not gzip")
    truncated = Inflater("gzip", 100)
    truncated.feed(packed[:-4])
    with pytest.raises(ProtocolError, match="ends early"):
        truncated.finish()
    with pytest.raises(ProtocolError, match="data follows the end"):
        Inflater("gzip", 100).feed(packed + b"extra")


def test_codings_named_in_headers() -> None:
    assert request_coding(None) is None and request_coding("identity") is None and request_coding(" GZIP ") == "gzip"
    with pytest.raises(UnsupportedEncodingError, match=r"^Content-Encoding: 'br' is not supported") as info:
        request_coding("br")
    assert info.value.http_status == 415
    assert response_coding("gzip") == "gzip" and response_coding("deflate") == "deflate"
    assert response_coding("br, deflate;q=0.5, gzip") == "gzip"
    assert response_coding("gzip;q=0, deflate") == "deflate"
    assert response_coding("br") is None and response_coding("") is None and response_coding("identity") is None
    assert gzip.decompress(compress(b"abc" * 100, "gzip")) == b"abc" * 100
    assert zlib.decompress(compress(b"abc" * 100, "deflate")) == b"abc" * 100
