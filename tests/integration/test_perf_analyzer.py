"""Triton's own perf_analyzer against ``kiln serve`` in every mode users run it in: HTTP and gRPC, sync and
async, gRPC streaming and system shared memory, at concurrency 1 and 4. It must exit 0 and write its CSV
(it aborts on inconsistent server statistics and stops at the first failed request).

perf_analyzer is set up by ``../shared/tools/perf_analyzer_setup.sh`` (Triton's PyPI wheel, run through a
private newer glibc) into a cache directory, or taken from ``KILN_PERF_ANALYZER``; where neither works
the tests skip with the reason."""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import kiln
from tests import models
from tests.fixtures import perf_analyzer as pa
from tests.integration.conftest import ServeProcess


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    try:
        return pa.perf_analyzer()
    except pa.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    d = tmp_path_factory.mktemp("pa")
    kiln.import_model(models.add_model(d / "add.onnx"), d / "repo", name="add")
    proc = ServeProcess(d / "repo", log=d / "serve.log")
    try:
        yield proc.wait_ready()
    finally:
        assert proc.terminate() == 0, proc.output()


MODES = pa.MODES


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MODES))
def test_perf_analyzer_completes_and_writes_its_csv(
    perf_analyzer: Path, server: ServeProcess, tmp_path: Path, mode: str
) -> None:
    out = tmp_path / f"{mode}.csv"
    url = server.grpc_url if MODES[mode][1] == "grpc" else server.http_url
    cmd = [
        str(perf_analyzer), "-m", "add", "-u", url, *MODES[mode], "--shape", "x:1,4",
        "--concurrency-range", "1:4:3",  # 1 and 4
        # windows of a fixed request count, and a loose stability rule: this machine's speed drifts
        "--measurement-mode", "count_windows", "--measurement-request-count", "200",
        "--stability-percentage", "100", "--max-trials", "5", "-f", str(out),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{server.output()}"
    rows = list(csv.DictReader(out.open()))
    assert [r["Concurrency"] for r in rows] == ["1", "4"], rows
    assert all(float(r["Inferences/Second"]) > 0 for r in rows)
    assert "Server side statistics" not in run.stdout + run.stderr  # the counts perf_analyzer checks agree
