from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import kiln
from kiln.bench import loadgen, report, runner
from kiln.bench.config import BenchConfig
from kiln.bench.runner import bench
from kiln.cli import main
from kiln.errors import LoadTargetError
from kiln.memory import KernelPeak
from kiln.repository import RECIPE_FILE, VARIANTS_DIR
from tests.fixtures import onnx_models, v2_server

FAST = {"batch_sizes": [1, 4], "min_time_s": 0.05, "min_iters": 5, "repeats": 2, "variants": ["reference"]}


@pytest.fixture
def linear_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    kiln.import_model(onnx_models.save(onnx_models.linear_model(), tmp_path / "linear.onnx"), repo)
    return repo


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out + err


def test_bench_measures_every_batch_size(linear_repo: Path) -> None:
    result = bench(linear_repo, "linear", BenchConfig(**FAST))
    assert not result.interrupted
    (variant,) = result.variants
    assert (variant.variant, variant.engine, variant.precision) == ("reference", "onnxruntime", "fp32")
    assert [b.batch for b in variant.batches] == [1, 4]
    for b in variant.batches:
        assert b.latency.count >= 2 * 5
        assert 0 < b.latency.min_ms <= b.latency.p50_ms <= b.latency.p99_ms <= b.latency.max_ms
        assert b.items_per_s > 0 and len(b.repeat_p50_ms) == 2
    assert variant.size_bytes == (linear_repo / "linear" / "1" / "model.onnx").stat().st_size
    assert variant.load_s > 0 and variant.peak_memory_bytes >= 0
    assert (variant.params, variant.macs) == (4 * 3 + 3, 4 * 3)  # counted for the reference (it has no figures)
    names = {s.scenario for s in result.scenarios}
    assert names == {"single-stream", "offline"}
    offline = next(s for s in result.scenarios if s.scenario == "offline")
    assert offline.metrics["items_per_s"] == max(b.items_per_s for b in variant.batches)
    assert "CPUExecutionProvider" in result.machine["onnxruntime_providers"]


def test_ctrl_c_keeps_what_was_measured(linear_repo: Path, tmp_path: Path) -> None:
    seen: list[str] = []

    def progress(msg: str, done: int, total: int) -> None:
        seen.append(msg)
        if "batch 4" in msg:
            raise KeyboardInterrupt

    result = bench(linear_repo, "linear", BenchConfig(**FAST), progress=progress)
    assert result.interrupted
    assert [b.batch for b in result.variants[0].batches] == [1]
    assert any("interrupted" in w for w in result.warnings)
    # Nothing measured is NaN in the JSON: missing figures are null, and the file is strict JSON.
    result.variants[0].first_run_ms = float("nan")
    path = tmp_path / "partial.json"
    report.write_json(result, path)
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))["variants"][0]["first_run_ms"] is None


def test_progress_has_a_total_and_reaches_it(linear_repo: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    bench(linear_repo, "linear", BenchConfig(**FAST), progress=lambda *a: calls.append(a))
    # 1 variant × 2 batch sizes × 2 repeats + 2 scenarios × 1 variant; the repeats take turns
    assert {total for _, _, total in calls} == {6}
    assert [done for _, done, _ in calls] == sorted(done for _, done, _ in calls)
    assert calls[-1][1:] == (6, 6)
    assert [what for what, _, _ in calls if "batch" in what] == [
        "reference · batch 1 · 1/2", "reference · batch 4 · 1/2", "reference · batch 1 · 2/2", "reference · batch 4 · 2/2"]  # fmt: skip


def test_kiln_bench_and_optimize_are_plain_functions(linear_repo: Path) -> None:
    import inspect

    from kiln.optimize import search  # importing a submodule later does not rebind kiln.optimize

    assert inspect.isfunction(kiln.bench) and inspect.isfunction(kiln.optimize)
    assert inspect.signature(kiln.bench) == inspect.signature(bench)
    assert inspect.signature(kiln.optimize) == inspect.signature(search.optimize)
    result = kiln.bench(linear_repo, "linear", BenchConfig(**FAST), batch_sizes=[2], scenarios=["offline"])
    assert [b.batch for b in result.variants[0].batches] == [2]
    assert [s.scenario for s in result.scenarios] == ["offline"]
    assert kiln.BenchConfig is BenchConfig
    from kiln.serving import serve

    assert kiln.serve is serve
    assert {"bench", "BenchConfig", "serve"} <= set(kiln.__all__)


def test_host_memory_comes_from_the_kernel_without_a_sampler_thread(linear_repo: Path) -> None:
    threads_while_timing: set[str] = set()

    def progress(msg: str, done: int, total: int) -> None:
        threads_while_timing.update(t.name for t in threading.enumerate())

    result = bench(linear_repo, "linear", BenchConfig(**FAST), progress=progress)
    if not KernelPeak.available():
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert result.variants[0].memory_kind == "vmhwm-delta"
    assert "kiln-peak-memory" not in threads_while_timing


def test_memory_falls_back_to_the_sampler(linear_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(KernelPeak, "available", classmethod(lambda cls: False))
    result = bench(linear_repo, "linear", BenchConfig(**{**FAST, "batch_sizes": [1]}))
    assert result.variants[0].memory_kind == "rss-sampled-delta"
    assert not [t for t in threading.enumerate() if t.name == "kiln-peak-memory"]


_MEASURE_COPIES = """
import json, sys
from kiln.bench.config import BenchConfig
from kiln.bench.runner import bench
config = BenchConfig(variants=["reference", "copy1", "copy2"], batch_sizes=[1], min_time_s=0.02, min_iters=3,
                     repeats=1, scenarios=[], threads=1)
result = bench(sys.argv[1], "linear", config)
print(json.dumps([[v.load_s, v.peak_memory_bytes] for v in result.variants]))
"""


@pytest.mark.slow
def test_the_same_artifact_measured_again_costs_the_same(linear_repo: Path) -> None:
    # Copies of the reference as variants: the same graph on the same engine (each with its own doc
    # string, or the bench would measure them once as one artifact). In a fresh process (no runtime
    # started yet) the first variant measured must not pay the engine's start-up: unprimed it showed
    # ~15 MB and 2-10x the load time of the copies measured after it.
    import onnx

    _, vdir = kiln.Repository(linear_repo).resolve("linear")
    for name in ("copy1", "copy2"):
        (vdir / VARIANTS_DIR / name).mkdir(parents=True)
        copy = onnx.load(vdir / "model.onnx")
        copy.doc_string = name
        onnx.save(copy, vdir / VARIANTS_DIR / name / "model.onnx")
        (vdir / VARIANTS_DIR / name / RECIPE_FILE).write_text(json.dumps({"engine": "onnxruntime"}))
    runs = []
    for _ in range(2):  # the shortest of two runs per position: one load can stall on a shared machine
        out = subprocess.run([sys.executable, "-c", _MEASURE_COPIES, str(linear_repo)], capture_output=True,
                             text=True, timeout=120, check=True, env={**os.environ, "KILN_NUM_THREADS": "1"})  # fmt: skip
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for (_, first), *rest in runs:
        assert all(abs(first - mem) <= 1_000_000 for _, mem in rest), runs
    first_load, *other_loads = (min(r[i][0] for r in runs) for i in range(3))
    assert first_load <= 3 * max(other_loads) + 0.005, runs


def test_cli_writes_json_and_html_and_compares(
    linear_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, html_path = tmp_path / "a.json", tmp_path / "report.html"
    code, out = run_cli(["bench", "linear", "--repo", str(linear_repo), "--batch-sizes", "1,2", "--min-time", "0.05",
                         "--repeats", "1", "--json", str(a), "--report", str(html_path)], capsys)  # fmt: skip
    assert code == 0, out
    assert "in-process latency and throughput" in out
    data = json.loads(a.read_text(encoding="utf-8"))
    assert [b["batch"] for b in data["variants"][0]["batches"]] == [1, 2]
    assert (data["variants"][0]["params"], data["variants"][0]["macs"]) == (15, 12)
    assert html_path.is_file()
    assert "<th>params</th><th>MACs</th>" in html_path.read_text(
        encoding="utf-8"
    ) and "<td>15</td><td>12</td>" in html_path.read_text(encoding="utf-8")
    assert {p.name for p in (tmp_path / "report_plots").iterdir()} == {
        "latency_vs_batch.png", "throughput_vs_batch.png", "latency_distribution.png"}  # fmt: skip

    # The same file against itself: no regression, exit 0, in both spellings. A slowed-down copy: exit 1.
    assert run_cli(["bench", "--compare", str(a), "--compare", str(a)], capsys)[0] == 0
    code, out = run_cli(["bench", "--compare", str(a), str(a)], capsys)
    assert code == 0 and "p99 ms" in out and "peak memory MB" in out and "load s" in out, out
    slow = json.loads(a.read_text(encoding="utf-8"))
    for b in slow["variants"][0]["batches"]:  # 4x: a few µs a call is within compare.LATENCY_FLOOR_MS
        b["latency"]["p50_ms"] *= 4
        b["items_per_s"] /= 4
    b_path = tmp_path / "b.json"
    b_path.write_text(json.dumps(slow))
    code, out = run_cli(["bench", "--compare", str(a), str(b_path), "--threshold", "0.2"], capsys)
    assert code == 1 and "regression" in out
    # A run that lost a batch size cannot pass the gate: exit 2, naming what is missing.
    del slow["variants"][0]["batches"][1]
    b_path.write_text(json.dumps(slow))
    code, out = run_cli(["bench", "--compare", str(a), str(b_path)], capsys)
    assert code == 2 and "reference · batch 2 p50 ms" in out
    code, out = run_cli(["bench", "--compare", str(a)], capsys)
    assert code == 2 and "exactly two JSON files" in out


def test_cli_adds_the_server_scenario_for_qps(
    linear_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "server.json"
    code, out = run_cli(["bench", "linear", "--repo", str(linear_repo), "--batch-sizes", "1", "--min-time", "0.05",
                         "--repeats", "1", "--qps", "50", "--seconds", "0.3", "--json", str(out_json)], capsys)  # fmt: skip
    assert code == 0, out
    assert "running single-stream, offline and server" in out
    data = json.loads(out_json.read_text(encoding="utf-8"))
    (server,) = [s for s in data["scenarios"] if s["scenario"] == "server"]
    assert server["params"]["qps"] == 50 and server["metrics"]["sent"] == 15
    code, out = run_cli(["bench", "linear", "--repo", str(linear_repo), "--scenario", "offline", "--find-max-qps"],
                        capsys)  # fmt: skip
    assert code == 2 and "add 'server' to the scenarios" in out


def test_cli_refuses_cuda_it_cannot_use_before_running(
    linear_repo: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("nothing may load before the device check")

    monkeypatch.setattr(runner, "open_variant", no_load)
    code, out = run_cli(["bench", "linear", "--repo", str(linear_repo), "--device", "cuda"], capsys)
    assert code == 2, out
    assert "Traceback" not in out and "--device cuda" in out and "--device cpu" in out


def test_the_reproduce_command_measures_the_same_thing(
    linear_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, again = tmp_path / "first.json", tmp_path / "again.json"
    code, out = run_cli(["bench", "linear", "--repo", str(linear_repo), "--version", "1", "--variants", "reference",
                         "--batch-sizes", "1,3", "--scenario", "offline", "--min-time", "0.04", "--repeats", "2",
                         "--threads", "1", "--device", "cpu", "--json", str(first)], capsys)  # fmt: skip
    assert code == 0, out
    data = json.loads(first.read_text(encoding="utf-8"))
    argv = shlex.split(data["command"])
    assert argv[:3] == ["kiln", "bench", "linear"] and "#" not in data["command"]
    code, out = run_cli([*argv[1:], "--json", str(again)], capsys)
    assert code == 0, out
    redo = json.loads(again.read_text(encoding="utf-8"))
    assert redo["config"] == data["config"] and redo["command"] == data["command"]
    assert (redo["repo"], redo["version"]) == (data["repo"], 1)


def _copy_of_reference(repo: Path, name: str) -> None:
    """A variant that runs the reference's very file on the same engine (what an unchanged ORT fp32 is)."""
    _, vdir = kiln.Repository(repo).resolve("linear")
    (vdir / VARIANTS_DIR / name).mkdir(parents=True)
    shutil.copy(vdir / "model.onnx", vdir / VARIANTS_DIR / name / "model.onnx")
    (vdir / VARIANTS_DIR / name / RECIPE_FILE).write_text(json.dumps({"engine": "onnxruntime", "label": "ort copy"}))


def test_the_same_artifact_under_two_names_is_measured_once(linear_repo: Path, tmp_path: Path) -> None:
    # Timed twice, one file differed by 44 % between its two names: the machine's noise, not the variants.
    _copy_of_reference(linear_repo, "ort-fp32-copy")
    repository = kiln.Repository(linear_repo)
    repository.save_spec(repository.spec("linear").model_copy(update={"chosen_variant": "ort-fp32-copy"}))
    calls: list[tuple[str, int, int]] = []
    result = bench(linear_repo, "linear", BenchConfig(**{**FAST, "variants": ["reference", "chosen"]}),
                   progress=lambda *a: calls.append(a))  # fmt: skip
    assert [(v.variant, v.same_as, v.label) for v in result.variants] == [
        ("reference", "", "onnxruntime fp32"), ("ort-fp32-copy", "reference", "ort copy")]  # fmt: skip
    reference, copy = result.variants
    assert copy.batches == reference.batches and result.chosen == "ort-fp32-copy"
    assert not [what for what, _, _ in calls if what.startswith("ort-fp32-copy")]
    assert calls[-1][1:] == (2 * 2 + 2, 2 * 2 + 2)  # one variant's steps
    assert [(s.scenario, s.variant) for s in result.scenarios] == [
        ("single-stream", "reference"), ("single-stream", "ort-fp32-copy"), ("offline", "reference"),
        ("offline", "ort-fp32-copy")]  # fmt: skip
    page = tmp_path / "same.html"
    report.write_html(result, page)
    text = page.read_text(encoding="utf-8")
    assert "ort-fp32-copy (chosen) = reference" in text and "measured once, shown under both names" in text
    assert "chosen: ort copy · here the chosen variant is the reference&#x27;s artifact (measured once)" in text


def test_the_time_budget_stops_starting_measurements(linear_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]  # the bench's clock: it jumps past the budget while the first batch size is timed
    monkeypatch.setattr(runner, "time", SimpleNamespace(monotonic=lambda: clock[0], perf_counter=time.perf_counter))

    def progress(what: str, done: int, total: int) -> None:
        if what == "reference · batch 1 · 1/2":
            clock[0] = 61.0

    result = bench(linear_repo, "linear", BenchConfig(**FAST, time_budget_s=60), progress=progress)
    assert not result.interrupted
    assert [(b.batch, len(b.repeat_p50_ms)) for b in result.variants[0].batches] == [(1, 1)]
    assert result.skipped == ["reference: batch 4 repeat 1/2", "reference: batch 1 repeat 2/2",
                              "reference: batch 4 repeat 2/2", "reference: single-stream scenario",
                              "reference: offline scenario"]  # fmt: skip
    assert result.warnings[-1].startswith(
        "--time-budget 60 s reached after 61 s: started no new measurement, skipped 5:"
    )
    assert "--time-budget 60" in result.command


def test_two_identical_runs_compare_clean(
    linear_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Back to back on a shared machine, the same model measured twice reported 11 regressions: the gate
    # must allow for the spread each run measured of its own repeats. (That a real 2x is still flagged
    # is checked on synthetic figures in tests/unit/test_bench_logic.py, where the noise is known.)
    files = [tmp_path / "first.json", tmp_path / "second.json"]
    for path in files:
        code, out = run_cli(["bench", "linear", "--repo", str(linear_repo), "--batch-sizes", "1,8", "--min-time", "0.5",
                             "--repeats", "5", "--threads", "1", "--json", str(path)], capsys)  # fmt: skip
        assert code == 0, out
        assert "≈" not in out  # a short run is not announced
    code, out = run_cli(["bench", "--compare", *map(str, files)], capsys)
    assert code == 0, out
    for path in files:
        for b in json.loads(path.read_text(encoding="utf-8"))["variants"][0]["batches"]:
            assert set(b["spread"]) == {"p50_ms", "p90_ms", "p99_ms", "items_per_s"} and len(b["repeat_p99_ms"]) == 5, b


def test_cli_announces_a_long_run_and_keeps_to_its_budget(
    linear_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 6 batch sizes × 1 s, a load and 9 server trials of 3 s: long enough to say so before starting.
    code, out = run_cli(["bench", "linear", "--repo", str(linear_repo), "--find-max-qps", "--time-budget", "0.001"],
                        capsys)  # fmt: skip
    assert code == 0, out
    assert (
        "≈ 34 s for 1 variant × 6 batch sizes, then the server scenario on each; capped at 0.001 s by --time-budget"
        in out
    )
    assert "--time-budget 0.001 s reached" in out and "reference: not loaded" in out


def test_cli_bench_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(
        ["bench", "--compare", str(tmp_path / "nope.json"), "--compare", str(tmp_path / "x.json")], capsys
    )
    assert code == 2 and "nope.json: file not found" in out
    code, out = run_cli(["bench", "m", "--repo", str(tmp_path), "--batch-sizes", "1,zero"], capsys)
    assert code == 2 and "comma-separated" in out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def digits_repo(digits_trained: Any, tmp_path: Path) -> Path:
    """The digits CNN imported and optimized with the quick preset, so the report has optimizer figures."""
    from kiln.zoo import digits

    repo = tmp_path / "repo"
    kiln.import_model(digits.FACTORY, repo, name="digits", weights=digits_trained.weights,
                      input_shapes=[digits.INPUT_SHAPE], task="classification")  # fmt: skip
    kiln.optimize(repo, "digits", preset="quick")
    return repo


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_html_report_renders_its_plots_in_a_browser(
    digits_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from playwright.sync_api import sync_playwright

    out_json, page_path = tmp_path / "digits.json", tmp_path / "report.html"
    code, out = run_cli(["bench", "digits", "--repo", str(digits_repo), "--batch-sizes", "1,8", "--min-time", "0.05",
                         "--repeats", "1", "--json", str(out_json), "--report", str(page_path)], capsys)  # fmt: skip
    assert code == 0, out
    assert "digits v1: in-process latency and throughput" in out and f"wrote {page_path}" in out
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert [v["variant"] for v in data["variants"]] == ["reference", data["variants"][1]["variant"]]
    plots = {"latency_vs_batch", "throughput_vs_batch", "latency_distribution", "accuracy_pareto"}
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1400})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.as_uri())
            images = page.evaluate("Array.from(document.images).map(i => "
                                   "[i.dataset.plot, i.alt, i.complete ? i.naturalWidth : 0, i.naturalHeight])")  # fmt: skip
            title = page.title()
            headline = page.locator("#headline").inner_text()
            headline_top = page.locator("#headline").bounding_box()
            captions = page.locator("figcaption").count()
            pareto_rows = (
                page.locator("h2:has-text('What kiln optimize chose from') ~ table").first.locator("tr").count()
            )
            reproduce = page.locator("code").last.inner_text()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert {name for name, _, _, _ in images} == plots, images
    assert all(w > 100 and h > 100 for _, _, w, h in images), images
    assert title == "kiln bench · digits"
    assert errors == []
    assert reproduce == data["command"] and "--repo" in reproduce
    # The headline first: what was chosen and how much faster than torch eager and plain ORT fp32.
    assert headline.startswith("chosen: ") and "× torch eager" in headline and "× ONNX Runtime fp32" in headline, (
        headline
    )
    assert "top-1 " in headline and "measured here at batch 1:" in headline, headline
    assert headline_top is not None and headline_top["y"] < 150
    # Every axis has labelled ticks (read from each plot's alt text), log axes several; no caption repeats a title.
    ticks = {name: dict(re.findall(r"(x|y): .*?, ticks (.*?)(?=; [xy]: |$)", alt)) for name, alt, _, _ in images}
    assert all(len(axes) == 2 and "none" not in axes.values() for axes in ticks.values()), ticks
    assert len(ticks["latency_vs_batch"]["y"].split(", ")) >= 3 and ticks["latency_vs_batch"]["x"] == "1, 8", ticks
    assert len(ticks["accuracy_pareto"]["x"].split(", ")) >= 3, ticks
    assert captions == 0
    assert pareto_rows == 1 + len(report.pareto_points(digits_repo, "digits", 1))  # the plot's points, all named
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_load_generator_agrees_with_the_server_count() -> None:
    with v2_server.running() as (url, counts):
        closed = loadgen.apply_load(url, "m", concurrency=4, requests=120, seconds=20)
        assert closed.sent == closed.succeeded == 120 and not closed.errors
        assert counts.infer == 120 and counts.binary == 120
        opened = loadgen.apply_load(url, "m", qps=100, requests=50, seconds=5, binary=False)
        assert opened.sent == opened.succeeded == 50
        assert counts.infer == 170 and counts.binary == 120
    assert closed.latency["p50_ms"] > 0 and closed.throughput > 0


def test_load_generator_stays_on_loopback() -> None:
    with pytest.raises(LoadTargetError, match="not a loopback address"):
        loadgen.parse_target("http://10.1.2.3:8000")
    assert loadgen.parse_target("grpc://127.0.0.1:9001").protocol == "grpc"
    with pytest.raises(LoadTargetError, match="scheme"):
        loadgen.parse_target("ftp://127.0.0.1")


def test_report_tables_render(linear_repo: Path) -> None:
    from rich.console import Console

    result = bench(linear_repo, "linear", BenchConfig(**FAST))
    console = Console(record=True, width=160)
    console.print(report.bench_table(result))
    console.print(report.variant_table(result))
    text = console.export_text()
    assert "reference" in text and "onnxruntime fp32" in text and np.isfinite(result.variants[0].first_run_ms)
