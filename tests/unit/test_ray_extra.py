"""Without kiln[ray], ``--ray`` fails with one line naming the extra; the spec's Ray settings are checked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

import kiln
from kiln.cli import main
from kiln.spec import RayServing
from tests import models


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "ray" or n.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "{repo}", "--ray", "--http-port", "0", "--grpc-port", "-1"],
        ["serve", "{repo}", "--emit-config", "{tmp}/serve.yaml"],
        ["serve", "{repo}", "--ray-address", "auto", "--http-port", "0"],
    ],
)
def test_ray_without_the_extra_is_one_line_naming_it(
    no_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    repo = tmp_path / "repo"
    kiln.import_model(models.add_model(tmp_path / "add.onnx"), repo, name="add")
    with pytest.raises(SystemExit) as exit_:
        main([a.format(repo=repo, tmp=tmp_path) for a in args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "kiln-inference[ray]" in err and "Traceback" not in err, err
    assert not (tmp_path / "serve.yaml").exists()


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
        ({"initial_replicas": 5}, "initial_replicas"),
        ({"target_ongoing_requests": 0}, "target_ongoing_requests"),
        ({"replicas": 2}, "replicas"),
    ],
)
def test_ray_settings_name_the_bad_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        RayServing.model_validate(fields)
