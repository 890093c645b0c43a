"""Server start-up rules that need no running server."""

from __future__ import annotations


def test_only_loopback_hosts_go_without_the_token_warning() -> None:
    from kiln.serving.server import _loopback

    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost") and _loopback("127.8.0.1")
    assert not _loopback("0.0.0.0") and not _loopback("::") and not _loopback("10.0.0.5")
    assert not _loopback("myhost.example")
