"""`kiln bench --url`: the JSON envelope, --report, --compare between served runs, Ctrl-C, timeouts."""

from __future__ import annotations

import _thread
import asyncio
import json
from pathlib import Path

import pytest

from kiln.bench import loadgen
from kiln.errors import LoadTargetError
from tests.fixtures import v2_server
from tests.integration.test_bench import run_cli


def test_url_run_writes_the_envelope_and_compares(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b, page = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "served.html"
    with v2_server.running() as (url, counts), v2_server.running() as (other, _):
        code, out = run_cli(["bench", "m", "--url", url, "--concurrency", "1,4", "--requests", "40", "--json", str(a),
                             "--report", str(page)], capsys)  # fmt: skip
        assert code == 0, out
        assert counts.infer == 80
        # The same levels against another V2 server: comparable row by row.
        code, out = run_cli(["bench", "m", "--url", other, "--concurrency", "1,4", "--requests", "40",
                             "--json", str(b)], capsys)  # fmt: skip
        assert code == 0, out
    data = json.loads(a.read_text(encoding="utf-8"))
    assert data["kind"] == "load" and data["model"] == "m" and data["url"] == url and not data["interrupted"]
    assert data["machine"]["physical_cores"] >= 1 and data["machine"]["cpu_model"]
    assert data["config"]["concurrency"] == [1, 4] and data["created"]
    assert [(r["concurrency"], r["sent"], r["succeeded"]) for r in data["runs"]] == [(1, 40, 40), (4, 40, 40)]
    assert data["command"].startswith(f"kiln bench m --url {url} --concurrency 1,4 --requests 40")

    html_text = page.read_text(encoding="utf-8")
    assert html_text.count("<img ") == 2 and "data:image/png;base64," in html_text
    assert {p.name for p in (tmp_path / "served_plots").iterdir()} == {
        "throughput_vs_concurrency.png", "latency_vs_concurrency.png"}  # fmt: skip

    code, out = run_cli(["bench", "--compare", str(a), str(b), "--threshold", "100"], capsys)
    assert code == 0, out
    assert "req/s" in out and "p99 ms" in out and "c=4" in out and "different servers" in out
    slow = json.loads(a.read_text(encoding="utf-8"))
    for r in slow["runs"]:
        r["throughput"] /= 3
    b.write_text(json.dumps(slow))
    code, out = run_cli(["bench", "--compare", str(a), str(b), "--threshold", "0.5"], capsys)
    assert code == 1 and "regression" in out
    # Served and in-process runs are not compared.
    inproc = {"variants": [], "scenarios": [], "model": "m"}
    b.write_text(json.dumps(inproc))
    code, out = run_cli(["bench", "--compare", str(a), str(b)], capsys)
    assert code == 2 and "compare runs of one kind" in out


def test_ctrl_c_in_url_mode_keeps_the_levels_measured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def press_ctrl_c(n: int, release: asyncio.Event) -> None:
        if n == 50:  # the 10th request of the second level (40 requests at concurrency 1 first)
            _thread.interrupt_main()  # what Ctrl-C does: SIGINT in the main thread, inside asyncio.run

    out_json = tmp_path / "partial.json"
    with v2_server.running(press_ctrl_c) as (url, counts):
        code, out = run_cli(["bench", "m", "--url", url, "--concurrency", "1,2,4", "--requests", "40",
                             "--json", str(out_json)], capsys)  # fmt: skip
    assert code == 130, out
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert data["interrupted"] is True
    first, second = data["runs"]  # the third level never started
    assert (first["concurrency"], first["succeeded"], first["interrupted"]) == (1, 40, False)
    assert second["concurrency"] == 2 and second["interrupted"] is True
    assert 8 <= second["succeeded"] < 40  # 9 arrived before the 10th; at concurrency 2 one may be in flight
    assert second["latency"]["p50_ms"] > 0
    assert counts.infer < 80


def test_a_hung_server_cannot_hang_the_bench() -> None:
    async def hang(n: int, release: asyncio.Event) -> None:
        await release.wait()  # never answers until the server shuts down

    with v2_server.running(hang) as (url, _):
        result = loadgen.apply_load(url, "m", concurrency=2, requests=4, seconds=30, request_timeout_s=0.2)
    assert result.sent == 4 and result.succeeded == 0
    assert result.errors == {"timeout": 4}


def test_loopback_addresses() -> None:
    assert loadgen.parse_target("http://[::1]:8000").address == "[::1]:8000"
    assert loadgen.parse_target("grpc://localhost:8001").address == "localhost:8001"
    assert loadgen.parse_target("127.0.0.1:9000").address == "127.0.0.1:9000"
    with pytest.raises(LoadTargetError, match="not a loopback address"):
        loadgen.parse_target("http://[2001:db8::1]:8000")
    assert loadgen.parse_target("http://[2001:db8::1]:8000", allow_remote=True).address == "[2001:db8::1]:8000"
    with pytest.raises(LoadTargetError, match="port"):
        loadgen.parse_target("http://127.0.0.1:99999")
