"""An asyncio load generator for any Open Inference Protocol (KServe V2) server, over HTTP or gRPC.

It uses Triton's own clients (``tritonclient.http.aio`` / ``tritonclient.grpc.aio``), so what it
measures is what those clients see, with binary tensors by default. Load is bounded in request count
and time, and goes to loopback addresses only unless ``allow_remote`` is set.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np

from kiln.bench.stats import latency_stats
from kiln.errors import LoadTargetError, first_line
from kiln.spec import EXAMPLE_SHAPE_PARAMETER, Transport

_V2_TO_NUMPY = {
    "FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT8": np.int8, "INT16": np.int16,
    "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "BOOL": np.bool_, "BYTES": np.object_,
}  # fmt: skip


@dataclass(frozen=True)
class Target:
    protocol: Transport
    host: str
    port: int

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        return f"{host}:{self.port}"


def parse_target(url: str, allow_remote: bool = False) -> Target:
    """``http://127.0.0.1:8000``, ``http://[::1]:8000`` or ``grpc://localhost:8001``; loopback only unless allowed."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "grpc"):
        raise LoadTargetError(f"--url {url!r}: the scheme must be http:// or grpc://")
    host = parsed.hostname or ""
    if not host:
        raise LoadTargetError(f"--url {url!r}: no host; expected e.g. http://127.0.0.1:8000")
    try:
        port = parsed.port or (8000 if parsed.scheme == "http" else 8001)
    except ValueError:
        raise LoadTargetError(f"--url {url!r}: the port must be a number from 0 to 65535") from None
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            addresses = {ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(host, port)}
        except (OSError, ValueError):
            raise LoadTargetError(f"--url {url!r}: cannot resolve host {host!r}") from None
    if not allow_remote and not all(a.is_loopback for a in addresses):
        raise LoadTargetError(
            f"--url {url!r} is not a loopback address; kiln only loads servers on this machine unless --allow-remote"
        )
    return Target(parsed.scheme, host, port)  # type: ignore[arg-type]


@dataclass
class LoadResult:
    url: str
    protocol: str
    model: str
    mode: str  # "closed" (concurrency) or "open" (qps)
    concurrency: int | None
    target_qps: float | None
    batch: int
    binary: bool
    sent: int = 0
    succeeded: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # "timeout" counts requests past request_timeout_s
    duration_s: float = 0.0
    latency: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False  # Ctrl-C stopped this level: its figures cover the requests before it
    shapes: dict[str, list[int]] = field(default_factory=dict)  # the shape of each input sent
    guessed: list[str] = field(default_factory=list)  # inputs whose dynamic dims were sent at 8 (no example)

    @property
    def throughput(self) -> float:
        return self.succeeded / self.duration_s if self.duration_s else 0.0

    @property
    def level(self) -> str:
        return f"{self.target_qps:g} qps" if self.mode == "open" else f"c={self.concurrency}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "throughput": self.throughput}


class _Collector:
    """What one level has measured so far; it outlives a cancelled event loop, so Ctrl-C keeps it."""

    def __init__(self, result: LoadResult, on_request: Callable[[int], None] | None) -> None:
        self.result = result
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.start: float | None = None
        self._on_request = on_request

    def count(self) -> None:
        if self._on_request is not None:
            self._on_request(len(self.latencies) + sum(self.errors.values()))

    def finish(self) -> LoadResult:
        r = self.result
        r.duration_s = time.perf_counter() - self.start if self.start is not None else 0.0
        r.succeeded = len(self.latencies)
        r.errors = dict(self.errors)
        r.latency = latency_stats(self.latencies).to_dict()
        return r


class _Client:
    """One V2 client over either protocol, with the request prepared once."""

    def __init__(self, target: Target, model: str, batch: int, binary: bool) -> None:
        self.target, self.model, self.batch, self.binary = target, model, batch, binary
        if target.protocol == "http":
            import tritonclient.http.aio as client_mod
        else:
            import tritonclient.grpc.aio as client_mod
        self.mod = client_mod
        self.client = client_mod.InferenceServerClient(url=target.address)
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.shapes: dict[str, list[int]] = {}  # what each request sends
        self.guessed: list[str] = []  # inputs with dynamic dims the server gave no example shape for

    async def _example_shapes(self) -> dict[str, list[int]]:
        """The example shape of each input, from kiln's model-config parameters; none from other servers
        (or a config that cannot be read)."""
        try:
            if self.target.protocol == "http":
                config = await self.client.get_model_config(self.model)
            else:
                config = (await self.client.get_model_config(self.model, as_json=True)).get("config", {})
            params = config.get("parameters") or {}
        except Exception:  # a server without the configuration extension: no examples
            return {}
        out: dict[str, list[int]] = {}
        for key, value in params.items() if isinstance(params, dict) else ():
            text = value.get("string_value") if isinstance(value, dict) else None
            if isinstance(key, str) and key.startswith(EXAMPLE_SHAPE_PARAMETER) and isinstance(text, str):
                try:
                    out[key[len(EXAMPLE_SHAPE_PARAMETER) :]] = [int(d) for d in text.split(",")]
                except ValueError:
                    continue  # not a shape: ignored like any parameter kiln does not know
        return out

    async def prepare(self) -> None:
        if self.target.protocol == "http":
            meta = await self.client.get_model_metadata(self.model)
        else:
            meta = await self.client.get_model_metadata(self.model, as_json=True)
        examples = await self._example_shapes()
        rng = np.random.default_rng(0)
        for spec in meta["inputs"]:
            dims = [int(d) for d in spec["shape"]]
            example = _fitting(examples.get(spec["name"]), dims)
            if example is None and -1 in dims[1:]:
                self.guessed.append(spec["name"])
            shape = [self.batch if i == 0 and d == -1 else d if d != -1 else example[i] if example else _GUESS
                     for i, d in enumerate(dims)]  # fmt: skip
            self.shapes[spec["name"]] = shape
            dtype = _V2_TO_NUMPY[spec["datatype"]]
            if dtype is np.object_:
                data = np.array([b"kiln"] * int(np.prod(shape)), dtype=object).reshape(shape)
            elif np.issubdtype(dtype, np.floating):
                data = rng.standard_normal(shape).astype(dtype)
            else:
                data = rng.integers(0, 2, size=shape).astype(dtype)
            inp = self.mod.InferInput(spec["name"], shape, spec["datatype"])
            if self.target.protocol == "http":
                inp.set_data_from_numpy(data, binary_data=self.binary)
            else:
                inp.set_data_from_numpy(data)
            self.inputs.append(inp)
        for spec in meta["outputs"]:
            if self.target.protocol == "http":
                self.outputs.append(self.mod.InferRequestedOutput(spec["name"], binary_data=self.binary))
            else:
                self.outputs.append(self.mod.InferRequestedOutput(spec["name"]))

    async def infer(self) -> None:
        if self.target.protocol == "http":
            # aiohttp asks for gzip/deflate on every request unless told otherwise; Triton's own sync client
            # does not, and a bench should measure the server, not compression it did not ask for
            headers = {"Accept-Encoding": "identity"}  # a new dict each time: the client writes its own headers into it
            await self.client.infer(self.model, self.inputs, outputs=self.outputs, headers=headers)
        else:
            await self.client.infer(self.model, self.inputs, outputs=self.outputs)

    async def close(self) -> None:
        await self.client.close()


async def _timed(client: _Client, run: _Collector, timeout_s: float, due: float | None = None) -> None:
    """One request, bounded by ``timeout_s`` so a hung server cannot hang the bench."""
    t0 = time.perf_counter() if due is None else due  # open loop: from the scheduled time (no coordinated omission)
    try:
        await asyncio.wait_for(client.infer(), timeout_s)
    except TimeoutError:
        run.errors["timeout"] += 1
    except Exception as exc:
        run.errors[_error_kind(exc)] += 1
    else:
        run.latencies.append(time.perf_counter() - t0)
    run.count()


async def _closed_loop(
    client: _Client, run: _Collector, concurrency: int, requests: int, seconds: float, timeout_s: float
) -> None:
    budget = [requests]
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            run.result.sent += 1
            await _timed(client, run, timeout_s)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _open_loop(
    client: _Client, run: _Collector, qps: float, requests: int, seconds: float, max_inflight: int, timeout_s: float
) -> None:
    n = min(requests, max(1, int(qps * seconds)))
    arrivals = np.cumsum(np.random.default_rng(0).exponential(1.0 / qps, n))
    inflight: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    for t in arrivals:
        due = start + float(t)
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        run.result.sent += 1
        if len(inflight) >= max_inflight:
            run.errors["client-backlog"] += 1
            continue
        task = asyncio.create_task(_timed(client, run, timeout_s, due))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        await asyncio.gather(*inflight)


_GUESS = 8  # the size of a dynamic dim no example names
_MAX_ELEMENTS = 1 << 26  # an example shape from the server is trusted only up to this size per request


def _fitting(example: list[int] | None, dims: list[int]) -> list[int] | None:
    """``example`` when it fits ``dims`` (same rank, fixed dims equal, sizes positive and bounded)."""
    if example is None or len(example) != len(dims):
        return None
    if any(e < 1 or (d != -1 and e != d) for d, e in zip(dims, example, strict=True)):
        return None
    return example if int(np.prod(example, dtype=np.int64)) <= _MAX_ELEMENTS else None


def _error_kind(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    code = status() if callable(status) else status
    return f"{type(exc).__name__}:{code}" if code else type(exc).__name__


async def run_load(
    url: str,
    model: str,
    *,
    concurrency: int | None = 1,
    qps: float | None = None,
    requests: int = 1000,
    seconds: float = 10.0,
    batch: int = 1,
    binary: bool = True,
    allow_remote: bool = False,
    max_inflight: int = 1024,
    request_timeout_s: float = 30.0,
    on_request: Callable[[int], None] | None = None,
    _collector: list[_Collector] | None = None,
) -> LoadResult:
    """Closed loop at ``concurrency`` or open loop at ``qps``, stopping at ``requests`` or ``seconds``;
    ``on_request(n)`` is told how many requests have finished so far."""
    target = parse_target(url, allow_remote)
    mode = "open" if qps else "closed"
    result = LoadResult(
        url, target.protocol, model, mode, None if qps else max(1, concurrency or 1), qps, batch, binary
    )
    run = _Collector(result, on_request)
    if _collector is not None:
        _collector.append(run)
    client = _Client(target, model, batch, binary)
    try:
        try:
            await asyncio.wait_for(client.prepare(), request_timeout_s)
        except TimeoutError:
            raise LoadTargetError(
                f"cannot read model {model!r} from {url}: no answer within {request_timeout_s:g} s"
            ) from None
        except Exception as exc:
            raise LoadTargetError(f"cannot read model {model!r} from {url}: {first_line(exc)}") from None
        result.shapes, result.guessed = client.shapes, client.guessed
        run.start = time.perf_counter()
        if qps:
            await _open_loop(client, run, qps, requests, seconds, max_inflight, request_timeout_s)
        else:
            await _closed_loop(client, run, max(1, concurrency or 1), requests, seconds, request_timeout_s)
    finally:
        await client.close()
    return run.finish()


def apply_load(url: str, model: str, **kwargs: Any) -> LoadResult:
    """Blocking wrapper around :func:`run_load`. Ctrl-C ends the level early: the result then holds
    the requests measured before it and says ``interrupted``."""
    runs: list[_Collector] = []
    try:
        return asyncio.run(run_load(url, model, _collector=runs, **kwargs))
    except KeyboardInterrupt:
        if not runs or runs[0].start is None:
            raise
        result = runs[0].finish()
        result.interrupted = True
        return result


@dataclass
class LoadReport:
    """Every level of one ``kiln bench --url`` run, with the machine it ran from (the JSON it writes)."""

    model: str
    url: str
    created: str
    config: dict[str, Any]
    machine: dict[str, Any]
    runs: list[LoadResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
    kind: str = "load"
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "runs": [r.to_dict() for r in self.runs]}


def sweep(
    url: str,
    model: str,
    *,
    concurrency: list[int] | None = None,
    qps: float | None = None,
    requests: int = 1000,
    seconds: float = 10.0,
    batch: int = 1,
    binary: bool = True,
    allow_remote: bool = False,
    request_timeout_s: float = 30.0,
    progress: Callable[[str, int, int], None] | None = None,
) -> LoadReport:
    """Closed loop at each ``concurrency`` level, or one open loop at ``qps``; Ctrl-C keeps the levels
    measured so far (the one it stopped marked ``interrupted``)."""
    import shlex
    from datetime import UTC, datetime

    from kiln.bench.runner import machine_facts

    parse_target(url, allow_remote)  # refuse a bad or remote target before anything runs
    levels: list[int | None] = [None] if qps else list(dict.fromkeys(concurrency or [1]))
    if any(c is not None and c < 1 for c in levels):
        raise LoadTargetError(f"--concurrency {concurrency}: levels must be positive integers, e.g. 1,4,8")
    config = {"concurrency": None if qps else levels, "qps": qps, "requests": requests, "seconds": seconds,
              "batch": batch, "binary": binary, "request_timeout_s": request_timeout_s}  # fmt: skip
    args = ["kiln", "bench", model, "--url", url]
    args += ["--qps", f"{qps:g}"] if qps else ["--concurrency", ",".join(map(str, levels))]
    args += ["--requests", str(requests), "--duration", f"{seconds:g}", "--batch", str(batch)]
    args += [] if binary else ["--json-tensors"]
    args += ["--allow-remote"] if allow_remote else []
    args += ["--request-timeout", f"{request_timeout_s:g}"] if request_timeout_s != 30.0 else []
    report = LoadReport(model, url, datetime.now(UTC).isoformat(timespec="seconds"), config, machine_facts(),
                        command=" ".join(shlex.quote(a) for a in args))  # fmt: skip
    total = len(levels) * requests
    every = max(1, requests // 200)  # the bar moves in small steps without costing the event loop per request
    for i, level in enumerate(levels):
        what = f"{url} · {f'{qps:g} qps' if qps else f'concurrency {level}'}"

        def tick(n: int, base: int = i * requests, what: str = what) -> None:
            if progress is not None and (n % every == 0 or n >= requests):
                progress(what, base + min(n, requests), total)

        try:
            tick(0)
            row = apply_load(url, model, concurrency=level, qps=qps, requests=requests, seconds=seconds, batch=batch,
                       binary=binary, allow_remote=allow_remote, request_timeout_s=request_timeout_s, on_request=tick)  # fmt: skip
        except KeyboardInterrupt:  # between levels, or before this one sent anything
            row = None
        if row is not None:
            report.runs.append(row)
            if i == 0 and row.guessed:
                report.warnings.append(f"input(s) {', '.join(row.guessed)}: the server gives no example shape, so "
                                       f"their dynamic dims were sent at {_GUESS}")  # fmt: skip
            if row.errors:
                report.warnings.append(f"{row.level}: {sum(row.errors.values())} request(s) failed: {row.errors}")
        if row is None or row.interrupted:
            report.interrupted = True
            report.warnings.append("interrupted: the results hold what was measured before Ctrl-C")
            break
    return report
