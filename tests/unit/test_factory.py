from __future__ import annotations

from pathlib import Path

import pytest

from kiln.convert.factory import is_factory_path, resolve
from kiln.errors import InvalidSourceError


def test_resolves_module_and_file_paths(tmp_path: Path) -> None:
    from tests.fixtures import tiny_models

    assert resolve("tests.fixtures.tiny_models:mlp") is tiny_models.mlp
    script = tmp_path / "my_model.py"
    script.write_text("def build():\n    return 'built'\n")
    assert resolve(f"{script}:build")() == "built"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("no_such_pkg.models:build", "module 'no_such_pkg' was not found"),
        ("tests.fixtures.tiny_models:missing", "has no attribute 'missing'"),
        ("/nowhere/model.py:build", "does not exist"),
        ("not a factory", "factory path"),
    ],
)
def test_bad_factory_paths_say_what_failed(source: str, message: str) -> None:
    with pytest.raises(InvalidSourceError, match=message):
        resolve(source)


def test_script_that_raises_is_reported(tmp_path: Path) -> None:
    script = tmp_path / "bad.py"
    script.write_text("raise ValueError('boom')\n")
    with pytest.raises(InvalidSourceError, match="ValueError: boom"):
        resolve(f"{script}:build")


def test_factory_path_detection() -> None:
    assert is_factory_path("pkg.mod:fn")
    assert is_factory_path("models/net.py:build")
    assert not is_factory_path("model.onnx")
    assert not is_factory_path("C:model weights")
