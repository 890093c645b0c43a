"""The CLI as a user meets it: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import re
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


# ---- the first hour (issue 16): the commonest mistakes, each one line and exit 2 ------------------------
def test_wrong_input_shape_names_the_shape_and_the_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    code, _, err = run(
        ["import", "tests.fixtures.tiny_models:mlp", "--input-shape", "1,5", "--repo", str(repo)], capsys
    )
    assert_one_line_error(code, err, "--input-shape 1,5", "fc1 (Linear) takes 4 features", "--input-shape 1,4")
    assert not repo.exists()  # a failed import leaves no empty model folder, nor a repository


def test_forgotten_batch_dim_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["import", "tests.fixtures.tiny_models:tiny_classifier", "--input-shape", "3,8,8", "--repo", str(tmp_path)]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "conv (Conv2d) takes [N, 3, H, W]", "batch dim", "--input-shape 1,3,8,8")


def test_weights_that_do_not_fit_list_the_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 8)).state_dict(), tmp_path / "other.pt")
    argv = ["import", "tests.fixtures.tiny_models:mlp", "--input-shape", "1,4", "--weights", str(tmp_path / "other.pt"),
            "--repo", str(tmp_path / "repo")]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "4 missing key(s) (fc1.weight, fc1.bias, fc2.weight and 1 more)",
                          "2 unexpected key(s) (0.weight, 0.bias)")  # fmt: skip


def test_factory_beside_the_user_but_not_on_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynet_first_hour.py").write_text("from torch import nn\n\ndef build():\n    return nn.Linear(4, 2)\n")
    argv = ["import", "mynet_first_hour:build", "--input-shape", "1,4", "--repo", "repo"]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "current folder", "mynet_first_hour.py", "'mynet_first_hour.py:build'",
                          "PYTHONPATH=.")  # fmt: skip


def test_factory_whose_own_import_fails_names_that_import(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "badnet_first_hour.py").write_text("import no_such_dependency_xyz\n")
    argv = ["import", "badnet_first_hour:build", "--input-shape", "1,4", "--repo", str(tmp_path / "repo")]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "badnet_first_hour.py imports 'no_such_dependency_xyz', which is not installed")


@pytest.mark.parametrize(
    ("extra", "steps", "fragments"),
    [
        (["--task", "ranking"], None, ("task: must be 'classification', 'embedding'", "not 'ranking'")),
        (["--input-dtype", "float99"], None, ("input_dtypes[0]: must be 'float32'", "not 'float99'")),
        (["--opset", "3"], None, ("opset: must be >= 7, not 3",)),
        ([], "preprocess: [{op: resize, args: {size: 8, bogus: 1}}]\n",
         ("argument bogus: is not accepted; the valid ones are size, interpolation",)),
        ([], "preprocess: [{op: resizze, args: {size: 8}}]\n", ("unknown processing op 'resizze'", "'resize'")),
    ],
)  # fmt: skip
def test_option_errors_are_in_kilns_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], steps: str | None, fragments: tuple[str, ...]
) -> None:
    argv = ["import", "tests.fixtures.tiny_models:mlp", "--input-shape", "1,4", "--repo", str(tmp_path / "r"), *extra]
    if steps is not None:
        (tmp_path / "steps.yaml").write_text(steps)
        argv += ["--processing", str(tmp_path / "steps.yaml")]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, *fragments)
    assert "Input should" not in err and "Extra inputs" not in err and "Value error" not in err


def test_errors_name_no_staging_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.convert import onnx_io
    from kiln.errors import CorruptModelError

    def failing(path: Path) -> None:
        raise CorruptModelError(str(path), "shape inference failed: a test")

    monkeypatch.setattr(onnx_io, "infer_shapes", failing)
    repo = tmp_path / "repo"
    code, _, err = run(
        ["import", "tests.fixtures.tiny_models:mlp", "--input-shape", "1,4", "--repo", str(repo)], capsys
    )
    assert_one_line_error(code, err, f"{repo}/mlp/<new version>/model.onnx is not a valid model")
    assert ".staging-" not in err and not repo.exists()


def test_a_file_that_is_no_image_is_named_not_its_buffer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo, steps = str(tmp_path / "repo"), tmp_path / "steps.yaml"
    steps.write_text("preprocess: [{op: decode_image}, {op: resize, args: {size: 8}}, {op: hwc_to_chw},"
                     " {op: to_dtype, args: {dtype: float32}}]\n")  # fmt: skip
    argv = ["import", "tests.fixtures.tiny_models:tiny_classifier", "--input-shape", "1,3,8,8", "--processing",
            str(steps), "--repo", repo]  # fmt: skip
    assert run(argv, capsys)[0] == 0
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    code, out, err = run(["predict", "tiny_classifier", str(tmp_path / "bad.png"), "--repo", repo], capsys)
    assert code == 1  # a bad file is skipped and reported, the run goes on
    assert "bad.png" in err and "Pillow recognises no image format" in err and "BytesIO" not in out + err


def test_list_of_no_repository_and_of_an_empty_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["list", "--repo", str(tmp_path / "nowhere")], capsys)
    assert_one_line_error(code, err, f"repository {tmp_path / 'nowhere'} does not exist", "kiln import")
    assert out == ""
    (tmp_path / "empty").mkdir()
    code, out, _ = run(["list", "--repo", str(tmp_path / "empty")], capsys)
    assert code == 0 and "holds no models" in out and "┏" not in out


def test_version_and_readable_help(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln._version import __version__

    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"kiln {__version__}"
    monkeypatch.setenv("COLUMNS", "200")
    for verb in ("import", "serve", "optimize", "bench", "predict"):
        code, out, _ = run([verb, "--help"], capsys)
        assert code == 0, out
        for raw in ("<bool>", "<list[", "{source}", "<str>", "<path>"):
            assert raw not in out, (verb, raw)
    assert "Usage: kiln predict [OPTIONS] MODEL INPUTS..." in run(["predict", "--help"], capsys)[1]
    assert "kiln[ray]" in run(["serve", "--help"], capsys)[1]  # brackets are text, not rich markup


def test_onnx_runtime_log_is_quiet_unless_verbose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime

    levels: list[int] = []
    monkeypatch.setattr(onnxruntime, "set_default_logger_severity", levels.append)
    run(["list", "--repo", str(tmp_path)], capsys)
    assert levels == [4]
    run(["-v", "list", "--repo", str(tmp_path)], capsys)
    assert levels == [4]


def test_serve_logs_text_on_a_terminal_and_json_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln import console
    from kiln.cli_support import log_format

    monkeypatch.setattr(console, "stderr_is_terminal", lambda: False)
    assert log_format("auto") == "json"
    monkeypatch.setattr(console, "stderr_is_terminal", lambda: True)
    assert (log_format("auto"), log_format("json")) == ("text", "json")
    with pytest.raises(SpecError, match="--log-format 'xml': must be text, json or auto"):
        log_format("xml")


def test_ctrl_c_during_optimize_says_what_was_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import kiln
    from kiln.optimize import search

    repo = tmp_path / "repo"
    kiln.import_model(onnx_models.save(onnx_models.linear_model(), tmp_path / "m.onnx"), repo, name="m")
    real = search.optimize

    def interrupted(*args: object, progress: object = None, **kwargs: object) -> object:
        def hook(what: str, done: int, total: int) -> None:
            if done >= 2:  # the first variant is measured and saved
                raise KeyboardInterrupt

        return real(*args, progress=hook, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(search, "optimize", interrupted)
    argv = ["optimize", "m", "--repo", str(repo), "--preset", "quick", "--engine", "onnxruntime", "--min-time", "0.01"]
    code, _, err = run(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 130 and len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        rf"error: interrupted: [1-9]\d* variant\(s\) measured and kept in {re.escape(str(repo))}/m/1/variants "
        r"\(the next run reuses them\); the choice was not changed",
        lines[0],
    ), lines[0]
    assert kiln.Repository(repo).spec("m").chosen_variant is None


def test_a_failed_variant_is_one_line_in_the_optimize_table() -> None:
    from rich.console import Console

    from kiln.optimize.results import OptimizeResult, VariantResult
    from kiln.optimize.table import result_table, summary_lines

    trace = "RuntimeError: [ONNXRuntimeError] : 1 : FAIL : " + "\n".join(f"frame {i} of a C++ trace" for i in range(15))
    variants = [VariantResult(id="ref", label="onnxruntime fp32", recipe=None, status="chosen"),
                VariantResult(id="bad", label="openvino int8", recipe=None, status="failed", reason=trace)]  # fmt: skip
    result = OptimizeResult("m", 1, "latency", "agreement", "agreement >= 0.99", variants, "ref", "ref", "random")
    con = Console(width=240, record=True)
    con.print(result_table(result))
    rows = [ln for ln in con.export_text().splitlines() if "openvino int8" in ln or "frame" in ln]
    assert len(rows) == 1 and "failed: RuntimeError: [ONNXRuntimeError] : 1 : FAIL" in rows[0], rows
    assert any("1 variant(s) failed" in line and "figures.json" in line for line in summary_lines(result))


def test_unknown_command_and_option_list_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["frobnicate"], capsys)
    assert_one_line_error(code, err, "No such command 'frobnicate'; the commands are import, predict, list")
    code, _, err = run(["list", "--repo", "r", "--bogus"], capsys)
    assert_one_line_error(code, err, "No such option: --bogus; kiln list takes --repo")
