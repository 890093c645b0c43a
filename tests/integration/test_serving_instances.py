"""Instances in a child process (for engines that hold the GIL) give the same answers as in process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.errors import NotFoundError
from kiln.execution.instances import ProcessEngine
from tests import models


def test_process_instance_matches_in_process_predict_and_reports_errors(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    kiln.import_model(models.add_model(tmp_path / "add.onnx", const=3.0), repo, name="add")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with kiln.load(repo, "add") as p:
        want = p.predict({"x": x})
    engine = ProcessEngine(kiln.Repository(repo).variant("add", 1, "chosen"), threads=1)
    try:
        assert engine.variant == "reference"
        np.testing.assert_array_equal(engine.run({"x": x})["y"], want["y"])
        with pytest.raises(Exception, match="x"):
            engine.run({"nope": x})  # the child's error crosses the pipe
        np.testing.assert_array_equal(engine.run({"x": x + 1})["y"], want["y"] + 1)  # and it keeps serving
    finally:
        engine.close()
    with pytest.raises(NotFoundError, match="no version 5"):
        ProcessEngine(kiln.Repository(repo).variant("add", 5, "chosen"), threads=1)
