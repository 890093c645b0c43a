"""The server's lifecycle: bind HTTP (uvicorn) and gRPC (grpc.aio) on one event loop, load the models,
serve, and on SIGTERM stop accepting, drain what is in flight and exit 0.

``serve(settings)`` is what ``kiln serve`` runs; :class:`ServerThread` runs the same server in a
background thread (the demo, tests and the benchmark use it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import math
import os
import signal
import socket
import stat
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

import uvicorn

from kiln import logs
from kiln.errors import (
    BindError,
    KilnError,
    ModelLoadError,
    NotFoundError,
    PortInUseError,
    RepositoryUnreadableError,
    first_line,
)
from kiln.execution.gil import favour_engine_threads
from kiln.serving.app import build_app
from kiln.serving.grpc_service import build_grpc_server
from kiln.serving.http_connection import guarded_http
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
        check_repository(s.repo)
        held = self._models_held()
        if s.ray:  # before binding: a missing kiln[ray] or an unreachable cluster fails the start at once
            await asyncio.get_running_loop().run_in_executor(None, _start_ray, s.ray_address)
        if s.grpc_port and s.grpc_port == s.http_port:
            raise BindError(
                "gRPC", s.host, s.grpc_port, "--grpc-port", "is the HTTP port too",
                "pass different --http-port and --grpc-port (0 picks free ones)",
            )  # fmt: skip
        sock = _bind(s.host, s.http_port, "HTTP", "--http-port")
        try:
            sock.listen(2048)
            if s.grpc_port:  # fail on a busy gRPC port before uvicorn starts, and before grpc's C core logs it
                _bind(s.host, s.grpc_port, "gRPC", "--grpc-port").close()
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            build_app(self.service),
            loop="none",
            http=guarded_http(s.max_header_bytes, s.header_timeout_s, s.body_timeout_s),
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=math.ceil(s.drain_timeout_s),
            timeout_keep_alive=s.keep_alive_s,  # type: ignore[arg-type]  # uvicorn takes a float as call_later does
            server_header=False,
            proxy_headers=False,
            date_header=False,
        )
        self._uvicorn = _Uvicorn(config)
        self._uvicorn_task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        if s.grpc_port is not None:
            self._grpc = build_grpc_server(self.service, s.max_body_bytes)
            host = f"[{s.host}]" if ":" in s.host else s.host
            try:
                bound = self._grpc.add_insecure_port(f"{host}:{s.grpc_port}")
            except RuntimeError:  # grpc.aio raises when it binds no address; older versions return 0
                bound = 0
            if not bound:
                raise PortInUseError("gRPC", s.host, s.grpc_port, "--grpc-port")
            self.grpc_port = bound
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
        await self._load_models(held)
        # What start-up imported and loaded (torch, ONNX Runtime, the models: millions of objects) never
        # becomes garbage: keep it out of the collector's full passes, which otherwise stall the event loop
        # for tens of milliseconds under load (measured: rejection p99 60 ms -> 3 ms at 3x capacity).
        gc.collect()
        gc.freeze()
        self.service.started = True
        ready = [r["name"] + ":" + r["version"] for r in self.manager.index(ready_only=True)]
        if ready:
            log.info("ready: %s", ", ".join(ready))
        elif s.load_mode == "lazy" and held:
            log.info("ready: models load on their first request (--lazy): %s", ", ".join(held))
        else:
            log.info("ready: no models")

    def _models_held(self) -> list[str]:
        """The repository's models, checked against ``--model`` before anything is bound."""
        repo = self.settings.repo
        try:
            held = self.manager.repository.models()
        except OSError as exc:  # a model folder this user may not read
            raise _unreadable(repo, exc) from None
        for name in self.settings.models:
            if name not in held:
                raise NotFoundError(
                    "model",
                    name,
                    held,
                    where=f"repository {repo}",
                    fix="pass one it holds to --model, or leave --model out to preload them all",
                )
        return held

    async def _load_models(self, held: list[str]) -> None:
        """Preload one model at a time, so that a failure names the model (lazy mode loads none here)."""
        repo = self.settings.repo
        if not held:
            log.warning("repository %s holds no models; import one with `kiln import MODEL --repo %s`", repo, repo)
        if self.settings.load_mode == "lazy":
            await self.manager.start()  # restores the models loaded before a restart, starts prefetching
            return
        for name in self.settings.models or held:
            try:
                await self.manager.load(name)
            except Exception as exc:
                raise self._load_error(name, exc) from exc

    def _load_error(self, name: str, exc: Exception) -> ModelLoadError:
        others = "--model to preload only the others, " if len(self.manager.repository.models()) > 1 else ""
        reimport = f"`kiln import SOURCE --repo {self.settings.repo} --name {name} --force`"
        fix = f"re-import it ({reimport}), {others}or start with --lazy"
        try:
            versions = self.manager.served_versions(name)
        except Exception:  # the spec itself may be what failed
            versions = []
        version = versions[0] if len(versions) == 1 else None
        if isinstance(exc, KilnError):
            reason = first_line(exc).rstrip(".")
        else:  # the manager logged its traceback
            reason = f"{type(exc).__name__}; see the server log for the traceback"
        return ModelLoadError(name, version, reason, fix)

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
        opened = self._uvicorn is not None or self._grpc is not None  # False when start() failed before binding
        if self.service.started:
            log.info("shutting down: draining in-flight requests")
        elif opened:
            log.info("start-up failed: closing what was opened")
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
        if opened:
            log.info("stopped")


def _start_ray(address: str | None) -> None:
    from kiln.ray import connect

    connect(address, "kiln serve --ray")
    from kiln.ray.serve import start_serve

    start_serve()


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
    favour_engine_threads()  # this process is the server's: its engine threads get the GIL back promptly
    if settings.ray:  # on the main thread: Ray installs its signal handlers there
        _start_ray(settings.ray_address)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_main(settings))
    finally:
        if settings.ray:
            from kiln.ray import disconnect

            disconnect()


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


def check_repository(root: Path) -> None:
    """Raise :class:`RepositoryUnreadableError` unless ``root`` is a directory this process may list."""
    try:
        mode = os.stat(root).st_mode
    except FileNotFoundError:
        raise RepositoryUnreadableError(
            str(root), "does not exist", f"import a model into it first with `kiln import MODEL --repo {root}`"
        ) from None
    except OSError as exc:
        raise _unreadable(root, exc) from None
    if not stat.S_ISDIR(mode):
        raise RepositoryUnreadableError(
            str(root), "is not a directory", "pass the directory that `kiln import MODEL --repo DIR` created"
        )
    if not os.access(root, os.R_OK | os.X_OK):
        raise RepositoryUnreadableError(
            str(root), "is not readable by this user (it needs read and execute permission)",
            f"run `chmod u+rx {root}` or serve as the user who owns it",
        )  # fmt: skip


def _unreadable(root: Path, exc: OSError) -> RepositoryUnreadableError:
    where = exc.filename or root
    return RepositoryUnreadableError(
        str(root), f"cannot be read ({exc.strerror or exc} at {where})",
        f"give this user read and execute permission on it (`chmod -R u+rX {root}`) or serve as its owner",
    )  # fmt: skip


def _bind(host: str, port: int, protocol: str, flag: str) -> socket.socket:
    """A TCP socket bound to ``host:port``; a busy port, a privileged one or a foreign host become a BindError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(protocol, host, port, flag) from None
        if exc.errno == errno.EACCES:
            raise BindError(
                protocol, host, port, flag, "needs privileges this process lacks (ports below 1024 do)",
                f"pass {flag} with a port of 1024 or above, or 0 to pick a free one",
            ) from None  # fmt: skip
        if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
            raise BindError(
                protocol, host, port, flag, f"cannot be bound: {host} is not an address of this machine",
                "pass --host 127.0.0.1 (this machine only) or --host 0.0.0.0 (every interface)",
            ) from None  # fmt: skip
        raise
    return sock


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
