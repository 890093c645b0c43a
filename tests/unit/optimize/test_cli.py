"""`kiln optimize`: a thin command that prints the table, and one red line for user errors."""

from __future__ import annotations

import json

import pytest

from kiln.cli import main
from tests.unit.optimize.conftest import Imported


@pytest.mark.slow
def test_optimize_command_prints_the_table_and_the_choice(mlp: Imported, capsys: pytest.CaptureFixture[str]) -> None:
    main(["optimize", mlp.name, "--repo", str(mlp.repo), "--data", str(mlp.data), "--engine", "onnxruntime",
          "--no-compile", "--min-time", "0.02", "--no-choose"])  # fmt: skip
    out = capsys.readouterr().out
    assert "★" in out and "chosen:" in out and "onnxruntime fp32" in out
    main(["optimize", mlp.name, "--repo", str(mlp.repo), "--data", str(mlp.data), "--engine", "onnxruntime",
          "--no-compile", "--min-time", "0.02", "--no-choose", "--json"])  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["built"] == 0 and result["chosen"] in {v["id"] for v in result["variants"]}


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--preset", "fastest"], "unknown preset"), (["--data", "missing.npz"], "file not found"),
     (["--int8", "int4"], "int8")],
)  # fmt: skip
def test_user_errors_are_one_red_line(
    mlp: Imported, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["optimize", mlp.name, "--repo", str(mlp.repo), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
