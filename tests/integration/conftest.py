"""``kiln serve`` in a subprocess on 127.0.0.1, always stopped, and tiny models to serve."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """``python -m kiln.cli serve REPO ...`` (``--repo REPO`` with ``repo_flag``); :meth:`wait_ready` polls
    /v2/health/ready with a deadline."""

    def __init__(
        self, repo: Path, *args: str, log: Path, repo_flag: bool = False, env: dict[str, str] | None = None
    ) -> None:
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.log = log
        where = ["--repo", str(repo)] if repo_flag else [str(repo)]
        cmd = [sys.executable, "-m", "kiln.cli", "serve", *where, "--http-port", str(self.http_port),
               "--grpc-port", str(self.grpc_port), "--engine-threads", "1", *args]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout: float = 90.0) -> ServeProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)  # polling interval of a readiness check with a deadline, not synchronisation
        raise TimeoutError(f"kiln serve was not ready within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")[-5000:]

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://{self.http_url}/metrics", timeout=5) as r:
            text = r.read().decode()
        want = [f'{k}="{v}"' for k, v in labels.items()]
        total = 0.0
        for line in text.splitlines():
            if (line.startswith(name + "{") or line.startswith(name + " ")) and all(w in line for w in want):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return int(self.proc.returncode)


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[object]:
    """A factory: ``serve_process(repo, *args, repo_flag=False)`` starts a server that is stopped at teardown."""
    started: list[ServeProcess] = []

    def start(repo: Path, *args: str, repo_flag: bool = False) -> ServeProcess:
        p = ServeProcess(repo, *args, log=tmp_path / f"serve-{len(started)}.log", repo_flag=repo_flag)
        started.append(p)
        return p.wait_ready()

    try:
        yield start
    finally:
        for p in started:
            p.terminate()
