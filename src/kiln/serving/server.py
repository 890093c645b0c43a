"""The server's lifecycle: bind HTTP (uvicorn) and gRPC (grpc.aio) on one event loop, load the models,
serve, and on SIGTERM stop accepting, drain what is in flight and exit 0.

``serve(settings)`` is what ``kiln serve`` runs; :class:`ServerThread` runs the same server in a
background thread (the demo, tests and the benchmark use it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import threading
from collections.abc import Generator
from typing import Any

import uvicorn

from kiln.serving import logs
from kiln.serving.app import build_app
from kiln.serving.grpc_service import build_grpc_server
from kiln.serving.manager import ModelManager
from kiln.serving.metrics import Metrics
from kiln.serving.service import Service
from kiln.serving.settings import ServerSettings

log = logging.getLogger("kiln.serving")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the kiln server owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _loop_factory() -> Any:
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not on every platform
        return asyncio.new_event_loop


class Server:
    """One kiln server: HTTP and gRPC front ends over one model manager."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.manager = ModelManager(settings, self.metrics)
        self.service = Service(settings, self.manager, self.metrics)
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._uvicorn: _Uvicorn | None = None
        self._uvicorn_task: asyncio.Task[None] | None = None
        self._grpc: Any = None
        self._stop: asyncio.Event | None = None

    async def start(self) -> None:
        """Listen (live at once), then load the models (ready once they are warm)."""
        s = self.settings
        self._stop = asyncio.Event()
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets
        sock.bind((s.host, s.http_port))
        sock.listen(2048)
        sock.setblocking(False)
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            build_app(self.service),
            loop="none",
            http="httptools",
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=math.ceil(s.drain_timeout_s),
            timeout_keep_alive=30,
            server_header=False,
            proxy_headers=False,
            date_header=False,
        )
        self._uvicorn = _Uvicorn(config)
        self._uvicorn_task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        if s.grpc_port is not None:
            self._grpc = build_grpc_server(self.service, s.max_body_bytes)
            host = f"[{s.host}]" if ":" in s.host else s.host
            self.grpc_port = self._grpc.add_insecure_port(f"{host}:{s.grpc_port}")
            await self._grpc.start()
        while not self._uvicorn.started:
            if self._uvicorn_task.done():
                self._uvicorn_task.result()
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.005)
        log.info(
            "kiln serving %s: HTTP on %s:%s, gRPC on %s", s.repo, s.host, self.http_port,
            f"{s.host}:{self.grpc_port}" if self.grpc_port else "off",
        )  # fmt: skip
        if s.token is None and not _loopback(s.host):
            log.warning(
                "listening on %s without --token: anyone who reaches this port may load and unload models; "
                "set --token (or KILN_SERVE_TOKEN) to protect the model-repository endpoints", s.host,
            )  # fmt: skip
        await self.manager.start()
        self.service.started = True
        log.info("ready: %s", ", ".join(r["name"] + ":" + r["version"] for r in self.manager.index(ready_only=True)))

    def request_stop(self) -> None:
        """First call: drain and stop. A second (another Ctrl-C): stop waiting for in-flight requests."""
        if self._stop is None:
            return
        if self._stop.is_set() and self._uvicorn is not None:
            log.warning("second stop signal: not waiting for in-flight requests")
            self._uvicorn.force_exit = True
        self._stop.set()

    async def wait(self) -> None:
        if self._stop is None:
            raise RuntimeError("start() the server first")
        await self._stop.wait()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the drain timeout), unload the models."""
        log.info("shutting down: draining in-flight requests")
        self.manager.draining = True
        grace = self.settings.drain_timeout_s
        waits: list[Any] = []
        if self._uvicorn is not None and self._uvicorn_task is not None:
            self._uvicorn.should_exit = True
            waits.append(self._uvicorn_task)
        if self._grpc is not None:
            waits.append(self._grpc.stop(grace))
        await asyncio.gather(*waits, return_exceptions=True)
        await self.manager.close()
        self.service.close()
        log.info("stopped")


async def _main(settings: ServerSettings) -> int:
    server = Server(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    try:
        await server.start()
    except BaseException:
        await server.stop()
        raise
    await server.wait()
    await server.stop()
    return 0


def serve(settings: ServerSettings) -> int:
    """Run until SIGTERM or SIGINT; return the exit code (0 after a clean drain)."""
    logs.configure(settings.log_format, settings.log_level)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_main(settings))


class ServerThread:
    """A server in a background thread: ``with ServerThread(settings) as srv: srv.http_port``."""

    def __init__(self, settings: ServerSettings) -> None:
        self.server = Server(settings)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="kiln-server", daemon=True)

    @property
    def http_port(self) -> int:
        if self.server.http_port is None:
            raise RuntimeError("the server is not started")
        return self.server.http_port

    @property
    def grpc_port(self) -> int:
        if self.server.grpc_port is None:
            raise RuntimeError("the server has no gRPC port")
        return self.server.grpc_port

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            self._loop = runner.get_loop()
            runner.run(self._main())

    async def _main(self) -> None:
        try:
            await self.server.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            await self.server.stop()
            return
        self._ready.set()
        await self.server.wait()
        await self.server.stop()

    def start(self, timeout: float = 120.0) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout} s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self, timeout: float = 60.0) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.server.request_stop)
        self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
