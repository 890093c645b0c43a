"""How ``kiln serve`` behaves past its capacity: does it keep serving at full rate with bounded latency, and
refuse the surplus quickly, instead of letting every request wait?

One run, one server, per protocol (HTTP with binary tensors, gRPC with raw contents):

1. closed loop: a few clients send back to back; their completed infer/s is the capacity, with its p99;
2. open loop at multiples of that capacity (default 0.5, 1.5, 3, 10): requests are fired at Poisson
   arrival times whatever happened to the earlier ones, for a bounded time, and every outcome is counted
   (200, 503 / UNAVAILABLE as rejections, 504 / DEADLINE_EXCEEDED, other statuses, connection errors and
   client timeouts); admitted and rejected requests get their own latencies.

The model is a small CNN on ONNX Runtime with 1 engine thread, sized so that one image takes about
``--model-ms`` (5 ms: a few hundred infer/s), which lets the Python client offer 10x capacity on two
cores. The server is a separate ``kiln serve`` process on 127.0.0.1; the client is this process, one
event loop (uvloop when installed). It shares the cores with the server, so it is built to cost little
per request: HTTP/1.1 and gRPC (HTTP/2) clients of its own on asyncio protocols, each request serialized
once, answers judged by their status alone (``--grpc-client grpcio`` drives grpcio instead, for
comparison); aiohttp-free, grpcio only for metadata and the correctness check. Its CPU time per request
is printed for each level and for a probe at ``--probe-rps``. The client's *achieved* offered rate and
its scheduling lag are printed next to the target: where they fall short, the client, not the server,
was the limit.
At the end: the server's memory, whether it is still ready and still answers correctly (against an
in-process ``kiln.load(...).predict``), and PASS/FAIL check lines. The exit code is 0 unless ``--strict``
is given and a check fails.

    .venv/bin/python benchmarks/overload.py [--seconds 8] [--levels 0.5 1.5 3 10] [--protocols http grpc]
                                            [--model-ms 5] [--budget-ms 0] [--grpc-client raw|grpcio]
                                            [--probe-rps 1000] [--json overload.json] [--strict]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CNN_FACTORY = f"{Path(__file__).resolve().with_name('serve_overhead.py')}:build_cnn"  # fully convolutional
MAX_REQUESTS_PER_LEVEL = 200_000  # a bound on the open loop whatever --seconds and the capacity say


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    """Percentile in ms of durations in seconds; NaN for none."""
    return float(np.percentile(np.array(values) * 1e3, q)) if values else math.nan


# -- the model ---------------------------------------------------------------------------------------------


def engine_ms(repo: Path, side: int) -> float:
    import kiln

    x = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
    with kiln.load(repo, MODEL, threads=1) as p:
        feed = {p.spec.inputs[0].name: x}
        for _ in range(20):
            p.engine.run(feed)
        times = []
        for _ in range(100):
            t = time.perf_counter()
            p.engine.run(feed)
            times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def import_cnn(work: Path, target_ms: float) -> tuple[Path, int, float]:
    """Import the CNN at an image size whose batch-1 engine time is near ``target_ms`` (two tries at most)."""
    import kiln

    side, repo, ms = 64, work / "repo-64", 0.0
    for attempt in range(2):
        repo = work / f"repo-{side}"
        kiln.import_model(CNN_FACTORY, repo, name=MODEL, input_shapes=[(1, 3, side, side)], input_names=["input"],
                          output_names=["logits"])  # fmt: skip
        ms = engine_ms(repo, side)
        guess = int(min(192, max(32, round(side * math.sqrt(target_ms / ms) / 8) * 8)))
        if attempt == 1 or abs(ms / target_ms - 1) < 0.25 or guess == side:
            break
        side = guess
    return repo, side, ms


from loadgen_grpc import GrpcClient  # noqa: E402  (benchmarks/ is the script's path)
from loadgen_http import JSON_SAMPLE, MODEL, GrpcioClient, HttpClient, Reply  # noqa: E402

Client = HttpClient | GrpcClient | GrpcioClient


# -- load ---------------------------------------------------------------------------------------------------


@dataclass
class Level:
    level: float  # multiple of capacity; 0 for the closed loop
    target_rps: float
    offered_rps: float
    window_s: float
    admitted_rps: float
    counts: dict[str, int]
    ok_p50_ms: float
    ok_p99_ms: float
    rej_p50_ms: float
    rej_p99_ms: float
    lag_p99_ms: float  # how late the client started requests against their schedule
    drain_s: float  # from the last request fired to the last answer: the queue left behind
    server_rows_rps: float = math.nan  # rows the server's engine ran per second during the window (/metrics)
    engine_busy: float = math.nan  # share of the window the engine was computing (/metrics)
    retry_after: dict[str, int] = field(default_factory=dict)
    json_error: int = 0
    details: dict[str, int] = field(default_factory=dict)
    client_cpu_us: float = math.nan  # this process's CPU time (all threads) per request sent, in µs


def summarize(level: float, target: float, t0: float, samples: list[tuple[float, float, float, Reply]]) -> Level:
    """``samples``: (scheduled, started, done, reply), times on one perf_counter clock."""
    starts = [s for _, s, _, _ in samples]
    window = max(starts) - t0 if starts else 0.0
    ok = [(s, d) for _, s, d, r in samples if r.outcome == "ok"]
    rej = [d - s for _, s, d, r in samples if r.outcome == "rejected"]
    done_in_window = sum(1 for _, d in ok if d <= t0 + window)
    rejected = [r for *_, r in samples if r.outcome == "rejected"]
    return Level(
        level=level, target_rps=target, offered_rps=len(samples) / window if window > 0 else math.nan,
        window_s=window, admitted_rps=done_in_window / window if window > 0 else math.nan,
        counts=dict(Counter(r.outcome for *_, r in samples)),
        ok_p50_ms=pct([d - s for s, d in ok], 50), ok_p99_ms=pct([d - s for s, d in ok], 99),
        rej_p50_ms=pct(rej, 50), rej_p99_ms=pct(rej, 99),
        lag_p99_ms=pct([s - sc for sc, s, _, _ in samples], 99),
        drain_s=max((d for _, _, d, _ in samples), default=t0 + window) - (t0 + window),
        retry_after=dict(Counter(str(r.retry_after) for r in rejected if r.retry_after is not None)),
        json_error=sum(r.json_error for r in rejected),
        details=dict(Counter(f"{r.outcome}: {r.detail}" for *_, r in samples if r.outcome != "ok" and r.detail)),
    )  # fmt: skip


async def closed_loop(client: Client, concurrency: int, seconds: float, port: int) -> Level:
    for _ in range(10 * concurrency):  # warm connections and the server's path
        await client.infer()
    samples: list[tuple[float, float, float, Reply]] = []
    loop = asyncio.get_running_loop()
    window = await loop.run_in_executor(None, EngineWindow, port, seconds)
    t0 = time.perf_counter()
    end = t0 + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            asked = time.perf_counter()
            started, done, reply = await client.infer()
            samples.append((asked, started, done, reply))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    out = summarize(0.0, math.nan, t0, samples)
    n_ok = out.counts.get("ok", 0)
    out.window_s, out.admitted_rps, out.offered_rps = elapsed, n_ok / elapsed, len(samples) / elapsed
    await loop.run_in_executor(None, window.apply, out)
    return out


def engine_counters(port: int) -> tuple[float, float, float] | None:
    """(time, rows run, engine seconds) from the server's /metrics, for the model; None where it has none."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("kiln_batch_size_sum", "kiln_compute_seconds_sum"):
            if line.startswith(name + "{") and f'model="{MODEL}"' in line:
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    if len(found) < 2:
        return None
    return time.perf_counter(), found["kiln_batch_size_sum"], found["kiln_compute_seconds_sum"]


class EngineWindow:
    """The server's engine counters at the start of a window and, from a timer thread (so that a busy event
    loop in this process does not delay it), at its planned end."""

    def __init__(self, port: int, seconds: float) -> None:
        self.port, self.seconds = port, seconds
        self.end: tuple[float, float, float] | None = None
        self.start = engine_counters(port)
        self.timer = threading.Timer(seconds, self._take)
        self.timer.start()

    def _take(self) -> None:
        self.end = engine_counters(self.port)

    def apply(self, level: Level) -> None:
        self.timer.join(self.seconds + 10)
        if self.start and self.end and self.end[0] > self.start[0]:
            wall = self.end[0] - self.start[0]
            level.server_rows_rps = (self.end[1] - self.start[1]) / wall
            level.engine_busy = (self.end[2] - self.start[2]) / wall


def schedule(rate: float, seconds: float, arrivals: str, rng: np.random.Generator) -> np.ndarray:
    n = min(MAX_REQUESTS_PER_LEVEL, max(1, int(rate * seconds)))
    if arrivals == "fixed":
        return np.arange(n) / rate
    return np.cumsum(rng.exponential(1 / rate, n))


async def open_loop(
    client: Client, level: float, rate: float, seconds: float, arrivals: str, args: argparse.Namespace, seed: int
) -> Level:
    """Fire each request at its scheduled time, whether or not the earlier ones have finished.

    One timer callback fires everything due within the next millisecond (or late), then sleeps until the
    next one is due: no task or coroutine per request."""
    times: list[float] = schedule(rate, seconds, arrivals, np.random.default_rng(seed)).tolist()
    n = len(times)
    samples: list[tuple[float, float, float, Reply]] = []
    append = samples.append
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def done(scheduled: float, started: float, answered: float, reply: Reply) -> None:
        append((scheduled, started, answered, reply))
        if len(samples) == n and not finished.done():
            finished.set_result(None)

    send = client.send
    i = 0

    def tick() -> None:
        nonlocal i
        now = time.perf_counter() - t0 + 1e-3  # everything due within 1 ms (or late) goes now
        while i < n and times[i] <= now:
            send(done, t0 + times[i])
            i += 1
        if i < n:
            loop.call_later(times[i] - (time.perf_counter() - t0), tick)

    window = await loop.run_in_executor(None, EngineWindow, args.http_port, times[-1])
    client.begin()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    tick()
    # every request has a client timeout; this bound is only a safety net
    await asyncio.wait({finished}, timeout=times[-1] + args.client_timeout + 5)
    cpu = time.process_time() - cpu0
    out = summarize(level, rate, t0, list(samples))
    out.client_cpu_us = cpu / len(samples) * 1e6 if samples else math.nan
    await loop.run_in_executor(None, window.apply, out)
    return out


# -- the server ---------------------------------------------------------------------------------------------


def server_refusals(port: int) -> dict[str, tuple[int, float]]:
    """Per protocol, how many 503s the server answered and the histogram bucket its p99 falls in."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    buckets: dict[str, list[tuple[float, float]]] = {}
    for line in text.splitlines():
        if line.startswith("kiln_refusal_seconds_bucket{"):
            labels, value = line.rsplit(" ", 1)
            protocol = labels.split('protocol="')[1].split('"')[0]
            le = labels.split('le="')[1].split('"')[0]
            buckets.setdefault(protocol, []).append((math.inf if le == "+Inf" else float(le), float(value)))
    out: dict[str, tuple[int, float]] = {}
    for protocol, rows in buckets.items():
        rows.sort()
        total = rows[-1][1]
        if total:
            out[protocol] = (int(total), next(le for le, n in rows if n >= 0.99 * total))
    return out


def http_get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return -1


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of the server and its children, from /proc/<pid>/status."""
    import psutil

    out = {"VmRSS": 0, "VmHWM": 0}
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in out:
                out[key] += int(line.split()[1])
    out["processes"] = len(procs)
    return out


def start_server(repo: Path, work: Path, http_port: int, grpc_port: int, timeout_s: float) -> subprocess.Popen[bytes]:
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - the child holds it; closed when this process exits
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "serve", str(repo), "--host", "127.0.0.1", "--http-port", str(http_port),
         "--grpc-port", str(grpc_port), "--engine-threads", "1", "--log-format", "text", "--timeout", str(timeout_s)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while http_get(http_port, "/v2/health/ready") != 200:
        if time.monotonic() > deadline or proc.poll() is not None:
            stop_server(proc)
            raise RuntimeError("kiln serve did not become ready:\n" + (work / "serve.log").read_text()[-4000:])
        time.sleep(0.1)
    return proc


def stop_server(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(45)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None  # did not stop on SIGTERM


# -- report -------------------------------------------------------------------------------------------------


def fmt(v: float, spec: str = ".1f") -> str:
    """``format(v, spec)``, or a dash as wide as ``spec`` asks where there is no figure."""
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if math.isnan(v) else format(v, spec)


def print_table(
    protocol: str, cap: Level, levels: list[Level], base_p99: float, concurrency: int, probe: Level | None
) -> None:
    print(f"\n{protocol}: capacity {cap.admitted_rps:.1f} infer/s (closed loop, {concurrency} clients, "
          f"{cap.window_s:.1f} s), p50 {fmt(cap.ok_p50_ms, '.2f')} ms, p99 {fmt(cap.ok_p99_ms, '.2f')} ms, "
          f"errors {sum(v for k, v in cap.counts.items() if k != 'ok')}; server engine ran "
          f"{fmt(cap.server_rows_rps)} rows/s, busy {fmt(cap.engine_busy, '.2f')} of the time")  # fmt: skip
    print(f"{'load':>5} {'target/s':>9} {'offered/s':>9} {'lag p99':>8} {'admit/s':>8} {'adm/cap':>7} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'p99/0.5x':>8} {'rejected':>8} {'rej p50':>8} {'rej p99':>8} {'504/DL':>6} {'other':>5} "
          f"{'conn/to':>7} {'srv rows/s':>10} {'busy':>5}")  # fmt: skip
    for lv in levels:
        c = lv.counts
        print(f"{lv.level:>4g}x {lv.target_rps:9.1f} {lv.offered_rps:9.1f} {fmt(lv.lag_p99_ms, '8.2f')} "
              f"{lv.admitted_rps:8.1f} {lv.admitted_rps / cap.admitted_rps:7.2f} {fmt(lv.ok_p50_ms, '8.2f')} "
              f"{fmt(lv.ok_p99_ms, '8.2f')} {fmt(lv.ok_p99_ms / base_p99, '8.2f')} {c.get('rejected', 0):8d} "
              f"{fmt(lv.rej_p50_ms, '8.2f')} {fmt(lv.rej_p99_ms, '8.2f')} {c.get('timeout', 0):6d} "
              f"{c.get('other', 0):5d} {c.get('conn', 0):7d} {fmt(lv.server_rows_rps, '10.1f')} "
              f"{fmt(lv.engine_busy, '5.2f')}")  # fmt: skip
    for lv in levels:
        n_rej = lv.counts.get("rejected", 0)
        notes = []
        if n_rej and protocol == "http":
            ra = ", ".join(f"{k!r}×{v}" for k, v in lv.retry_after.items()) or "none"
            notes.append(f"503s with Retry-After {sum(lv.retry_after.values())}/{n_rej} ({ra}), "
                         f"JSON error body {lv.json_error}/{n_rej} (the first {JSON_SAMPLE} parsed, "
                         "the rest matched on their prefix)")  # fmt: skip
        if lv.drain_s > 0.5:
            notes.append(f"last answer {lv.drain_s:.1f} s after the last request was fired "
                         f"({lv.counts.get('ok', 0)} admitted in all)")  # fmt: skip
        odd = {k: v for k, v in lv.details.items() if not k.startswith("rejected")}
        if odd:
            notes.append("other outcomes: " + ", ".join(f"{k} ×{v}" for k, v in sorted(odd.items())))
        if n_rej and protocol == "grpc":
            top = sorted(((v, k) for k, v in lv.details.items() if k.startswith("rejected")), reverse=True)[:2]
            notes.append("UNAVAILABLE details: " + "; ".join(f"{k[10:]!r} ×{v}" for v, k in top))
        if notes:
            print(f"  {lv.level:g}x: " + "; ".join(notes))
    per_level = ", ".join(f"{lv.level:g}x {fmt(lv.client_cpu_us)}" for lv in levels)
    if probe is not None:
        n = sum(probe.counts.values())
        print(f"  client CPU per request (µs): {fmt(probe.client_cpu_us)} at {probe.target_rps:g}/s for "
              f"{probe.window_s:.1f} s ({n} requests, offered {probe.offered_rps:.0f}/s, lag p99 "
              f"{fmt(probe.lag_p99_ms, '.2f')} ms, {probe.counts.get('ok', 0)} admitted, "
              f"{probe.counts.get('rejected', 0)} rejected); per level: {per_level}")  # fmt: skip
    else:
        print(f"  client CPU per request (µs), per level: {per_level}")


def checks_for(protocol: str, cap: Level, levels: list[Level], base_p99: float, rej_ms: float) -> list[str]:
    lines = []
    for lv in levels:
        if lv.level < 3:
            continue
        tag = f"{protocol} {lv.level:g}x"
        share = lv.admitted_rps / cap.admitted_rps
        lines.append(f"{tag}: admitted {lv.admitted_rps:.1f}/s = {share:.2f} × capacity (needs ≥ 0.9): "
                     f"{'PASS' if share >= 0.9 else 'FAIL'}")  # fmt: skip
        ratio = lv.ok_p99_ms / base_p99
        lines.append(f"{tag}: admitted p99 {fmt(lv.ok_p99_ms, '.2f')} ms = {fmt(ratio, '.2f')} × p99 at the lowest "
                     f"level (needs ≤ 2): {'PASS' if ratio <= 2 else 'FAIL'}")  # fmt: skip
        if lv.counts.get("rejected", 0):
            lines.append(f"{tag}: rejection p99 {lv.rej_p99_ms:.2f} ms (needs ≤ {rej_ms:g}): "
                         f"{'PASS' if lv.rej_p99_ms <= rej_ms else 'FAIL'}")  # fmt: skip
        else:
            lines.append(f"{tag}: no request was rejected (nothing to time; the two lines above judge it): PASS")
    return lines


async def after_checks(clients: dict[str, Client], expected: np.ndarray) -> dict[str, str]:
    out = {}
    for protocol, client in clients.items():
        try:
            got = await client.result()
            err = float(np.max(np.abs(got - expected)))
            out[protocol] = f"max |served - in-process| {err:.2e}" + ("" if err <= 1e-4 else " (too large)")
        except Exception as exc:
            out[protocol] = f"failed: {type(exc).__name__}: {exc}"
    return out


# -- main ---------------------------------------------------------------------------------------------------


async def drive(args: argparse.Namespace, ports: dict[str, int], x: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    grpc_maker: type[GrpcClient] | type[GrpcioClient] = GrpcClient if args.grpc_client == "raw" else GrpcioClient
    makers: dict[str, type[Client]] = {"http": HttpClient, "grpc": grpc_maker}
    clients: dict[str, Client] = {}
    results: dict[str, Any] = {}
    try:
        for protocol in args.protocols:
            client = makers[protocol](ports[protocol], x, args.client_timeout, args.budget_ms)
            clients[protocol] = client
            await client.open()
            cap = await closed_loop(client, args.concurrency, args.capacity_seconds, args.http_port)
            if not cap.admitted_rps > 0:
                raise RuntimeError(f"{protocol}: no request succeeded in the closed loop: {cap.details}")
            levels = []
            for i, level in enumerate(args.levels):
                await asyncio.sleep(0.5)  # let the previous level's stragglers clear
                rate = level * cap.admitted_rps
                levels.append(await open_loop(client, level, rate, args.seconds, args.arrivals, args, 1000 * i + 7))
            probe = None
            if args.probe_rps > 0 and args.probe_seconds > 0:  # the client's own cost, at a fixed rate
                await asyncio.sleep(0.5)
                probe = await open_loop(client, math.nan, args.probe_rps, args.probe_seconds, "fixed", args, 99)
            lowest = min(levels, key=lambda lv: lv.level) if levels else None
            base_p99 = lowest.ok_p99_ms if lowest is not None and lowest.level < 1 else cap.ok_p99_ms
            print_table(protocol, cap, levels, base_p99, args.concurrency, probe)
            results[protocol] = {"capacity": cap, "levels": levels, "base_p99_ms": base_p99, "cpu_probe": probe}
        results["after"] = await after_checks(clients, expected)
    finally:
        for client in clients.values():
            await client.close()
    return results


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro), "asyncio"
    return uvloop.run(coro), "uvloop"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each open-loop level")
    ap.add_argument("--capacity-seconds", type=float, default=4.0, help="length of the closed-loop capacity run")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.5, 1.5, 3.0, 10.0], help="multiples of capacity")
    ap.add_argument("--protocols", nargs="+", choices=["http", "grpc"], default=["http", "grpc"])
    ap.add_argument("--concurrency", type=int, default=4, help="clients in the closed loop")
    ap.add_argument("--model-ms", type=float, default=5.0, help="batch-1 engine time to size the CNN for")
    ap.add_argument("--arrivals", choices=["poisson", "fixed"], default="poisson")
    ap.add_argument("--client-timeout", type=float, default=30.0, help="seconds before the client gives up")
    ap.add_argument("--server-timeout", type=float, default=30.0, help="kiln serve --timeout")
    ap.add_argument("--budget-ms", type=float, default=0.0, help="per-request timeout sent to the server; 0: none")
    ap.add_argument("--rejection-ms", type=float, default=5.0, help="the rejection p99 check's bound")
    ap.add_argument(
        "--grpc-client",
        choices=["raw", "grpcio"],
        default="raw",
        help="gRPC load generator: a minimal HTTP/2 client (cheap) or grpcio's (for comparison)",
    )
    ap.add_argument("--probe-rps", type=float, default=1000.0, help="rate of the client CPU probe; 0: none")
    ap.add_argument("--probe-seconds", type=float, default=2.0, help="length of the client CPU probe")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.capacity_seconds <= 0 or args.seconds > 600 or min(args.levels) <= 0:
        ap.error("--seconds and --capacity-seconds must be in (0, 600] and every level > 0")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 10x capacity opens many sockets at once
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))

    work = Path(tempfile.mkdtemp(prefix="kiln-overload-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    import kiln

    repo, side, ms = import_cnn(work, args.model_ms)
    x = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
    with kiln.load(repo, MODEL) as p:
        expected = next(iter(p.predict(x).values()))
    print(f"machine: {os.cpu_count()} logical cores, shared by server and client; server engine threads: 1")
    print(f"model: CNN on {side}x{side} images, batch-1 engine {ms:.2f} ms in process "
          f"(~{1e3 / ms:.0f} infer/s); open loop {args.seconds:g} s per level, {args.arrivals} arrivals, "
          f"client timeout {args.client_timeout:g} s, budget sent {args.budget_ms or 'none'}")  # fmt: skip

    ports = {"http": free_port(), "grpc": free_port()}
    args.http_port = ports["http"]
    proc = start_server(repo, work, ports["http"], ports["grpc"], args.server_timeout)
    exit_code: int | None = None
    try:
        mem_start = memory_kb(proc.pid)
        results, loop_kind = run_async(drive(args, ports, x, expected))
        alive = proc.poll() is None
        ready = http_get(ports["http"], "/v2/health/ready")
        mem_end = memory_kb(proc.pid) if alive else {}
        refusals = server_refusals(ports["http"]) if alive else {}
    finally:
        exit_code = stop_server(proc)
    print(f"\nclient event loop: {loop_kind}")
    for protocol, (count, p99) in refusals.items():  # the server's own clock: from its handler's start
        print(f"server-side refusal time ({protocol}, kiln_refusal_seconds): {count} refusals, p99 <= {p99 * 1e3:g} ms")
    if mem_end:
        print(f"server memory: VmRSS {mem_start['VmRSS'] / 1024:.0f} MiB after start, "
              f"{mem_end['VmRSS'] / 1024:.0f} MiB at the end, peak VmHWM {mem_end['VmHWM'] / 1024:.0f} MiB "
              f"({mem_end['processes']} process(es))")  # fmt: skip
    print(f"after the run: /v2/health/ready {ready}; "
          + "; ".join(f"{k} inference {v}" for k, v in results["after"].items()))  # fmt: skip
    print(f"kiln serve exited with {exit_code} after SIGTERM")

    checks = []
    for protocol in args.protocols:
        r = results[protocol]
        checks += checks_for(protocol, r["capacity"], r["levels"], r["base_p99_ms"], args.rejection_ms)
    healthy = ready == 200 and all(v.startswith("max") and "too large" not in v for v in results["after"].values())
    checks.append(f"server healthy afterwards (ready, correct answers): {'PASS' if healthy else 'FAIL'}")
    checks.append(f"no crash (alive at the end, exit {exit_code} on SIGTERM): "
                  f"{'PASS' if alive and exit_code == 0 else 'FAIL'}")  # fmt: skip
    print("\nchecks")
    for line in checks:
        print(line)
    if args.json:
        figures = {
            "machine_cores": os.cpu_count(), "image_side": side, "engine_ms": ms,
            "args": vars(args) | {"json": str(args.json)},
            "protocols": {p: {"capacity": asdict(results[p]["capacity"]), "base_p99_ms": results[p]["base_p99_ms"],
                              "levels": [asdict(lv) for lv in results[p]["levels"]],
                              "cpu_probe": asdict(results[p]["cpu_probe"]) if results[p]["cpu_probe"] else None}
                          for p in args.protocols},
            "memory_kb": {"start": mem_start, "end": mem_end}, "ready_after": ready, "after": results["after"],
            "exit_code": exit_code, "checks": checks,
        }  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        print(f"figures written to {args.json}")
    failed = not all(line.endswith("PASS") for line in checks)
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
