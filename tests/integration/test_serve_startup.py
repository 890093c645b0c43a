"""``kiln serve`` start-up failures: one red line naming the value and the fix, exit 2, never a traceback."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import kiln
from kiln.errors import ModelLoadError, PortInUseError
from kiln.serving import ServerSettings
from kiln.serving import server as server_mod
from kiln.serving.server import Server
from tests.integration.conftest import ServeProcess, free_port
from tests.models import add_model

Start = Callable[..., ServeProcess]
TIMEOUT_S = 120  # a subprocess that outlives this is killed by subprocess.run


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository holding model 'm' (y = x + 1, x: float32 [N, 4])."""
    root = tmp_path / "repo"
    kiln.import_model(add_model(tmp_path / "a.onnx"), root, name="m")
    return root


@pytest.fixture
def listening() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket already listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    """``kiln serve`` that is expected to fail at start-up; killed after the timeout if it does not."""
    cmd = [sys.executable, "-m", "kiln.cli", "serve", "--log-format", "text", "--engine-threads", "1", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line of a failed run, after checking the exit code and that no traceback shows."""
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    return errors[0]


def test_http_port_in_use_is_one_line(repo: Path, listening: int) -> None:
    result = serve(str(repo), "--http-port", str(listening), "--grpc-port", str(free_port()))
    line = error_line(result)
    assert line == (
        f"error: HTTP port {listening} on 127.0.0.1 is already in use (another kiln serve?); stop that process or "
        "pass --http-port 0 to pick a free port"
    )
    assert result.stderr.strip() == line  # nothing was bound, so nothing else is logged


def test_grpc_port_in_use_is_one_line(repo: Path, listening: int) -> None:
    result = serve(str(repo), "--http-port", str(free_port()), "--grpc-port", str(listening))
    line = error_line(result)
    assert f"gRPC port {listening} on 127.0.0.1 is already in use" in line
    assert "--grpc-port 0" in line
    assert result.stderr.strip() == line  # checked before uvicorn starts, and before grpc's C core logs it


def test_grpc_bind_failure_after_the_check_is_the_same_error(
    repo: Path, listening: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port taken between the check and grpc's own bind: grpc.aio's failure becomes the same error."""
    real_bind = server_mod._bind

    def skip_grpc_check(host: str, port: int, protocol: str, flag: str) -> socket.socket:
        return socket.socket() if protocol == "gRPC" else real_bind(host, port, protocol, flag)

    monkeypatch.setattr(server_mod, "_bind", skip_grpc_check)
    settings = ServerSettings(repo=repo, http_port=0, grpc_port=listening, engine_threads=1, load_mode="lazy")

    async def start_and_stop() -> None:
        server = Server(settings)
        try:
            await server.start()
        finally:
            await server.stop()

    with pytest.raises(PortInUseError) as info:
        asyncio.run(start_and_stop())
    assert (info.value.protocol, info.value.port, info.value.flag) == ("gRPC", listening, "--grpc-port")


def test_repo_flag_starts_and_serves(repo: Path, serve_process: Start) -> None:
    server = serve_process(repo, "--log-format", "text", repo_flag=True)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/m/infer", body.encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        out = json.loads(r.read())["outputs"][0]
    assert out["data"] == [2.0, 3.0, 4.0, 5.0]
    assert "ready: m:1" in server.output()


@pytest.mark.parametrize("args", [["REPO", "--repo", "REPO"], []], ids=["both", "neither"])
def test_repo_given_twice_or_not_at_all_is_a_usage_error(repo: Path, args: list[str]) -> None:
    result = serve(*[str(repo) if a == "REPO" else a for a in args], "--http-port", "0", "--grpc-port", "0")
    line = error_line(result)
    assert "REPO / --repo" in line and "kiln serve --repo REPO" in line
    assert result.stderr.strip() == line


def test_repo_that_is_not_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a repository")
    result = serve(str(path), "--http-port", "0", "--grpc-port", "0")
    line = error_line(result)
    assert (
        line
        == f"error: repository {path} is not a directory; pass the directory that `kiln import MODEL --repo DIR` created"
    )
    assert result.stderr.strip() == line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory, whatever its mode")
def test_repo_without_read_permission(repo: Path) -> None:
    repo.chmod(0o300)  # write and execute, no read
    try:
        result = serve(str(repo), "--http-port", "0", "--grpc-port", "0")
    finally:
        repo.chmod(0o755)
    line = error_line(result)
    assert f"repository {repo} is not readable" in line and "chmod u+rx" in line


def test_corrupt_model_names_the_model_and_the_fix(repo: Path) -> None:
    (repo / "m" / "1" / "model.onnx").write_bytes(b"\x00garbage, not a protobuf\xff" * 8)
    result = serve(str(repo), "--http-port", "0", "--grpc-port", "0")
    line = error_line(result)
    assert line.startswith("error: model 'm' version 1 failed to load at start: ")
    assert "kiln import SOURCE --repo" in line and "--lazy" in line


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_load_failure_that_is_not_a_kiln_error_says_see_the_log(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception: the line names the model and points at the log, which has the traceback."""
    settings = ServerSettings(repo=repo, http_port=0, grpc_port=None, engine_threads=1)
    handler = _Records()
    logger = logging.getLogger("kiln.serving")
    logger.addHandler(handler)

    def broken_open(spec: object, versions: object) -> None:
        raise ValueError("a bug, not a user error")

    async def start_and_stop() -> None:
        server = Server(settings)
        monkeypatch.setattr(server.manager, "_open_versions", broken_open)  # inside load(), which logs it
        try:
            await server.start()
        finally:
            await server.stop()

    try:
        with pytest.raises(ModelLoadError) as info:
            asyncio.run(start_and_stop())
    finally:
        logger.removeHandler(handler)
    assert str(info.value).startswith("model 'm' version 1 failed to load at start: ValueError; see the server log")
    assert any(r.exc_info and r.exc_info[0] is ValueError for r in handler.records)


def test_empty_repository_starts_and_warns(tmp_path: Path, serve_process: Start) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    server = serve_process(empty, "--log-format", "text")
    out = server.output()
    assert (
        f"WARNING kiln.serving: repository {empty} holds no models; import one with `kiln import MODEL --repo {empty}`"
        in out
    )
    assert "ready: no models" in out
