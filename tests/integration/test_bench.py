from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.bench import BenchConfig, bench, loadgen, report
from kiln.bench.loadgen import LoadTargetError
from kiln.cli import main
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
    names = {s.scenario for s in result.scenarios}
    assert names == {"single-stream", "offline"}
    offline = next(s for s in result.scenarios if s.scenario == "offline")
    assert offline.metrics["items_per_s"] == max(b.items_per_s for b in variant.batches)
    assert "CPUExecutionProvider" in result.machine["onnxruntime_providers"]


def test_ctrl_c_keeps_what_was_measured(linear_repo: Path) -> None:
    seen: list[str] = []

    def progress(msg: str) -> None:
        seen.append(msg)
        if "batch 4" in msg:
            raise KeyboardInterrupt

    result = bench(linear_repo, "linear", BenchConfig(**FAST), progress=progress)
    assert result.interrupted
    assert [b.batch for b in result.variants[0].batches] == [1]
    assert any("interrupted" in w for w in result.warnings)


def test_unknown_variant_lists_the_known_ones(linear_repo: Path) -> None:
    with pytest.raises(kiln.KilnError, match=r"no variant 'fast'; available: \['reference'\]"):
        bench(linear_repo, "linear", BenchConfig(**{**FAST, "variants": ["fast"]}))


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
    assert html_path.is_file()
    assert {p.name for p in (tmp_path / "report_plots").iterdir()} == {
        "latency_vs_batch.png", "throughput_vs_batch.png", "latency_distribution.png"}  # fmt: skip

    # The same file against itself: no regression, exit 0. A slowed-down copy: exit 1.
    assert run_cli(["bench", "--compare", str(a), "--compare", str(a)], capsys)[0] == 0
    slow = json.loads(a.read_text())
    for b in slow["variants"][0]["batches"]:
        b["latency"]["p50_ms"] *= 2
        b["items_per_s"] /= 2
    b_path = tmp_path / "b.json"
    b_path.write_text(json.dumps(slow))
    code, out = run_cli(["bench", "--compare", str(a), "--compare", str(b_path), "--threshold", "0.2"], capsys)
    assert code == 1 and "regression" in out


def test_cli_bench_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(
        ["bench", "--compare", str(tmp_path / "nope.json"), "--compare", str(tmp_path / "x.json")], capsys
    )
    assert code == 2 and "nope.json: file not found" in out
    code, out = run_cli(["bench", "m", "--repo", str(tmp_path), "--batch-sizes", "1,zero"], capsys)
    assert code == 2 and "comma-separated" in out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_html_report_renders_its_plots_in_a_browser(linear_repo: Path, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    result = bench(linear_repo, "linear", BenchConfig(**FAST))
    page_path = tmp_path / "report.html"
    written = report.write_html(result, page_path)
    assert len(written) == 3
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
            widths = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
            title = page.title()
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert len(widths) == 3 and all(w > 100 for w in widths)
    assert title == "kiln bench · linear"
    assert errors == []
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_load_generator_agrees_with_the_server_count() -> None:
    with v2_server.running() as (url, counts):
        closed = loadgen.load(url, "m", concurrency=4, requests=120, seconds=20)
        assert closed.sent == closed.succeeded == 120 and not closed.errors
        assert counts.infer == 120 and counts.binary == 120
        opened = loadgen.load(url, "m", qps=100, requests=50, seconds=5, binary=False)
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
