"""`kiln import` options for other frameworks: --trust-pickle, --dynamic-axis, --processing."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from kiln.cli import parse_dynamic_axis
from kiln.errors import SpecError
from tests.integration.test_cli import assert_one_line_error, run


@pytest.fixture
def iris_pickle(tmp_path: Path) -> Path:
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    x, y = load_iris(return_X_y=True)
    path = tmp_path / "tree.pkl"
    path.write_bytes(pickle.dumps(DecisionTreeClassifier(max_depth=3, random_state=0).fit(x, y)))
    return path


def test_a_pickle_is_refused_without_trust_pickle(
    iris_pickle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = str(tmp_path / "repo")
    code, _, err = run(["import", str(iris_pickle), "--repo", repo], capsys)
    assert_one_line_error(code, err, "tree.pkl", "runs any code", "--trust-pickle")
    code, out, _ = run(["import", str(iris_pickle), "--repo", repo, "--trust-pickle"], capsys)
    assert code == 0 and "tree version 1" in out and "skl2onnx" in out


def test_dynamic_axis_and_processing_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = str(tmp_path / "repo")
    processing = tmp_path / "processing.yaml"
    processing.write_text("postprocess:\n  - op: l2_normalize\n    args: {output: output_1}\n")
    code, _, err = run(
        ["import", "tests.fixtures.tiny_models:seq_pool", "--repo", repo, "--input-shape", "1,5", "--input-shape",
         "1,5", "--input-dtype", "int64", "--input-dtype", "int64", "--dynamic-axis", "ids:1:seq",
         "--dynamic-axis", "mask:1:seq", "--processing", str(processing)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    code, out, _ = run(["list", "--repo", repo], capsys)
    assert "ids:int64[-1, -1]" in out and "mask:int64[-1, -1]" in out
    spec_text = (tmp_path / "repo" / "seq_pool" / "model.yaml").read_text()
    assert "op: l2_normalize" in spec_text


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--dynamic-axis", "ids"], ("--dynamic-axis", "INPUT:AXIS[:NAME]")),
        (["--processing", "nope.yaml"], ("--processing", "file not found")),
    ],
)
def test_bad_interop_options_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], fragments: tuple[str, ...]
) -> None:
    argv = ["import", "tests.fixtures.tiny_models:seq_pool", "--repo", str(tmp_path), "--input-shape", "1,5", *extra]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, *fragments)


def test_unknown_processing_op_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    processing = tmp_path / "p.yaml"
    processing.write_text("preprocess:\n  - op: decode_tiff\n")
    code, _, err = run(
        ["import", "tests.fixtures.tiny_models:mlp", "--repo", str(tmp_path / "r"), "--input-shape", "1,4",
         "--processing", str(processing)],
        capsys,
    )  # fmt: skip
    assert_one_line_error(code, err, "unknown processing op 'decode_tiff'", "decode_image")


def test_parse_dynamic_axis() -> None:
    assert parse_dynamic_axis("ids:1:seq") == ("ids", 1, "seq")
    assert parse_dynamic_axis("image:2") == ("image", 2, "image_2")
    with pytest.raises(SpecError):
        parse_dynamic_axis("image:x")
