"""Predictive eviction and prefetch against LRU: one day-and-week trace of 24 models, replayed twice in one run.

24 MLPs of different widths and depths (0.5-28 MiB, loads of about 10-200 ms) are imported into a temporary
repository. A synthetic trace gives them the shapes of real traffic: two APIs busy around the clock, six
office-hours models (Monday to Friday, 09:00-17:00), three nightly jobs, four timers (every 30-90 minutes),
two weekend models, three that come in random bursts, and a long tail of four requested a few times a day.
The evaluated stretch runs from Friday 06:00 to Sunday 06:00 (local time), compressed ``--speedup`` times
(48 hours in about a minute), and is replayed against the real ``ModelManager`` in process, through the
service's ``resolve``/``infer`` path, open loop (each request at its time, whatever the ones before it do),
with ``max_memory`` a third of what the models need and the models loaded on demand (lazy), once under
``eviction: lru`` and once under ``eviction: predictive``, each in a fresh process. The predictive run starts
from the usage history the two weeks before would have left (``REPO/.kiln/usage.json``, as a restart finds
it, without a snapshot of loaded models); its usage clock runs ``--speedup`` times fast, as the trace does.

It prints cold loads on the request path (a request found its model not loaded and loaded it), the
requests that waited for any load, p50/p99 latency (from each request's due time to its answer, loads
included) and the memory the models held (the manager's estimate, sampled), then the ratios with PASS/FAIL:
at least 50 % fewer cold loads than LRU and a lower p99.

The memory section loads and unloads one 16 MiB MLP ``--cycles`` times in a fresh process, with glibc's
default allocator settings and with the manager's (``kiln.memory.tune_allocator``): RSS after the cycles
must be within 5 % of RSS after the first, and each unload must hand back at least 90 % of what its load
took.

    .venv/bin/python benchmarks/prefetch_trace.py [--speedup 2880] [--hours 48] [--cycles 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HOUR, DAY, WEEK = 3600.0, 86400.0, 604800.0
INPUT_DIM = 256


@dataclass(frozen=True)
class Model:
    name: str
    kind: str  # steady, office, nightly, timer, weekend, burst, tail
    width: int
    layers: int
    param: float = 0.0  # nightly: the hour it runs; timer: its period in minutes


MODELS = [  # the busy ones small, the rare ones large, as in most fleets
    Model("api-0", "steady", 256, 2),
    Model("api-1", "steady", 384, 2),
    *(Model(f"office-{i}", "office", w, n) for i, (w, n) in enumerate([(512, 3), (640, 2), (384, 3),
                                                                      (768, 2), (512, 2), (640, 3)])),
    *(Model(f"nightly-{i}", "nightly", w, n, i + 1) for i, (w, n) in enumerate([(1536, 3), (1280, 3), (1024, 4)])),
    *(Model(f"timer-{i}", "timer", w, n, p) for i, (w, n, p) in enumerate([(512, 2, 30), (640, 2, 45),
                                                                         (768, 2, 60), (512, 3, 90)])),
    Model("weekend-0", "weekend", 1024, 3),
    Model("weekend-1", "weekend", 1280, 2),
    *(Model(f"burst-{i}", "burst", w, n) for i, (w, n) in enumerate([(1024, 2), (896, 3), (768, 3)])),
    *(Model(f"tail-{i}", "tail", w, n) for i, (w, n) in enumerate([(1536, 2), (1280, 2), (1024, 3), (768, 2)])),
]  # fmt: skip


def build_mlp(path: Path, width: int, layers: int, seed: int) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, weights, prev, dim = [], [], "x", INPUT_DIM
    for i in range(layers):
        w = (rng.standard_normal((dim, width)) / np.sqrt(dim)).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]), helper.make_node("Relu", [f"a{i}"], [f"h{i}"])]  # fmt: skip
        prev, dim = f"h{i}", width
    weights.append(numpy_helper.from_array((rng.standard_normal((dim, 10)) / np.sqrt(dim)).astype(np.float32), "wo"))
    nodes.append(helper.make_node("MatMul", [prev, "wo"], ["y"]))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", INPUT_DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], weights,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def build_repo(work: Path) -> Path:
    import kiln

    repo = work / "repo"
    for i, m in enumerate(MODELS):
        kiln.import_model(build_mlp(work / f"{m.name}.onnx", m.width, m.layers, i), repo, name=m.name)
    return repo


# ---- the trace ---------------------------------------------------------------------------------------------
def local_offset() -> float:
    return float(time.localtime().tm_gmtoff)


def a_friday_morning() -> float:
    """06:00 local time on a Friday (2023), in seconds since the epoch."""
    monday = 4 * DAY + 2800 * WEEK - local_offset()  # the epoch fell on a Thursday
    return monday + 4 * DAY + 6 * HOUR


def _poisson(rng: np.random.Generator, rate_per_h: float, a: float, b: float) -> list[float]:
    n = rng.poisson(rate_per_h * (b - a) / HOUR)
    return list(rng.uniform(a, b, n))


def trace(start: float, end: float, seed: int) -> list[tuple[float, str]]:
    """(time, model) pairs, sorted: the day-and-week shapes of the module docstring."""
    rng = np.random.default_rng(seed)
    off = local_offset()
    events: list[tuple[float, str]] = []
    first_day = int((start + off) // DAY)
    days = range(first_day, int((end + off) // DAY) + 1)
    for m in MODELS:
        times: list[float] = []
        if m.kind == "steady":
            times = _poisson(rng, 20, start, end)
        elif m.kind == "timer":
            period = m.param * 60
            phase = rng.uniform(0, period)
            t = start - (start % period) + phase
            while t < end:
                times += [t, t + 1]
                t += period
        elif m.kind in ("burst", "tail"):
            rate = 4 if m.kind == "burst" else 3  # per day
            for t0 in _poisson(rng, rate / 24, start, end):
                times += list(t0 + rng.uniform(0, 1200, 15)) if m.kind == "burst" else [t0]
        else:
            for day in days:
                midnight = day * DAY - off
                weekday = (day + 3) % 7  # Monday 0
                if m.kind == "office" and weekday < 5:
                    times += _poisson(rng, 12, midnight + 9 * HOUR + rng.uniform(-600, 600), midnight + 17 * HOUR)
                elif m.kind == "nightly":
                    times += _poisson(rng, 40, midnight + m.param * HOUR, midnight + (m.param + 1) * HOUR)
                elif m.kind == "weekend" and weekday >= 5:
                    times += _poisson(rng, 10, midnight + 10 * HOUR, midnight + 20 * HOUR)
        events += [(t, m.name) for t in times if start <= t < end]
    events.sort()
    return events


def write_history(repo: Path, start: float, weeks: int, seed: int) -> int:
    """The usage history the ``weeks`` before ``start`` would have left, saved where the manager reads it."""
    from kiln.serving.demand import UsageHistory, usage_path

    now = [start - weeks * WEEK]
    history = UsageHistory(lambda: now[0])
    events = trace(start - weeks * WEEK, start, seed)
    for t, name in events:
        now[0] = t
        history.record(name, 1)
    now[0] = start
    history.save(usage_path(repo), history.dumps(loaded=[]))
    return len(events)


# ---- one replay, in its own process ------------------------------------------------------------------------
def _counter_total(counter: Any) -> float:
    return sum(s.value for metric in counter.collect() for s in metric.samples if s.name.endswith("_total"))


async def _replay(repo: Path, policy: str, events: list[tuple[float, str]], args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    from kiln.serving.manager import ModelManager
    from kiln.serving.metrics import Metrics
    from kiln.serving.protocol import InferRequest
    from kiln.serving.service import Service
    from kiln.serving.settings import ServerSettings

    settings = ServerSettings(
        repo=repo, engine_threads=1, load_mode="lazy", max_memory=args.budget, eviction=policy,  # type: ignore[arg-type]
        prefetch_window_s=args.window_h * HOUR, prefetch_interval_s=args.tick,
    )  # fmt: skip
    v0 = events[0][0] if args.start is None else args.start
    r0 = time.perf_counter() + 0.5  # start-up (and, predictive, its first prefetch rounds) before the trace

    def virtual_now() -> float:
        return v0 + (time.perf_counter() - r0) * args.speedup

    metrics = Metrics()
    manager = ModelManager(settings, metrics, usage_clock=virtual_now)
    service = Service(settings, manager, metrics)
    x = np.zeros((1, INPUT_DIM), np.float32)
    latencies: list[float] = []
    waited = errors = 0
    memory: list[int] = []
    rss_peak = 0
    process = psutil.Process()

    async def one(name: str, due: float) -> None:
        nonlocal waited, errors
        if not manager.is_ready(name):
            waited += 1
        try:
            sv = await service.resolve(name, None)
            await service.infer(sv, InferRequest(id="", inputs={"x": x}))
        except Exception:
            errors += 1
            return
        latencies.append(time.perf_counter() - due)

    async def sample(stop: asyncio.Event) -> None:
        nonlocal rss_peak
        while not stop.is_set():
            memory.append(manager.loaded_bytes())
            rss_peak = max(rss_peak, process.memory_info().rss)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)

    await manager.start()
    gc.collect()
    gc.freeze()  # as the server does after start-up: full collections stay cheap
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample(stop))
    tasks = []
    for t, name in events:
        due = r0 + (t - v0) / args.speedup
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(name, due)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - r0
    stop.set()
    await sampler
    await manager.close()
    lat_ms = np.array(latencies) * 1e3
    return {
        "policy": policy, "requests": len(events), "errors": errors, "waited": waited, "wall_s": wall,
        "cold": _counter_total(metrics.cold_loads), "prefetches": _counter_total(metrics.prefetches),
        "hits": _counter_total(metrics.prefetch_hits), "wasted": _counter_total(metrics.prefetch_wasted),
        "evictions": _counter_total(metrics.evictions),
        "cold_by_model": {
            s.labels["model"]: s.value
            for metric in metrics.cold_loads.collect() for s in metric.samples if s.name.endswith("_total")
        },
        "p50": float(np.percentile(lat_ms, 50)), "p99": float(np.percentile(lat_ms, 99)),
        "mem_mean": float(np.mean(memory)), "mem_peak": float(np.max(memory)), "rss_peak": rss_peak,
        "load_s": sorted(
            s.value / max(1, c.value)
            for metric in metrics.load_seconds.collect() for s in metric.samples if s.name.endswith("_sum")
            for c in [next(c for c in metric.samples if c.name.endswith("_count") and c.labels == s.labels)]
        ),
    }  # fmt: skip


def _cycles(repo: Path, cycles: int, tuned: bool) -> dict[str, Any]:
    """Load and unload one model ``cycles`` times: RSS after each unload, and the share of each load's RSS
    that its unload handed back."""
    import psutil

    import kiln.serving.manager as manager_module
    from kiln.serving.manager import ModelManager
    from kiln.serving.metrics import Metrics
    from kiln.serving.settings import ServerSettings

    if not tuned:  # glibc's defaults: the baseline
        manager_module.tune_allocator = lambda *a, **k: False
    manager = ModelManager(ServerSettings(repo=repo, engine_threads=1, load_mode="lazy"), Metrics())
    process = psutil.Process()

    async def run() -> dict[str, Any]:
        await manager.load("cycle")
        await manager.unload("cycle")
        first = process.memory_info().rss
        freed, after = [], []
        for _ in range(cycles):
            before = process.memory_info().rss
            await manager.load("cycle")
            loaded = process.memory_info().rss
            await manager.unload("cycle")
            after.append(process.memory_info().rss)
            freed.append((loaded - after[-1]) / max(1, loaded - before))
        return {"first": first, "last": after[-1], "max": max(after), "freed": freed}

    return asyncio.run(run())


def _child(argv: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def compare(work: Path, args: argparse.Namespace) -> None:
    """The trace, replayed under lru and under predictive: the table and the ratios."""
    t = time.perf_counter()
    repo = build_repo(work)
    from kiln.repository import CHOSEN, Repository
    from kiln.serving.manager import version_bytes

    repository = Repository(repo)
    sizes = {m.name: version_bytes(repository, repository.variant(m.name, 1, CHOSEN)) for m in MODELS}
    total = sum(sizes.values())
    budget = total // 3
    start = a_friday_morning()
    end = start + args.hours * HOUR
    events = trace(start, end, seed=1)
    (work / "trace.json").write_text(json.dumps(events))
    print(
        f"machine: {os.cpu_count()} logical cores, shared; engines on 1 thread; set-up {time.perf_counter() - t:.0f} s"
    )
    print(f"models: {len(MODELS)} MLPs of {_mib(min(sizes.values()))}-{_mib(max(sizes.values()))} MiB, "
          f"{_mib(total)} MiB in all; max_memory {_mib(budget)} MiB (a third)")  # fmt: skip
    kinds: dict[str, int] = {}
    for _, name in events:
        kind = next(m.kind for m in MODELS if m.name == name)
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"trace: Friday 06:00 + {args.hours:g} h (local time), {len(events)} requests "
          f"({', '.join(f'{k} {n}' for k, n in kinds.items())}), replayed {args.speedup:g}x fast "
          f"({args.hours * HOUR / args.speedup:.0f} s); prefetch window {args.window_h:g} h, "
          f"a round every {args.tick:g} s")  # fmt: skip
    common = ["--work", str(work), "--budget", str(budget), "--start", str(start), "--speedup", str(args.speedup),
              "--window-h", str(args.window_h), "--tick", str(args.tick)]  # fmt: skip
    results = {"lru": _child(["--replay", "lru", *common])}
    n = write_history(repo, start, args.history_weeks, seed=2)
    print(f"history for predictive: {n} requests of the {args.history_weeks} weeks before, in REPO/.kiln/usage.json")
    results["predictive"] = _child(["--replay", "predictive", *common])
    print(f"\n{'policy':11} {'requests':>8} {'errors':>6} {'cold loads':>10} {'waited':>6} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'mem mean/peak MiB':>18} {'RSS peak':>8} {'prefetch/hit/wasted':>19} {'evictions':>9}")  # fmt: skip
    for r in results.values():
        mem = f"{_mib(r['mem_mean'])} / {_mib(r['mem_peak'])}"
        ahead = f"{r['prefetches']:.0f}/{r['hits']:.0f}/{r['wasted']:.0f}"
        print(f"{r['policy']:11} {r['requests']:8d} {r['errors']:6d} {r['cold']:10.0f} {r['waited']:6d} "
              f"{r['p50']:7.2f} {r['p99']:7.1f} {mem:>18} {_mib(r['rss_peak']):>8} {ahead:>19} "
              f"{r['evictions']:9.0f}")  # fmt: skip
    lru, pred = results["lru"], results["predictive"]
    for r in results.values():
        by_kind = {m.kind: 0.0 for m in MODELS}
        for name, n in r["cold_by_model"].items():
            by_kind[next(m.kind for m in MODELS if m.name == name)] += n
        print(f"cold loads by kind, {r['policy']}: " + ", ".join(f"{k} {n:.0f}" for k, n in by_kind.items()))
    loads = np.array(pred["load_s"]) * 1e3
    print(f"load (and warm-up) time per model, predictive run: {loads.min():.0f}-{loads.max():.0f} ms, "
          f"median {np.median(loads):.0f} ms; replays took {lru['wall_s']:.0f} s and {pred['wall_s']:.0f} s")  # fmt: skip
    cold_ratio = pred["cold"] / max(lru["cold"], 1)
    p99_ratio = pred["p99"] / lru["p99"]
    print(f"cold loads on the request path, predictive/lru: {cold_ratio:.2f} "
          f"(at least 50 % fewer: {'PASS' if cold_ratio <= 0.5 else 'FAIL'})")  # fmt: skip
    print(f"p99 latency, predictive/lru: {p99_ratio:.2f} ({'lower: PASS' if p99_ratio < 1 else 'not lower: FAIL'})")
    print(f"p50 latency, predictive/lru: {pred['p50'] / lru['p50']:.2f}; "
          f"mean memory held, predictive/lru: {pred['mem_mean'] / lru['mem_mean']:.2f}")  # fmt: skip


def memory(work: Path, args: argparse.Namespace) -> None:
    """Load/unload cycles in a fresh process, with glibc's defaults and with the manager's allocator settings."""
    import kiln

    kiln.import_model(build_mlp(work / "cycle.onnx", 1024, 4, 99), work / "cycle-repo", name="cycle")
    print(f"\nmemory: one 16 MiB MLP loaded and unloaded {args.cycles} times in a fresh process, RSS in MiB")
    for how in ("default", "tuned"):
        r = _child(["--cycle-run", how, "--work", str(work), "--cycles", str(args.cycles)])
        growth = (r["last"] - r["first"]) / r["first"]
        freed = np.array(r["freed"])
        ok = growth < 0.05 and freed.min() >= 0.9
        label = "glibc defaults" if how == "default" else "tune_allocator()"
        print(f"{label:17}: after the first cycle {_mib(r['first'])}, after the last {_mib(r['last'])} "
              f"(growth {growth:+.1%}, highest {_mib(r['max'])}); share of a load's RSS its unload handed back: "
              f"min {freed.min():.1%}, p10 {np.percentile(freed, 10):.1%}, median {np.median(freed):.1%}: "
              f"{'PASS' if ok else 'FAIL'} (growth < 5 %, every unload >= 90 %)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speedup", type=float, default=2880.0, help="virtual seconds per real second")
    parser.add_argument("--hours", type=float, default=48.0, help="virtual hours replayed, from Friday 06:00")
    parser.add_argument("--history-weeks", type=int, default=2)
    parser.add_argument("--window-h", type=float, default=1.0, help="prefetch window, virtual hours")
    parser.add_argument("--tick", type=float, default=0.1, help="prefetch interval, real seconds")
    parser.add_argument("--cycles", type=int, default=300, help="load/unload cycles of the memory section")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-trace", action="store_true", help="only the memory section")
    parser.add_argument("--replay", choices=["lru", "predictive"], help=argparse.SUPPRESS)
    parser.add_argument("--cycle-run", choices=["tuned", "default"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replay:  # a child: one replay, its figures as the last line
        events = [(t, n) for t, n in json.loads((args.work / "trace.json").read_text())]
        print(json.dumps(asyncio.run(_replay(args.work / "repo", args.replay, events, args))))
        return
    if args.cycle_run:
        print(json.dumps(_cycles(args.work / "cycle-repo", args.cycles, args.cycle_run == "tuned")))
        return

    import logging

    logging.getLogger("kiln").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="kiln-prefetch-") as tmp:
        if not args.skip_trace:
            compare(Path(tmp), args)
        if not args.skip_memory:
            memory(Path(tmp), args)


if __name__ == "__main__":
    main()
