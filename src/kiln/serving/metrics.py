"""Prometheus metrics (prometheus-client), one registry per server so that tests can run several.

Label values are only names the server knows (models in the repository), never raw request text, so
a client cannot blow up the series count.
"""

from __future__ import annotations

import threading
import time
import typing
from collections.abc import Iterator, Sequence
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

Outcome = Literal["ok", "client_error", "not_found", "unavailable", "timeout", "cancelled", "error"]
CLIENT_CLOSED = 499  # the client cancelled or went away before the answer (nginx's code; no response is sent)

_LATENCY = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def outcome_for(status: int) -> Outcome:
    if status < 400:
        return "ok"
    if status == 404:
        return "not_found"
    if status == 503:
        return "unavailable"
    if status == 504:
        return "timeout"
    if status == CLIENT_CLOSED:
        return "cancelled"
    return "client_error" if status < 500 else "error"


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kiln_requests", "Inference requests by model, version, protocol and outcome",
            ["model", "version", "protocol", "outcome"], registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "kiln_request_seconds", "Time from request decoded to response ready", ["model", "version", "protocol"],
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.refusal_seconds = Histogram(
            "kiln_refusal_seconds", "Time to answer 503 (overload, not ready), from the handler's start",
            ["protocol"], buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 1.0), registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "kiln_queue_seconds", "Time a request waited in the batch queue", ["model", "version"],
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.compute_seconds = Histogram(
            "kiln_compute_seconds", "Engine time per batch", ["model", "version"], buckets=_LATENCY, registry=r
        )
        self.batch_size = Histogram(
            "kiln_batch_size", "Rows per executed batch", ["model", "version"], buckets=_BATCH, registry=r
        )
        self.cache = Counter("kiln_cache", "Response cache lookups", ["model", "result"], registry=r)
        self.load_seconds = Histogram(
            "kiln_model_load_seconds", "Time to load and warm a model version", ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r,
        )  # fmt: skip
        self.models_loaded = Gauge("kiln_models_loaded", "Model versions loaded and ready", registry=r)
        self.memory_bytes = Gauge("kiln_model_memory_bytes", "Estimated memory of loaded models", registry=r)
        self.in_flight = Gauge("kiln_inflight_requests", "Requests being served", ["protocol"], registry=r)
        self.inflight_bytes = Gauge(
            "kiln_inflight_request_bytes", "Bytes held by requests in flight (KILN_SERVE_MAX_INFLIGHT_BYTES bounds it)",
            registry=r,
        )  # fmt: skip
        self.fallbacks = Counter(
            "kiln_fallback", "Batches rerun on the reference variant after the chosen one failed",
            ["model", "version"], registry=r,
        )  # fmt: skip
        self.batchers = BatcherGauges()  # kiln_queue_depth and kiln_instances_busy of the versions being served
        r.register(self.batchers)
        self.evictions = Counter("kiln_evictions", "Models unloaded to fit the memory budget", registry=r)
        self.cold_loads = Counter(
            "kiln_cold_loads", "Loads on the request path: a request found its model not loaded (lazy mode)",
            ["model"], registry=r,
        )  # fmt: skip
        self.prefetches = Counter(
            "kiln_prefetches", "Loads ahead of demand: forecast (prefetch) or loaded before a restart (restore)",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self.prefetch_hits = Counter(
            "kiln_prefetch_hits", "Prefetched or restored models that served a request before they were unloaded",
            ["model"], registry=r,
        )  # fmt: skip
        self.prefetch_wasted = Counter(
            "kiln_prefetch_wasted", "Prefetched or restored models unloaded (evicted) before serving a request",
            ["model"], registry=r,
        )  # fmt: skip
        self.engine_failures = Counter(
            "kiln_engine_failures", "Batches the engine failed: error, oom (could not allocate), timeout, exit",
            ["model", "version", "kind"], registry=r,
        )  # fmt: skip
        self.unhealthy = Counter(
            "kiln_model_unhealthy", "Times a model was marked not ready for failing, and reloaded", ["model"],
            registry=r,
        )  # fmt: skip
        self._observers: dict[tuple[str, str], BatchMetrics] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observer(self, model: str, version: int) -> BatchMetrics:
        key = (model, str(version))
        obs = self._observers.get(key)
        if obs is None:
            obs = self._observers[key] = BatchMetrics(self, model, str(version))
        return obs

    def request_done(self, model: str, version: str, ok: bool, seconds: float) -> None:
        obs = self._observers.get((model, version))
        if obs is not None:
            obs.stats.request(ok, seconds)

    def cache_lookup(self, model: str, version: int, hit: bool) -> None:
        self.cache.labels(model, "hit" if hit else "miss").inc()
        obs = self._observers.get((model, str(version)))
        if obs is not None:
            obs.stats.add("cache_hit" if hit else "cache_miss", 0.0)

    def statistics(self, model: str | None = None, version: str | None = None) -> list[dict[str, object]]:
        """Triton's model statistics (the statistics extension) for the versions that have served."""
        return [
            obs.stats.as_dict(m, v)
            for (m, v), obs in sorted(self._observers.items())
            if (model is None or m == model) and (version is None or v == version)
        ]


class BatcherState(typing.Protocol):
    @property
    def depth(self) -> int: ...

    @property
    def busy(self) -> int: ...


class BatcherGauges(Collector):
    """Queue depth and busy instances per served version, read from the live batchers at each scrape.

    The manager tracks a version's batcher while it serves and untracks it when the version retires, so
    the series go with it and nothing here keeps a retired batcher alive.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[tuple[str, str], BatcherState] = {}

    def track(self, model: str, version: int, batcher: BatcherState) -> None:
        with self._lock:
            self._live[(model, str(version))] = batcher

    def untrack(self, model: str, version: int, batcher: BatcherState) -> None:
        """Forget ``batcher``; a newer batcher tracked under the same labels (a reload) stays."""
        with self._lock:
            key = (model, str(version))
            if self._live.get(key) is batcher:
                del self._live[key]

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("kiln_queue_depth", "Requests waiting in a batch queue", labels=["model", "version"])
        busy = GaugeMetricFamily("kiln_instances_busy", "Instances running a batch", labels=["model", "version"])
        with self._lock:
            live = sorted(self._live.items())
        for (model, version), b in live:
            depth.add_metric([model, version], b.depth)
            busy.add_metric([model, version], b.busy)
        yield depth
        yield busy


class TritonStats:
    """Counters in the shape of Triton's statistics extension (perf_analyzer reads them)."""

    _KINDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.totals = {k: [0, 0] for k in self._KINDS}  # kind -> [count, ns]
        self.batches: dict[int, list[int]] = {}  # batch size -> [count, input ns, infer ns, output ns]

    def add(self, kind: str, seconds: float) -> None:
        with self.lock:
            t = self.totals[kind]
            t[0] += 1
            t[1] += int(seconds * 1e9)

    def request(self, ok: bool, seconds: float) -> None:
        self.add("success" if ok else "fail", seconds)
        self.last_inference_ms = int(time.time() * 1000)

    def batch(self, rows: int, queue_s: Sequence[float], input_s: float, infer_s: float, output_s: float) -> None:
        """One executed batch of ``len(queue_s)`` requests. As in Triton, the inference statistics count
        requests (each request's compute is its batch's), ``batch_stats`` count batches per size."""
        n = len(queue_s)
        ns = (int(input_s * 1e9), int(infer_s * 1e9), int(output_s * 1e9))
        with self.lock:
            self.inference_count += rows
            self.execution_count += 1
            q = self.totals["queue"]
            q[0] += n
            q[1] += int(sum(queue_s) * 1e9)
            for kind, t in zip(("compute_input", "compute_infer", "compute_output"), ns, strict=True):
                total = self.totals[kind]
                total[0] += n
                total[1] += t * n
            b = self.batches.setdefault(rows, [0, 0, 0, 0])
            b[0] += 1
            for i, t in enumerate(ns, 1):
                b[i] += t

    def as_dict(self, model: str, version: str) -> dict[str, object]:
        with self.lock:
            return {
                "name": model,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {k: {"count": c, "ns": ns} for k, (c, ns) in self.totals.items()},
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": {"count": c, "ns": i},
                        "compute_infer": {"count": c, "ns": n},
                        "compute_output": {"count": c, "ns": o},
                    }
                    for size, (c, i, n, o) in sorted(self.batches.items())
                ],
            }


class BatchMetrics:
    """The batcher's per-batch figures, with label children resolved once (they sit on the hot path)."""

    def __init__(self, m: Metrics, model: str, version: str) -> None:
        self._queue = m.queue_seconds.labels(model, version)
        self._compute = m.compute_seconds.labels(model, version)
        self._batch = m.batch_size.labels(model, version)
        self._failures = m.engine_failures
        self._labels = (model, version)
        self.stats = TritonStats()

    def batch_failed(self, kind: str) -> None:
        self._failures.labels(*self._labels, kind).inc()

    def batch_done(
        self, size: int, rows: int, queue_s: Sequence[float], input_s: float, infer_s: float, output_s: float
    ) -> None:
        self.stats.batch(rows, queue_s, input_s, infer_s, output_s)
        for q in queue_s:
            self._queue.observe(q)
        self._compute.observe(infer_s)
        self._batch.observe(rows)
