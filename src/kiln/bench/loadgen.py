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
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np

from kiln.bench.stats import latency_stats
from kiln.errors import KilnError

Protocol = Literal["http", "grpc"]
_V2_TO_NUMPY = {
    "FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT8": np.int8, "INT16": np.int16,
    "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "BOOL": np.bool_, "BYTES": np.object_,
}  # fmt: skip


class LoadTargetError(KilnError):
    """A load-generator target that is not allowed or not reachable."""


@dataclass(frozen=True)
class Target:
    protocol: Protocol
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_target(url: str, allow_remote: bool = False) -> Target:
    """``http://127.0.0.1:8000`` or ``grpc://127.0.0.1:8001``; loopback only unless allowed."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "grpc"):
        raise LoadTargetError(f"--url {url!r}: the scheme must be http:// or grpc://")
    host = parsed.hostname or ""
    if not host:
        raise LoadTargetError(f"--url {url!r}: no host; expected e.g. http://127.0.0.1:8000")
    port = parsed.port or (8000 if parsed.scheme == "http" else 8001)
    try:
        addr = ipaddress.ip_address(socket.gethostbyname(host))
    except OSError:
        raise LoadTargetError(f"--url {url!r}: cannot resolve host {host!r}") from None
    if not addr.is_loopback and not allow_remote:
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
    errors: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    latency: dict[str, float] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.succeeded / self.duration_s if self.duration_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "throughput": self.throughput}


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

    async def prepare(self) -> None:
        if self.target.protocol == "http":
            meta = await self.client.get_model_metadata(self.model)
        else:
            meta = await self.client.get_model_metadata(self.model, as_json=True)
        rng = np.random.default_rng(0)
        for spec in meta["inputs"]:
            shape = [self.batch if i == 0 and int(d) == -1 else (8 if int(d) == -1 else int(d))
                     for i, d in enumerate(spec["shape"])]  # fmt: skip
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
        await self.client.infer(self.model, self.inputs, outputs=self.outputs)

    async def close(self) -> None:
        await self.client.close()


async def _closed_loop(
    client: _Client, result: LoadResult, concurrency: int, requests: int, seconds: float
) -> list[float]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    budget = [requests]
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            result.sent += 1
            t0 = time.perf_counter()
            try:
                await client.infer()
            except Exception as exc:
                errors[_error_kind(exc)] += 1
                continue
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.errors = dict(errors)
    return latencies


async def _open_loop(
    client: _Client, result: LoadResult, qps: float, requests: int, seconds: float, max_inflight: int
) -> list[float]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    n = min(requests, max(1, int(qps * seconds)))
    arrivals = np.cumsum(np.random.default_rng(0).exponential(1.0 / qps, n))
    inflight: set[asyncio.Task[None]] = set()
    start = time.perf_counter()

    async def one(due: float) -> None:
        try:
            await client.infer()
        except Exception as exc:
            errors[_error_kind(exc)] += 1
            return
        latencies.append(time.perf_counter() - due)  # from the scheduled time: no coordinated omission

    for t in arrivals:
        due = start + float(t)
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        result.sent += 1
        if len(inflight) >= max_inflight:
            errors["client-backlog"] += 1
            continue
        task = asyncio.create_task(one(due))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        await asyncio.gather(*inflight)
    result.errors = dict(errors)
    return latencies


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
) -> LoadResult:
    """Closed loop at ``concurrency`` or open loop at ``qps``, stopping at ``requests`` or ``seconds``."""
    target = parse_target(url, allow_remote)
    mode = "open" if qps else "closed"
    result = LoadResult(url, target.protocol, model, mode, None if qps else concurrency, qps, batch, binary)
    client = _Client(target, model, batch, binary)
    try:
        try:
            await client.prepare()
        except Exception as exc:
            raise LoadTargetError(
                f"cannot read model {model!r} from {url}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
        start = time.perf_counter()
        if qps:
            latencies = await _open_loop(client, result, qps, requests, seconds, max_inflight)
        else:
            latencies = await _closed_loop(client, result, max(1, concurrency or 1), requests, seconds)
        result.duration_s = time.perf_counter() - start
    finally:
        await client.close()
    result.succeeded = len(latencies)
    result.latency = latency_stats(latencies).to_dict()
    return result


def load(url: str, model: str, **kwargs: Any) -> LoadResult:
    """Blocking wrapper around :func:`run_load`."""
    return asyncio.run(run_load(url, model, **kwargs))
