from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path
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
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))["variants"][0]["first_run_ms"] is None


def test_progress_has_a_total_and_reaches_it(linear_repo: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    bench(linear_repo, "linear", BenchConfig(**FAST), progress=lambda *a: calls.append(a))
    # 1 variant × 2 batch sizes + 2 scenarios × 1 variant
    assert {total for _, _, total in calls} == {4}
    assert [done for _, done, _ in calls] == sorted(done for _, done, _ in calls)
    assert calls[-1][1:] == (4, 4)
    assert [what for what, _, _ in calls if "batch" in what] == ["reference · batch 1", "reference · batch 4"]


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
    # Copies of the reference as variants: the same file on the same engine. In a fresh process (no
    # runtime started yet) the first variant measured must not pay the engine's start-up: unprimed it
    # showed ~15 MB and 2-10x the load time of the copies measured after it.
    _, vdir = kiln.Repository(linear_repo).resolve("linear")
    for name in ("copy1", "copy2"):
        (vdir / VARIANTS_DIR / name).mkdir(parents=True)
        shutil.copy(vdir / "model.onnx", vdir / VARIANTS_DIR / name / "model.onnx")
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
    data = json.loads(a.read_text())
    assert [b["batch"] for b in data["variants"][0]["batches"]] == [1, 2]
    assert (data["variants"][0]["params"], data["variants"][0]["macs"]) == (15, 12)
    assert html_path.is_file()
    assert "<th>params</th><th>MACs</th>" in html_path.read_text() and "<td>15</td><td>12</td>" in html_path.read_text()
    assert {p.name for p in (tmp_path / "report_plots").iterdir()} == {
        "latency_vs_batch.png", "throughput_vs_batch.png", "latency_distribution.png"}  # fmt: skip

    # The same file against itself: no regression, exit 0, in both spellings. A slowed-down copy: exit 1.
    assert run_cli(["bench", "--compare", str(a), "--compare", str(a)], capsys)[0] == 0
    code, out = run_cli(["bench", "--compare", str(a), str(a)], capsys)
    assert code == 0 and "p99 ms" in out and "peak memory MB" in out and "load s" in out, out
    slow = json.loads(a.read_text())
    for b in slow["variants"][0]["batches"]:
        b["latency"]["p50_ms"] *= 2
        b["items_per_s"] /= 2
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
    data = json.loads(out_json.read_text())
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
    data = json.loads(first.read_text())
    argv = shlex.split(data["command"])
    assert argv[:3] == ["kiln", "bench", "linear"] and "#" not in data["command"]
    code, out = run_cli([*argv[1:], "--json", str(again)], capsys)
    assert code == 0, out
    redo = json.loads(again.read_text())
    assert redo["config"] == data["config"] and redo["command"] == data["command"]
    assert (redo["repo"], redo["version"]) == (data["repo"], 1)


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
    data = json.loads(out_json.read_text())
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
            images = page.evaluate(
                "Array.from(document.images).map(i => [i.alt, i.complete ? i.naturalWidth : 0, i.naturalHeight])"
            )
            title = page.title()
            reproduce = page.locator("code").last.inner_text()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert {alt for alt, _, _ in images} == plots, images
    assert all(w > 100 and h > 100 for _, w, h in images), images
    assert title == "kiln bench · digits"
    assert errors == []
    assert reproduce == data["command"] and "--repo" in reproduce
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
