"""The CLI as a user meets it: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.cli import main, parse_shape
from kiln.errors import SpecError
from tests.fixtures import onnx_models


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_import_truncated_onnx_exits_2_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = onnx_models.save(onnx_models.linear_model(), tmp_path / "good.onnx")
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    code, _, err = run(["import", str(bad), "--repo", str(tmp_path / "repo")], capsys)
    assert_one_line_error(code, err, "broken.onnx", "not a valid model")


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["import", "missing.onnx"], ("missing.onnx", "file not found")),
        (["import", "no_such_pkg.models:build", "--input-shape", "1,4"], ("no_such_pkg",)),
        (["import", "tests.fixtures.tiny_models:mlp"], ("--input-shape",)),
        (["import", "tests.fixtures.tiny_models:mlp", "--input-shape", "1,a"], ("--input-shape", "1,a")),
        (["import", "tests.fixtures.tiny_models:mlp", "--input-shape", "1,4", "--task", "ranking"], ("task",)),
        (["import"], ("Missing argument",)),
        (["import", "x.onnx", "--bogus"], ("--bogus",)),
        (["frobnicate"], ("frobnicate",)),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragments: tuple[str, ...]
) -> None:
    if len(argv) > 1 and not argv[1].startswith("-"):
        argv = [*argv, "--repo", str(tmp_path / "repo")]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, *fragments)


def test_input_mismatch_with_existing_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = str(tmp_path / "repo")
    onnx_models.save(onnx_models.linear_model(), tmp_path / "m.onnx")
    assert run(["import", str(tmp_path / "m.onnx"), "--repo", repo], capsys)[0] == 0
    onnx_models.save(onnx_models.linear_model(in_features=6), tmp_path / "m6.onnx")
    code, _, err = run(["import", str(tmp_path / "m6.onnx"), "--repo", repo, "--name", "m"], capsys)
    assert_one_line_error(code, err, "already exists", "another --name")


def test_import_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = str(tmp_path / "repo")
    code, out, _ = run(
        ["import", "tests.fixtures.tiny_models:mlp", "--input-shape", "1x4", "--repo", repo, "--name", "mlp"], capsys
    )
    assert code == 0
    assert "mlp version 1" in out and "parity model.onnx" in out
    code, out, _ = run(["list", "--repo", repo], capsys)
    assert code == 0 and "mlp" in out and "features:float32[-1, 4]" in out


def test_doctor_json_reports_cpu_facts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["doctor", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    cpu = next(d for d in data["devices"] if d["id"] == "cpu")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    assert cpu["bf16"]["supported"] == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert "CPUExecutionProvider" in data["onnxruntime_providers"]
    assert data["versions"]["torch"].startswith("2.13.0")


def test_doctor_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["doctor"], capsys)
    assert code == 0
    assert "Devices and precisions" in out and "bf16" in out and "ONNX Runtime providers" in out


def test_console_script_runs_as_a_process(tmp_path: Path) -> None:
    # The real entry point, as a user runs it: exit code 2 and one line for a user error.
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.run(
        [sys.executable, "-m", "kiln", "import", str(tmp_path / "nope.onnx"), "--repo", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.onnx" in proc.stderr


def test_parse_shape() -> None:
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_shape("1x4") == (1, 4)
    with pytest.raises(SpecError):
        parse_shape("0,3")
