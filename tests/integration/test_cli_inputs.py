"""What a user types wrong at the CLI and the Python API (an output file that is an input, a folder that
is not there, a repository that is a file, an environment variable kiln cannot use, a thread count of
zero or a hundred thousand) is one line naming it and exit 2, with nothing lost."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.environment import MAX_THREADS, get_settings
from kiln.errors import CorruptModelError, InvalidNameError, SettingError, SpecFieldError
from tests.fixtures import onnx_models
from tests.integration.test_cli import assert_one_line_error, run


@pytest.fixture
def mlp_repo(repo: Path) -> Path:
    kiln.import_model("tests.fixtures.tiny_models:mlp", repo, name="mlp", input_shapes=[(1, 4)])
    return repo


@pytest.fixture
def arrays(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(3):
        path = tmp_path / f"x{i}.npy"
        np.save(path, np.full((1, 4), i, dtype=np.float32))
        paths.append(path)
    return paths


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    """The settings are read once per process: read them again under the test's environment, and again after."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _predict(repo: Path, inputs: list[Path], *extra: str) -> list[str]:
    return ["predict", "mlp", *map(str, inputs), "--repo", str(repo), *extra]


def test_output_that_is_an_input_is_refused_and_the_input_kept(
    mlp_repo: Path, arrays: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    before = arrays[1].read_bytes()
    code, _, err = run(_predict(mlp_repo, arrays, "-o", str(arrays[1])), capsys)
    assert_one_line_error(code, err, str(arrays[1]), "is also an input")
    assert arrays[1].read_bytes() == before


def test_output_written_whole_and_replacing_an_older_file(
    mlp_repo: Path, arrays: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    out.chmod(0o640)
    code, _, _ = run(_predict(mlp_repo, arrays, "-o", str(out)), capsys)
    assert code == 0
    assert [json.loads(line)["input"] for line in out.read_text().splitlines()] == [f"{p}[0]" for p in arrays]
    assert out.stat().st_mode & 0o777 == 0o640  # the file keeps its mode, though it was replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.jsonl")], "a temporary file was left"


@pytest.mark.parametrize(
    ("where", "fragments"),
    [
        ("missing/out.jsonl", ("does not exist", "mkdir -p")),
        ("x0.npy/out.jsonl", ("is not a directory",)),
        (".", ("is a directory",)),
    ],
)
def test_output_that_cannot_be_a_file_is_one_line(
    mlp_repo: Path,
    arrays: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    where: str,
    fragments: tuple[str, ...],
) -> None:
    code, _, err = run(_predict(mlp_repo, arrays, "-o", str(tmp_path / where)), capsys)
    assert_one_line_error(code, err, "--output", *fragments)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_a_full_disk_is_one_line_naming_the_output(
    mlp_repo: Path, arrays: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(_predict(mlp_repo, arrays, "-o", "/dev/full"), capsys)
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # after the progress bar, which ran to the end
    assert last.startswith("error: --output /dev/full: cannot be written (No space left on device)"), err


def test_a_repository_that_is_a_file_or_a_model_folder_taken_by_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = onnx_models.save(onnx_models.linear_model(), tmp_path / "m.onnx")
    not_a_dir = tmp_path / "repo.txt"
    not_a_dir.write_text("a file")
    code, _, err = run(["import", str(model), "--repo", str(not_a_dir)], capsys)
    assert_one_line_error(code, err, str(not_a_dir), "is a file", "--repo")
    assert not_a_dir.read_text() == "a file"

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "m").write_text("in the way")
    code, _, err = run(["import", str(model), "--repo", str(repo), "--name", "m"], capsys)
    assert_one_line_error(code, err, "is a file", "--name")
    assert (repo / "m").read_text() == "in the way"


@pytest.mark.parametrize(
    ("variable", "value", "fragments"),
    [
        ("KILN_NUM_THREADS", "abc", ("KILN_NUM_THREADS", "whole number", "'abc'")),
        ("KILN_NUM_THREADS", "0", ("KILN_NUM_THREADS", f"from 1 to {MAX_THREADS}")),
        ("KILN_NUM_THREADS", "100000", ("KILN_NUM_THREADS", f"from 1 to {MAX_THREADS}")),
    ],
)
@pytest.mark.usefixtures("fresh_settings")
def test_an_environment_variable_kiln_cannot_use_is_one_line_before_any_work(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    fragments: tuple[str, ...],
) -> None:
    monkeypatch.setenv(variable, value)
    code, _, err = run(["list", "--repo", str(tmp_path / "repo")], capsys)
    assert_one_line_error(code, err, *fragments)
    with pytest.raises(SettingError) as info:
        get_settings()
    assert info.value.variable == variable


def test_server_log_level_in_any_case_and_nothing_else() -> None:
    from pydantic import ValidationError

    from kiln.serving.settings import ServerSettings

    assert ServerSettings(repo=".", log_level=" debug").log_level == "DEBUG"
    with pytest.raises(ValidationError, match="log_level"):
        ServerSettings(repo=".", log_level="bogus")  # logging would raise on it once the server started


@pytest.mark.parametrize("flag", [["--threads", "0"], ["--threads", "100000"], ["--threads", "-1"]])
def test_thread_counts_out_of_range_are_refused_before_any_thread_starts(
    mlp_repo: Path, arrays: list[Path], capsys: pytest.CaptureFixture[str], flag: list[str]
) -> None:
    code, _, err = run(_predict(mlp_repo, arrays, *flag), capsys)
    assert_one_line_error(code, err, "--threads")


@pytest.mark.parametrize("threads", [0, -1, MAX_THREADS + 1, True, 2.5, "2"])
def test_load_refuses_thread_counts_that_are_not_counts(mlp_repo: Path, threads: object) -> None:
    with pytest.raises(SpecFieldError, match="threads"):
        kiln.load(mlp_repo, "mlp", threads=threads)  # type: ignore[arg-type]


@pytest.mark.parametrize("batch_sizes", [(0,), (4, -1), (True,)])
def test_load_refuses_batch_sizes_that_are_not_sizes(mlp_repo: Path, batch_sizes: tuple[int, ...]) -> None:
    with pytest.raises(SpecFieldError, match="batch_sizes"):
        kiln.load(mlp_repo, "mlp", batch_sizes=batch_sizes)


@pytest.mark.parametrize("version", [True, 0, -1, "1"])
def test_load_refuses_versions_that_are_not_version_numbers(mlp_repo: Path, version: object) -> None:
    with pytest.raises(InvalidNameError, match="version"):
        kiln.load(mlp_repo, "mlp", version=version)  # type: ignore[arg-type]


def test_a_folder_named_with_superscript_digits_is_no_version(tmp_path: Path, repo: Path) -> None:
    """``str.isdigit`` takes "²" and ``int`` refuses it: such a folder must neither count as a version nor
    stop the next one from being published."""
    model = onnx_models.linear_model()
    kiln.import_model(onnx_models.save(model, tmp_path / "a.onnx"), repo, name="lin")
    (repo / "lin" / "²").mkdir()
    repository = kiln.Repository(repo)
    assert repository.versions("lin") == [1]
    weights = model.graph.initializer[0]
    weights.raw_data = np.zeros(len(weights.raw_data) // 4, dtype=np.float32).tobytes()
    kiln.import_model(onnx_models.save(model, tmp_path / "b.onnx"), repo, name="lin")
    assert repository.versions("lin") == [1, 2]
    with kiln.load(repo, "lin") as predictor:
        assert predictor.version == 2


@pytest.mark.parametrize("damage", [b"{{{ not: [valid", b"\xff\xfe\x00", b"[1, 2]"])
@pytest.mark.parametrize("file", ["m/model.yaml", "m/1/manifest.json"])
def test_a_damaged_file_of_the_repository_is_one_line_naming_it(
    tmp_path: Path, repo: Path, capsys: pytest.CaptureFixture[str], file: str, damage: bytes
) -> None:
    model = onnx_models.save(onnx_models.linear_model(), tmp_path / "m.onnx")
    assert run(["import", str(model), "--repo", str(repo)], capsys)[0] == 0
    (repo / file).write_bytes(damage)
    code, _, err = run(["import", str(model), "--repo", str(repo)], capsys)  # reads both to find the source
    assert_one_line_error(code, err, file)


@pytest.mark.parametrize("damage", [b"{", b"\xff", b'{"engine": 5}'])
def test_a_damaged_variant_recipe_names_the_file(repo: Path, tmp_path: Path, damage: bytes) -> None:
    kiln.import_model(onnx_models.save(onnx_models.linear_model(), tmp_path / "m.onnx"), repo, name="m")
    variant = repo / "m" / "1" / "variants" / "ort-fp32"
    variant.mkdir(parents=True)
    (variant / "recipe.json").write_bytes(damage)
    with pytest.raises(CorruptModelError, match=re.escape("m/1/variants/ort-fp32/recipe.json")):
        kiln.load(repo, "m", variant="ort-fp32")


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--opset", "999"], ("opset", "at most", "999")),
        (["--labels", "labels.txt"], ("--labels", "not UTF-8")),
        (["--labels", "."], ("--labels", "is a directory")),
    ],
)
def test_import_options_a_user_mistypes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, extra: list[str],
    fragments: tuple[str, ...],
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "labels.txt").write_bytes(b"\xff\xfecat\ndog\n")
    model = onnx_models.save(onnx_models.linear_model(), tmp_path / "m.onnx")
    code, _, err = run(["import", str(model), "--repo", str(tmp_path / "repo"), "--task", "classification", *extra],
                       capsys)  # fmt: skip
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "repo" / "m").exists()


def test_labels_with_a_byte_order_mark_are_read_without_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "labels.txt").write_bytes("\ufeffcat\n\ndog\n".encode())
    model = onnx_models.save(onnx_models.linear_model(out_features=2), tmp_path / "m.onnx")
    repo = tmp_path / "repo"
    code, _, err = run(["import", str(model), "--repo", str(repo), "--task", "classification", "--labels",
                        str(tmp_path / "labels.txt")], capsys)  # fmt: skip
    assert code == 0, err
    assert kiln.Repository(repo).spec("m").labels == ["cat", "dog"]


@pytest.mark.parametrize(
    ("flag", "value", "rule"),
    [("--min-sqnr-db", "nan", "finite"), ("--min-sqnr-db", "-5", ">= 0"), ("--max-drop", "nan", "finite")],
)
def test_an_accuracy_budget_that_is_no_bound_is_refused(
    mlp_repo: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, rule: str
) -> None:
    code, _, err = run(["optimize", "mlp", "--repo", str(mlp_repo), flag, value], capsys)
    assert_one_line_error(code, err, flag.lstrip("-").replace("-", "_"), rule)


def test_weights_stored_beside_a_model_are_as_readable_as_the_model(tmp_path: Path) -> None:
    """onnx writes ``model.onnx.data`` 0600: a server running as another user could read the graph and not
    its weights."""
    from kiln.convert.onnx_io import save

    path = tmp_path / "model.onnx"
    save(onnx_models.linear_model(), path, force_external=True)
    data = tmp_path / "model.onnx.data"
    assert data.is_file()
    assert data.stat().st_mode & 0o777 == path.stat().st_mode & 0o777


def test_kilns_own_files_replace_a_planted_link_and_never_write_through_it(tmp_path: Path) -> None:
    from kiln.files import write_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    planted = tmp_path / "model.yaml"
    planted.symlink_to(victim)
    write_atomic(planted, "name: m\n")
    assert victim.read_text() == "keep me"
    assert not planted.is_symlink() and planted.read_text() == "name: m\n"


@pytest.mark.parametrize(("verb", "flag"), [("optimize", "--batch-size"), ("bench", "--batch-sizes")])
def test_a_batch_too_large_for_memory_is_one_line_before_any_work(
    mlp_repo: Path, capsys: pytest.CaptureFixture[str], verb: str, flag: str
) -> None:
    import psutil

    rows = psutil.virtual_memory().total // 16 + 1  # mlp's rows are 4 float32: more than the machine holds
    code, _, err = run([verb, "mlp", "--repo", str(mlp_repo), flag, str(rows)], capsys)
    assert_one_line_error(code, err, f"batch {rows} needs about", "GiB", "use a smaller batch")


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--token", ""], ("--token", "at least 8 characters", "is the variable you pass set?")),
        (["--token", "abc"], ("--token", "at least 8 characters")),
        (["--timeout", "0"], ("--timeout:", "> 0")),
        (["--drain-timeout", "nan"], ("--drain-timeout:",)),
    ],
)
def test_serve_options_are_named_as_typed(
    mlp_repo: Path, capsys: pytest.CaptureFixture[str], extra: list[str], fragments: tuple[str, ...]
) -> None:
    code, _, err = run(["serve", str(mlp_repo), "--http-port", "0", "--grpc-port", "0", *extra], capsys)
    assert_one_line_error(code, err, *fragments)


@pytest.mark.parametrize("name", ["../x", ".hidden", "m/1", "a b", "-rf", "ünï", "a" * 129])
def test_an_import_name_is_held_to_the_repositorys_rule_in_its_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    model = onnx_models.save(onnx_models.linear_model(), tmp_path / "m.onnx")
    code, _, err = run(["import", str(model), "--repo", str(tmp_path / "repo"), "--name", name], capsys)
    assert_one_line_error(code, err, "is not a model name", "1-128 letters")
    repo = tmp_path / "repo"
    assert not (tmp_path / "x").exists() and (not repo.exists() or not any(repo.iterdir()))
