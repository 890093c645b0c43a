from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from kiln.bench import plots, runner
from kiln.bench.config import BenchConfig
from kiln.bench.report import _server_summary, compare, headline, jsonable
from kiln.bench.scenarios import completion_rate, poisson_arrivals, scheduled_run, search_max, stream_arrivals
from kiln.bench.stats import latency_stats, spread, timed_loop
from kiln.errors import CompareError, SpecError


def test_latency_stats_in_milliseconds() -> None:
    stats = latency_stats([0.001] * 98 + [0.010, 0.020])
    assert stats.count == 100
    assert stats.p50_ms == pytest.approx(1.0)
    assert stats.max_ms == pytest.approx(20.0)
    assert 1.0 < stats.p99_ms <= 20.0
    assert latency_stats([]).count == 0


def test_spread_is_relative_to_the_median() -> None:
    sp = spread([1.0, 1.1, 1.3])
    assert (sp.min, sp.median, sp.max) == (1.0, 1.1, 1.3)
    assert sp.relative == pytest.approx(0.3 / 1.1)


def test_timed_loop_respects_min_iterations_and_cap() -> None:
    calls = []
    times = timed_loop(lambda: calls.append(1), min_time_s=1e-9, min_iters=7, max_iters=1000)
    assert len(times) == len(calls) == 7
    assert len(timed_loop(lambda: None, min_time_s=60, min_iters=1, max_iters=5)) == 5


@pytest.mark.parametrize("limit", [3.0, 237.0, 1000.0])
def test_search_max_finds_the_threshold(limit: float) -> None:
    found = search_max(lambda q: q <= limit, start=10, steps=8)
    assert found <= limit
    assert found >= limit * 0.9 or limit < 10


def test_search_max_on_integers() -> None:
    assert search_max(lambda n: n <= 13, start=2, integer=True, steps=10) == 13


def test_arrivals() -> None:
    a = poisson_arrivals(200, 10, seed=1)
    assert len(a) == 2000 and np.all(np.diff(a) > 0)
    assert np.mean(np.diff(a)) == pytest.approx(1 / 200, rel=0.1)
    s = stream_arrivals(3, 30, 2, seed=0)
    assert len(s) == 3 * 60
    assert s[-1] < 2.0 + 1 / 30


class InstantSubmitter:
    def __init__(self, fail_every: int = 0, reject_every: int = 0) -> None:
        self.pool = ThreadPoolExecutor(2)
        self.n = 0
        self.lock = threading.Lock()
        self.fail_every, self.reject_every = fail_every, reject_every

    def submit(self, inputs: dict[str, np.ndarray]) -> Future[Any]:
        with self.lock:
            self.n += 1
            n = self.n
        if self.reject_every and n % self.reject_every == 0:
            raise RuntimeError("queue full")

        def work() -> int:
            if self.fail_every and n % self.fail_every == 0:
                raise ValueError("engine failed")
            return n

        return self.pool.submit(work)


def test_scheduled_run_counts_every_outcome() -> None:
    sub = InstantSubmitter(fail_every=5, reject_every=7)
    arrivals = np.linspace(0.001, 0.2, 70)
    stats = scheduled_run(sub, {}, arrivals)
    assert stats.sent == 70
    assert stats.rejected == 10
    assert stats.failed == len([n for n in range(1, 71) if n % 5 == 0 and n % 7 != 0])
    assert stats.completed == stats.sent - stats.rejected - stats.failed
    assert not stats.meets(slo_ms=1000)
    clean = scheduled_run(InstantSubmitter(), {}, arrivals)
    assert clean.completed == 70 and clean.meets(slo_ms=1000)


def _bench_json(p50: float, ips: float) -> dict[str, Any]:
    return {"variants": [{"variant": "reference", "batches": [{"batch": 1, "latency": {"p50_ms": p50}, "items_per_s": ips}]}],
            "scenarios": [{"scenario": "offline", "variant": "reference", "metrics": {"items_per_s": ips}}]}  # fmt: skip


def test_compare_flags_regressions_beyond_the_threshold() -> None:
    same = compare(_bench_json(1.0, 1000), _bench_json(1.05, 960), threshold=0.10)
    assert not same.regressions
    slower = compare(_bench_json(1.0, 1000), _bench_json(1.3, 770), threshold=0.10)
    assert {r.metric for r in slower.regressions} == {"p50 ms", "items/s", "items_per_s"}
    faster = compare(_bench_json(1.0, 1000), _bench_json(0.5, 2000), threshold=0.10)
    assert not faster.regressions


def test_compare_needs_something_in_common() -> None:
    other = _bench_json(1.0, 1.0)
    other["variants"][0]["variant"] = "abc"
    other["scenarios"] = []
    with pytest.raises(CompareError, match="after lacks figures before has: reference · batch 1 p50 ms"):
        compare(_bench_json(1.0, 1.0), other)
    with pytest.raises(CompareError, match="share no figure"):
        compare({"variants": []}, {"variants": []})


MACHINE = {"cpu_model": "Xeon 1", "architecture": "x86_64", "physical_cores": 4, "logical_cores": 8, "devices": []}


def _full(p50: float = 1.0, p99: float = 2.0, memory: int = 50_000_000, load_s: float = 0.5,
          server_p99: float = 10.0, qps: float = 100.0, **top: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "kind": "in-process", "model": "m", "machine": dict(MACHINE), "config": {"device": "cpu", "threads": None},
        "interrupted": False,
        "variants": [{"variant": "reference", "load_s": load_s, "peak_memory_bytes": memory,
                      "memory_kind": "vmhwm-delta",
                      "batches": [{"batch": 1, "latency": {"p50_ms": p50, "p99_ms": p99}, "items_per_s": 1000 / p50}]}],
        "scenarios": [{"scenario": "server", "variant": "reference", "params": {"qps": qps},
                       "metrics": {"max_qps": 200.0, "latency": {"p99_ms": server_p99}}}],
        **top,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("change", "metric"),
    [
        ({"p99": 3.0}, "p99 ms"),
        ({"memory": 80_000_000}, "peak memory MB"),
        ({"load_s": 0.9}, "load s"),
        ({"server_p99": 15.0}, "p99 ms"),
    ],
)
def test_compare_gates_on_p99_memory_load_time_and_server_p99(change: dict[str, float], metric: str) -> None:
    result = compare(_full(), _full(**change), threshold=0.2)
    assert [r.metric for r in result.regressions] == [metric]
    assert not compare(_full(), _full(), threshold=0.2).regressions


def test_compare_ignores_changes_below_the_noise_floor() -> None:
    # 0.3 MB → 0.9 MB is 3x, and 2 ms → 4 ms is 2x, but both are allocator and file-cache noise.
    result = compare(_full(memory=300_000, load_s=0.002), _full(memory=900_000, load_s=0.004), threshold=0.1)
    assert not result.regressions


def test_compare_refuses_runs_that_are_not_comparable() -> None:
    with pytest.raises(CompareError, match=r"model 'm' and .* model 'other'"):
        compare(_full(), _full(model="other"))
    with pytest.raises(CompareError, match="after is from an interrupted run"):
        compare(_full(), _full(interrupted=True))
    with pytest.raises(CompareError, match="one kind"):
        compare(_full(), {"kind": "load", "runs": []})
    lost_scenario = _full(scenarios=[])
    with pytest.raises(CompareError, match="server · reference max_qps"):
        compare(_full(), lost_scenario)
    assert compare(lost_scenario, _full()).rows  # a figure only `after` has is fine


def test_compare_warns_where_the_numbers_change_meaning() -> None:
    other_machine = _full(machine={**MACHINE, "cpu_model": "EPYC 2", "physical_cores": 16})
    result = compare(_full(), other_machine)
    assert any("different machines" in w and "EPYC 2" in w and "physical_cores" in w for w in result.warnings)
    other_load = compare(_full(), _full(qps=150.0))
    assert any("p99 not compared, measured at 100.0 QPS before and 150.0 after" in w for w in other_load.warnings)
    assert "p99 ms" not in {r.metric for r in other_load.rows if r.key.startswith("server")}
    sampled = _full()
    sampled["variants"][0]["memory_kind"] = "rss-sampled-delta"
    assert any("peak memory not compared" in w for w in compare(_full(), sampled).warnings)
    assert any(
        "different device" in w for w in compare(_full(), _full(config={"device": "cuda", "threads": None})).warnings
    )


# ---- config: scenarios implied by the options, and the command that reproduces a run -------------------
def test_qps_options_bring_the_server_scenario() -> None:
    assert BenchConfig().scenarios == ["single-stream", "offline"]
    assert BenchConfig(find_max_qps=True).scenarios == ["single-stream", "offline", "server"]
    assert BenchConfig(server_qps=50).scenarios == ["single-stream", "offline", "server"]
    assert BenchConfig(scenarios=["server"], find_max_qps=True).scenarios == ["server"]
    with pytest.raises(SpecError, match=r"find_max_qps applies to the server scenario.*add 'server'"):
        BenchConfig.from_options(scenarios=["offline"], find_max_qps=True)
    base = BenchConfig(batch_sizes=[1])
    built = BenchConfig.build(base, find_max_qps=True)
    assert built.scenarios[-1] == "server" and built.batch_sizes == [1] and base.find_max_qps is False


def test_the_command_names_every_setting_the_cli_has() -> None:
    config = BenchConfig(variants=["chosen"], batch_sizes=[1, 8], scenarios=["server", "multi-stream"], min_time_s=0.5,
                         repeats=2, device="cuda:1", threads=4, find_max_qps=True, slo_ms=40, stream_fps=25,
                         scenario_seconds=2)  # fmt: skip
    line = config.command("digits", "/tmp/my repo", 3, ["ort-int8-abc"])
    assert line == (
        "kiln bench digits --repo '/tmp/my repo' --version 3 --variants ort-int8-abc --batch-sizes 1,8 "
        "--scenario server --scenario multi-stream --min-time 0.5 --repeats 2 --device cuda:1 --threads 4 "
        "--find-max-qps --slo-ms 40 --fps 25 --seconds 2"
    )
    assert "min_iters=3 (Python API only)" in BenchConfig(min_iters=3).command("m", "r")


# ---- the server scenario only meets a target it sustains ------------------------------------------------
def test_completion_rate_separates_keeping_up_from_falling_behind() -> None:
    due = np.cumsum(np.random.default_rng(0).exponential(1 / 200, 400))  # 200 QPS offered for 2 s
    offered = len(due) / due[-1]
    kept_up = due + 0.05 + np.random.default_rng(1).uniform(0, 0.02, len(due))  # latency 50-70 ms, no trend
    assert completion_rate(due, kept_up, offered) == pytest.approx(offered, rel=0.02)
    capacity = 180.0  # a server that completes one request each 1/180 s from the first arrival on
    behind = due[0] + 0.005 + np.arange(len(due)) / capacity
    assert completion_rate(due, behind, offered) == pytest.approx(capacity, rel=0.03)


class OneServer:
    """A single FIFO server with a fixed service time per request (sleeping is the modelled work)."""

    def __init__(self, service_s: float) -> None:
        self.pool = ThreadPoolExecutor(1)
        self.service_s = service_s

    def submit(self, inputs: dict[str, np.ndarray]) -> Future[Any]:
        return self.pool.submit(time.sleep, self.service_s)


def test_an_overloaded_server_does_not_meet_a_loose_slo() -> None:
    # 5 ms per request: at most 200 QPS. Offered 300 for one second, the backlog only reaches ~0.5 s,
    # under a 2 s SLO; without comparing achieved with offered QPS this trial "met" its target.
    server = OneServer(0.005)
    try:
        over = scheduled_run(server, {}, poisson_arrivals(300, 1.0, seed=3))
        assert over.completed == over.sent and over.latency["p99_ms"] < 2000
        assert over.achieved_qps < 0.9 * over.offered_qps and over.backlog_at_end > 30
        assert not over.meets(slo_ms=2000)
        under = scheduled_run(server, {}, poisson_arrivals(80, 1.0, seed=4))
        assert under.meets(slo_ms=2000), under
    finally:
        server.pool.shutdown()


def test_json_never_holds_nan() -> None:
    assert jsonable({"a": [1.0, float("nan")], "b": {"c": float("inf")}, "d": "x"}) == {
        "a": [1.0, None],
        "b": {"c": None},
        "d": "x",
    }


# ---- --compare allows for the noise each run measured -----------------------------------------------
def _noisy(p50: float, spread: float | None) -> dict[str, Any]:
    batch: dict[str, Any] = {"batch": 1, "latency": {"p50_ms": p50, "p99_ms": 2 * p50}, "items_per_s": 1000 / p50}
    if spread is not None:
        batch["spread"] = {"p50_ms": spread, "p99_ms": spread, "items_per_s": spread}
    return {"variants": [{"variant": "reference", "batches": [batch]}], "scenarios": []}


def test_compare_allows_for_the_spread_the_repeats_measured() -> None:
    # Repeats that disagreed by 20 % in each run: a 25 % change is within the noise, 2x is not.
    within = compare(_noisy(1.0, 0.2), _noisy(1.25, 0.2), threshold=0.1)
    assert not within.regressions
    assert all(r.allowed(0.1) == pytest.approx(2 * (0.2**2 * 2) ** 0.5) for r in within.rows)
    assert any("too noisy to gate at 10%" in w for w in within.warnings)
    doubled = compare(_noisy(1.0, 0.2), _noisy(2.0, 0.2), threshold=0.1)
    assert {r.metric for r in doubled.regressions} == {"p50 ms", "p99 ms", "items/s"}
    # Quiet runs (2 % spread) gate at the threshold itself, and so do files without a spread.
    assert {r.metric for r in compare(_noisy(1.0, 0.02), _noisy(1.25, 0.02), threshold=0.1).regressions} == {
        "p50 ms", "p99 ms", "items/s"}  # fmt: skip
    assert compare(_noisy(1.0, None), _noisy(1.25, None), threshold=0.1).regressions
    assert not compare(_noisy(1.0, None), _noisy(1.25, None), threshold=0.1).warnings[1:]
    # A few microseconds a call is noise whatever the ratio; tens of microseconds are not.
    assert not compare(_noisy(0.002, None), _noisy(0.004, None), threshold=0.1).regressions
    assert {r.metric for r in compare(_noisy(0.03, None), _noisy(0.06, None), threshold=0.1).regressions} == {
        "p50 ms", "p99 ms", "items/s"}  # fmt: skip
    # One run's spread is enough to widen it (the other's was not stored).
    assert not compare(_noisy(1.0, 0.3), _noisy(1.25, None), threshold=0.1).regressions


def test_compare_allows_for_a_search_resolution() -> None:
    def server(max_qps: float, resolution: float | None) -> dict[str, Any]:
        metrics: dict[str, Any] = {"max_qps": max_qps, **({"spread": {"max_qps": resolution}} if resolution else {})}
        return {"variants": [], "scenarios": [{"scenario": "server", "variant": "r", "params": {}, "metrics": metrics}]}

    assert not compare(server(200, 0.25), server(160, 0.25), threshold=0.1).regressions  # one bisection step apart
    assert compare(server(200, 0.25), server(100, 0.25), threshold=0.1).regressions
    assert compare(server(200, None), server(160, None), threshold=0.1).regressions


# ---- find-max-qps reports one consistent answer ---------------------------------------------------------
def test_find_max_qps_reports_the_trial_that_met_the_slo(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.bench import scenarios

    runs: list[float] = []

    def fake_run(submitter: Any, inputs: Any, arrivals: np.ndarray, timeout_s: float = 30.0) -> scenarios.RunStats:
        qps = len(arrivals) / float(arrivals[-1])
        runs.append(qps)
        p99 = 5.0 if qps <= 150 else 400.0  # 150 QPS is where this system stops meeting a 20 ms p99
        return scenarios.RunStats(qps, qps, len(arrivals), len(arrivals), 0, 0, {"p99_ms": p99, "p50_ms": 1.0})

    monkeypatch.setattr(scenarios, "scheduled_run", fake_run)
    config = BenchConfig(scenarios=["server"], find_max_qps=True, slo_ms=20, scenario_seconds=1.0)
    found = scenarios._server(None, {}, "v", config, estimate=100.0)
    m = found.metrics
    assert 140 <= m["max_qps"] <= 150 and m["meets_slo"] and found.params["qps"] == m["max_qps"]
    assert m["latency"]["p99_ms"] == 5.0 and len(runs) == len(m["trials"])  # no extra run that could miss
    assert 0 < m["spread"]["max_qps"] < 0.1  # the search's bracket above the answer
    summary = _server_summary(found.params, m)
    assert summary.startswith(f"max {m['max_qps']:,.1f} QPS with p99 ≤ 20 ms (") and "miss" not in summary
    nothing = scenarios._server(None, {}, "v", BenchConfig(find_max_qps=True, slo_ms=1), estimate=100.0)
    assert nothing.metrics["max_qps"] == 0 and not nothing.metrics["meets_slo"]
    assert _server_summary(nothing.params, nothing.metrics).startswith("no load tried met p99 ≤ 1 ms; at ")


# ---- the run says how long it takes, and aggregates its noise warnings -----------------------------------
class _FakeVariant:
    def __init__(self, latency_ms: float | None = None) -> None:
        self.latency_ms = latency_ms

    def figures(self) -> dict[str, Any]:
        return {"timing": {"latency_ms": self.latency_ms}} if self.latency_ms else {}


def test_a_long_run_is_estimated_up_front() -> None:
    config = BenchConfig(variants=["all"], find_max_qps=True)
    plan = runner.estimate([_FakeVariant()] * 14, config)  # type: ignore[list-item]
    assert 6 * 60 <= plan.seconds <= 10 * 60, plan  # 14 × (6 batch sizes × 1 s + 9 server trials × 3 s + load)
    assert plan.text.startswith("≈ 8 min for 14 variants × 6 batch sizes, then the server scenario on each")
    assert plan.text.endswith("--time-budget to cap")
    # 50 ms at batch 1 (the optimizer's figure), so about 1.6 s a call at batch 32: 10 calls × 3 repeats, the
    # first run and 5 warm-ups outlast --min-time.
    capped = runner.estimate([_FakeVariant(50.0)], BenchConfig(batch_sizes=[32], time_budget_s=30))  # type: ignore[list-item]
    assert capped.seconds == pytest.approx(1 + 36 * 1.6)
    assert capped.text == "≈ 59 s for 1 variant × 1 batch size; capped at 30 s by --time-budget"


def test_noisy_repeats_make_one_warning() -> None:
    from kiln.bench.results import BatchResult, BenchResult, VariantBench
    from kiln.bench.stats import latency_stats

    def variant(name: str, spreads: list[float]) -> VariantBench:
        v = VariantBench(name, "onnxruntime", "fp32", 0.1, 1.0, 10, 0, "vmhwm-delta")
        v.batches = [BatchResult(b, latency_stats([0.001]), 1000.0, 1.0, [1.0, 1.5], s, [f"batch {b}: disagree"] * (s > 0.15))
                     for b, s in zip((1, 8), spreads, strict=True)]  # fmt: skip
        return v

    result = BenchResult("m", 1, "", {}, {}, variants=[variant("a", [0.4, 0.1]), variant("b", [0.2, 0.6])])
    line = runner._noise_warning(result, BenchConfig())
    assert line is not None and line.startswith(
        "repeats disagreed by more than 15% in 3 of 4 measurements (worst: b batch 8, 60%)"
    )
    assert (
        runner._noise_warning(BenchResult("m", 1, "", {}, {}, variants=[variant("a", [0.1, 0.1])]), BenchConfig())
        is None
    )


# ---- plots a person reads at a glance --------------------------------------------------------------------
@pytest.mark.parametrize(("lo", "hi"), [(0.021, 0.25), (0.04, 0.07), (0.0101, 0.0109), (1.0, 50_000.0), (3e-4, 2.0)])
def test_log_axes_get_several_plain_tick_labels(lo: float, hi: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_yscale("log")
    ax.plot([0, 1], [lo, hi])
    plots._log_ticks(ax.yaxis, lo, hi)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    plt.close(fig)
    assert 3 <= len(labels) <= 8 and len(set(labels)) == len(labels), labels
    assert not any("10^" in t or "times" in t or "e-" in t for t in labels), labels


def test_the_pareto_plot_labels_the_frontier_inside_the_axes_without_overlap() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [{"label": f"variant number {i} with a long name", "latency_ms": 0.02 * 1.15**i, "accuracy": 0.99 - 0.0005 * i,
               "frontier": i % 3 != 2, "chosen": i == 0} for i in range(12)]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([p["latency_ms"] for p in points], [p["accuracy"] for p in points])
    ax.set_xscale("log")
    fig.tight_layout()
    frontier = [p for p in points if p["frontier"]]
    placed = plots._label_points(fig, ax, frontier)
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    plt.close(fig)
    assert len(placed) == len(boxes) >= 4 and set(placed) <= {p["label"] for p in frontier}
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    png = plots.pareto_plot(points)
    assert "x: batch-1 latency (ms), ticks " in png.alt and png.startswith(b"\x89PNG")  # type: ignore[attr-defined]


# ---- the headline --------------------------------------------------------------------------------------
def _optimized(*variants: tuple[str, str, dict[str, Any] | None, float | None]) -> dict[str, Any]:
    """An optimizer report: (id, status, recipe, batch-1 ms) per variant; the chosen one scores top-1 0.99."""
    return {"model": "m", "version": 1, "objective": "latency", "metric": "top1", "chosen": "int8", "baseline": None,
            "variants": [{"id": i, "label": f"{i} label", "status": status, "recipe": recipe,
                          "timing": None if ms is None else {"latency_ms": ms, "latency_p90_ms": ms, "throughput": 1e3 / ms,
                                                             "batch": 8, "first_run_s": 0, "load_s": 0, "iterations": 9,
                                                             "threads": 2},
                          "accuracy": {"metric": "top1", "value": 0.99, "reference_value": 0.995, "max_abs_error": 0.1,
                                       "sqnr_db": 30.0, "cosine_mean": 0.99, "samples": 100}}
                         for i, status, recipe, ms in variants]}  # fmt: skip


def _bench_data(chosen: str = "int8", chosen_ms: float = 1.0, same_as: str = "") -> dict[str, Any]:
    def v(name: str, ms: float, same: str = "") -> dict[str, Any]:
        return {"variant": name, "engine": "onnxruntime", "precision": "fp32", "label": "", "same_as": same,
                "batches": [{"batch": 1, "latency": {"p50_ms": ms}}]}  # fmt: skip

    return {
        "model": "m",
        "version": 1,
        "chosen": chosen,
        "variants": [v("reference", 2.0), v(chosen, chosen_ms, same_as)],
    }


EAGER = {"engine": "torch", "precision": "fp32"}
ORT = {"engine": "onnxruntime", "precision": "fp32"}
INT8 = {"engine": "onnxruntime", "precision": "fp32", "int8": "ort-static"}


def test_the_headline_says_what_was_chosen_and_how_much_faster() -> None:
    search = _optimized(("int8", "chosen", INT8, 0.5), ("eager", "accepted", EAGER, 8.0), ("ort", "accepted", ORT, 1.0))
    assert headline(_bench_data(), search) == (
        "chosen: int8 label · 16× torch eager, 2× ONNX Runtime fp32 (batch-1 latency, as kiln optimize timed them) · "
        "top-1 99.00% (reference 99.50%) · measured here at batch 1: 2× the reference (onnxruntime fp32)"
    )
    # An ONNX import has no torch eager to quote, and a variant never timed gives no ratio: left out.
    no_eager = headline(_bench_data(), _optimized(("int8", "chosen", INT8, 0.5), ("ort", "accepted", ORT, 1.0)))
    assert no_eager is not None and "torch eager" not in no_eager and "2× ONNX Runtime fp32" in no_eager
    untimed = headline(_bench_data(), _optimized(("int8", "chosen", INT8, 0.5), ("ort", "accepted", ORT, None)))
    assert (
        untimed
        == "chosen: int8 label · top-1 99.00% (reference 99.50%) · measured here at batch 1: 2× the reference (onnxruntime fp32)"
    )
    # The chosen variant is the reference's file: no ratio of a file against itself.
    same = headline(
        _bench_data("ort", 2.0, same_as="reference"), {**_optimized(("ort", "chosen", ORT, 1.0)), "chosen": "ort"}
    )
    assert same is not None and same.endswith("here the chosen variant is the reference's artifact (measured once)")
    # No optimizer report and nothing chosen: no headline at all; a report of another shape is ignored.
    assert headline({**_bench_data(), "chosen": ""}, None) is None
    assert (
        headline(_bench_data(), {"variants": "?"})
        == "chosen: onnxruntime fp32 · measured here at batch 1: 2× the reference (onnxruntime fp32)"
    )


def test_a_batch_whose_inputs_cannot_fit_is_refused_before_anything_loads() -> None:
    import psutil

    from kiln.memory import check_batch_memory
    from kiln.spec import ModelSpec

    spec = ModelSpec.model_validate(
        {"name": "m", "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3, 224, 224]}],
         "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 10]}]}
    )  # fmt: skip
    check_batch_memory(spec, 16, "bench option", "batch_sizes")  # 9.6 MB: fits anywhere
    row = 3 * 224 * 224 * 4
    too_many = psutil.virtual_memory().total // row + 1  # its inputs alone are more than the machine holds
    with pytest.raises(SpecError, match=rf"batch_sizes: batch {too_many} needs about .* GiB .* \(x: "):
        check_batch_memory(spec, too_many, "bench option", "batch_sizes")
