"""Load scenarios after MLPerf Inference's: single-stream, offline, server and multi-stream.

Server and multi-stream send requests on a schedule (Poisson arrivals, or N periodic camera streams)
through kiln's dynamic batcher, and measure each request's latency from its *scheduled* arrival, so
a backlog shows up as latency instead of being hidden (no coordinated omission).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from kiln.bench.results import BenchResult, ScenarioResult
from kiln.bench.stats import latency_stats

if TYPE_CHECKING:
    from kiln.bench.config import BenchConfig
    from kiln.execution.batcher import Batcher
    from kiln.repository import Repository
    from kiln.spec import ModelSpec


class Submitter(Protocol):
    """Anything that accepts one request and answers with a future (the dynamic batcher does)."""

    def submit(self, inputs: dict[str, np.ndarray]) -> Future[Any]: ...


SUSTAINED = 0.98  # a trial meets its target only if the system completed at least this share of the offered rate


@dataclass(frozen=True)
class RunStats:
    """One scheduled trial. ``achieved_qps`` is the completion rate (see :func:`completion_rate`), so a
    system that falls behind fails the trial even when the trial is too short for its backlog to push
    p99 past the SLO; ``backlog_at_end`` and ``drain_ms`` say how far behind it was when arrivals stopped."""

    offered_qps: float
    achieved_qps: float
    sent: int
    completed: int
    rejected: int
    failed: int
    latency: dict[str, float]
    backlog_at_end: int = 0  # requests submitted but not finished when the last one was sent
    drain_ms: float = 0.0  # from the last scheduled arrival to the last completion

    @property
    def sustained(self) -> bool:
        return self.achieved_qps >= SUSTAINED * self.offered_qps

    def meets(self, slo_ms: float, percentile: str = "p99_ms") -> bool:
        return (
            self.rejected == 0
            and self.failed == 0
            and self.completed == self.sent
            and self.sustained
            and self.latency[percentile] <= slo_ms
        )


def completion_rate(due: np.ndarray, done: np.ndarray, offered_qps: float) -> float:
    """The rate requests completed at, in the offered schedule's units.

    Least-squares slopes of arrival and of completion times against their rank: a system that keeps up
    completes at the arrival slope whatever its latency (which shifts both ends alike), while one that
    falls behind completes at its own capacity. The ratio of the slopes scales the offered rate.
    """
    n = len(done)
    if n < 3:
        span = float(np.max(done) - np.min(due)) if n else 0.0
        return n / span if span > 0 else 0.0
    rank = np.arange(n, dtype=np.float64)
    due_slope = float(np.polyfit(rank, np.sort(due), 1)[0])
    done_slope = float(np.polyfit(rank, np.sort(done), 1)[0])
    if done_slope <= 0 or due_slope <= 0:
        return offered_qps
    return offered_qps * due_slope / done_slope


def scheduled_run(
    submitter: Submitter, inputs: dict[str, np.ndarray], arrivals: np.ndarray, timeout_s: float = 30.0
) -> RunStats:
    """Submit one request at each arrival time (seconds from start); collect latencies."""
    lock = threading.Lock()
    pairs: list[tuple[float, float]] = []  # (due, done) of each completed request
    failures = [0]
    finished = threading.Event()
    outstanding = [len(arrivals)]
    rejected = 0
    clock = time.perf_counter

    def record(fut: Future[Any], due: float) -> None:
        now = clock()
        with lock:
            if fut.exception() is None:
                pairs.append((due, now))
            else:
                failures[0] += 1
            outstanding[0] -= 1
            if outstanding[0] == 0:
                finished.set()

    start = clock()
    last_due = start
    for t in arrivals:
        due = start + float(t)
        last_due = due
        delay = due - clock()
        if delay > 0:
            time.sleep(delay)  # pacing the offered load, not waiting for a result
        try:
            fut = submitter.submit(inputs)
        except Exception:  # a full queue answers at once: that request is rejected
            rejected += 1
            with lock:
                outstanding[0] -= 1
                if outstanding[0] == 0:
                    finished.set()
            continue
        fut.add_done_callback(functools.partial(_done, record, due))
    with lock:
        backlog = outstanding[0]
    if len(arrivals) == 0:
        finished.set()
    finished.wait(timeout_s)
    with lock:
        done_pairs = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
        failed = failures[0]
    duration = float(arrivals[-1]) if len(arrivals) else 0.0
    offered = len(arrivals) / duration if duration else 0.0
    return RunStats(
        offered_qps=offered, achieved_qps=completion_rate(done_pairs[:, 0], done_pairs[:, 1], offered),
        sent=len(arrivals), completed=len(done_pairs), rejected=rejected, failed=failed,
        latency=latency_stats(done_pairs[:, 1] - done_pairs[:, 0]).to_dict(), backlog_at_end=backlog,
        drain_ms=max(0.0, float(done_pairs[:, 1].max()) - last_due) * 1e3 if len(done_pairs) else 0.0,
    )  # fmt: skip


def _done(record: Callable[[Future[Any], float], None], due: float, fut: Future[Any]) -> None:
    record(fut, due)


def poisson_arrivals(qps: float, seconds: float, seed: int = 0) -> np.ndarray:
    """Poisson arrivals, rescaled so that the schedule offers exactly ``qps`` (n requests over n / qps
    seconds): a trial's offered rate is then the rate the search reports, not a random draw around it."""
    rng = np.random.default_rng(seed)
    n = max(1, int(qps * seconds))
    arrivals = np.cumsum(rng.exponential(1.0 / qps, n))
    return arrivals * (n / qps) / arrivals[-1]


def stream_arrivals(streams: int, fps: float, seconds: float, seed: int = 0) -> np.ndarray:
    """N cameras at ``fps`` each, with random phases, merged into one schedule."""
    rng = np.random.default_rng(seed)
    frames = max(1, int(fps * seconds))
    period = 1.0 / fps
    times = [rng.uniform(0, period) + np.arange(frames) * period for _ in range(streams)]
    return np.sort(np.concatenate(times))


def search_max(ok: Callable[[float], bool], start: float, integer: bool = False, steps: int = 5) -> float:
    """Largest value for which ``ok`` holds: double from ``start`` until it fails, then bisect."""
    lo, hi, value = 0.0, None, max(start, 1.0)
    for _ in range(12):
        if ok(value):
            lo = value
            value *= 2
        else:
            hi = value
            break
    if hi is None:
        return lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        if integer:
            mid = float(round(mid))
            if mid in (lo, hi):
                break
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ---- scenario entry points ---------------------------------------------------------------------------
def run(
    scenario: str, repo: Repository, model: str, version: int, variant: str, config: BenchConfig, result: BenchResult,
    *, deadline: float | None = None,
) -> ScenarioResult | None:  # fmt: skip
    """One scenario on one variant. Single-stream and offline read the figures the runner measured;
    server and multi-stream run trials through the batcher, and start none past ``deadline``
    (``time.monotonic()``; a search cut short says so in its metrics as ``stopped_by_budget``)."""
    measured = next((v for v in result.variants if v.variant == variant), None)
    if scenario == "single-stream":
        b1 = next((b for b in measured.batches if b.batch == 1), None) if measured else None
        if b1 is None:
            return None
        spread = {"p90_ms": b1.spread["p90_ms"]} if "p90_ms" in b1.spread else {}
        return ScenarioResult("single-stream", variant, {"batch": 1},
                              {"p90_ms": b1.latency.p90_ms, "p50_ms": b1.latency.p50_ms, "qps": 1e3 / b1.latency.p50_ms,
                               "spread": spread})  # fmt: skip
    if scenario == "offline":
        if not measured or not measured.batches:
            return None
        best = max(measured.batches, key=lambda b: b.items_per_s)
        spread = {"items_per_s": best.spread["items_per_s"]} if "items_per_s" in best.spread else {}
        return ScenarioResult("offline", variant, {"batch_sizes": [b.batch for b in measured.batches]},
                              {"items_per_s": best.items_per_s, "best_batch": best.batch, "spread": spread})  # fmt: skip
    estimate = (
        1e3 / measured.batches[0].latency.p50_ms * measured.batches[0].batch if measured and measured.batches else 100.0
    )
    with batcher_for(repo, model, version, variant, config) as submitter:
        inputs = _one_request(submitter)
        if scenario == "server":
            return _server(submitter, inputs, variant, config, estimate, deadline)
        return _multi_stream(submitter, inputs, variant, config, estimate, deadline)


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def _bracket(trials: list[dict[str, Any]], key: str, found: float) -> float | None:
    """How far above ``found`` the search's nearest failing trial was, relative: its resolution, the
    spread ``kiln bench --compare`` allows for (None when nothing above failed, or nothing was found)."""
    above = [t[key] for t in trials if not t["ok"] and t[key] > found and not t.get("skipped")]
    return (min(above) - found) / found if above and found > 0 else None


def _server(
    submitter: Any, inputs: dict[str, np.ndarray], variant: str, config: BenchConfig, estimate: float,
    deadline: float | None = None,
) -> ScenarioResult:  # fmt: skip
    """With ``find_max_qps``, the figures reported are those of the search's best passing trial (the
    load it reports as the maximum), so the summary cannot call a run at that load a miss; with
    ``server_qps`` as well, one more trial at that load follows."""
    params: dict[str, Any] = {"slo_ms": config.slo_ms, "seconds": config.scenario_seconds,
                              "max_batch_size": config.max_batch_size, "max_queue_delay_ms": config.max_queue_delay_ms}  # fmt: skip
    metrics: dict[str, Any] = {}
    best: tuple[float, RunStats] | None = None
    if config.find_max_qps:
        trials: list[dict[str, Any]] = []
        tried: list[tuple[float, RunStats]] = []

        def ok(qps: float) -> bool:
            nonlocal best
            if _past(deadline):
                metrics["stopped_by_budget"] = True
                trials.append({"qps": qps, "ok": False, "skipped": True})
                return False
            stats = scheduled_run(submitter, inputs, poisson_arrivals(qps, config.scenario_seconds, seed=len(trials)))
            met = stats.meets(config.slo_ms)
            trials.append({"qps": qps, "achieved_qps": stats.achieved_qps, "p99_ms": stats.latency["p99_ms"],
                           "backlog_at_end": stats.backlog_at_end, "ok": met})  # fmt: skip
            tried.append((qps, stats))
            if met and (best is None or qps > best[0]):
                best = (qps, stats)
            return met

        metrics["max_qps"] = search_max(ok, estimate / 2)
        metrics["trials"] = trials
        if (resolution := _bracket(trials, "qps", metrics["max_qps"])) is not None:
            metrics["spread"] = {"max_qps": resolution}
        if best is None and tried and not config.server_qps:
            best = min(tried, key=lambda t: t[0])  # nothing met the SLO: show the lightest load tried
    if config.server_qps or best is None:
        if _past(deadline) and best is None and config.find_max_qps:
            params["qps"] = None
            metrics["meets_slo"] = False
            return ScenarioResult("server", variant, params, metrics)
        qps = config.server_qps or estimate / 2
        best = (qps, scheduled_run(submitter, inputs, poisson_arrivals(qps, config.scenario_seconds, seed=99)))
    params["qps"] = best[0]
    metrics.update(dataclasses.asdict(best[1]))
    metrics["meets_slo"] = best[1].meets(config.slo_ms)
    return ScenarioResult("server", variant, params, metrics)


def _multi_stream(
    submitter: Any, inputs: dict[str, np.ndarray], variant: str, config: BenchConfig, estimate: float,
    deadline: float | None = None,
) -> ScenarioResult:  # fmt: skip
    deadline_ms = 1e3 / config.stream_fps
    trials: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}

    def ok(streams: float) -> bool:
        if _past(deadline):
            metrics["stopped_by_budget"] = True
            trials.append({"streams": int(streams), "ok": False, "skipped": True})
            return False
        stats = scheduled_run(
            submitter,
            inputs,
            stream_arrivals(int(streams), config.stream_fps, config.scenario_seconds, seed=len(trials)),
        )
        trials.append({"streams": int(streams), "achieved_qps": stats.achieved_qps, "p99_ms": stats.latency["p99_ms"],
                       "ok": stats.meets(deadline_ms)})  # fmt: skip
        return stats.meets(deadline_ms)

    streams = int(search_max(ok, max(1.0, estimate / config.stream_fps / 2), integer=True))
    metrics.update({"max_streams": streams, "trials": trials})
    if (resolution := _bracket(trials, "streams", streams)) is not None:
        metrics["spread"] = {"max_streams": resolution}
    return ScenarioResult(
        "multi-stream", variant, {"fps": config.stream_fps, "deadline_ms": deadline_ms, "seconds": config.scenario_seconds},
        metrics,
    )  # fmt: skip


def _one_request(submitter: Any) -> dict[str, np.ndarray]:
    from kiln.convert.parity import random_inputs

    return random_inputs(submitter.spec.inputs, 1, seed=0)


class BatcherSubmitter:
    """kiln serve's dynamic batcher over one variant, as a :class:`Submitter` (one future per request)."""

    def __init__(self, batcher: Batcher, spec: ModelSpec) -> None:
        self.batcher = batcher
        self.spec = spec
        self._batched = batcher.policy.max_batch_size > 0

    def submit(self, inputs: dict[str, np.ndarray]) -> Future[Any]:
        future: Future[Any] = Future()

        def done(outputs: Any, error: BaseException | None) -> None:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(outputs)

        rows = int(next(iter(inputs.values())).shape[0]) if self._batched else 1
        self.batcher.submit(inputs, rows, done)  # a full queue raises QueueFullError here: a rejection
        return future

    def close(self) -> None:
        self.batcher.close(drain=True)

    def __enter__(self) -> BatcherSubmitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def batcher_for(repo: Repository, model: str, version: int, variant: str, config: BenchConfig) -> BatcherSubmitter:
    """The dynamic batcher that `kiln serve` runs (kiln.execution.batcher), over one instance of ``variant``.

    The batch limit and queue delay come from the bench options; a model without a batch dimension runs
    one request at a time, as the server would.
    """
    from kiln.execution.batcher import Batcher, BatchPolicy
    from kiln.execution.instances import open_instance
    from kiln.hardware import physical_cores

    handle = repo.variant(model, version, variant)
    instance = open_instance(handle, config.threads or physical_cores(), process=False)
    spec = instance.spec
    batched = spec.serving.max_batch_size > 0
    policy = BatchPolicy(
        max_batch_size=config.max_batch_size if batched else 0,
        max_queue_delay_s=config.max_queue_delay_ms / 1e3,
        max_queue_size=spec.serving.max_queue_size,
    )
    batcher = Batcher(model, [instance], policy, name=f"bench-{model}:{version}")
    batcher.start()
    return BatcherSubmitter(batcher, spec)
