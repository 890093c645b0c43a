"""``kiln.load``: a model version from the repository, on an engine, behind input validation."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.engines.base import Engine, EngineOptions, Precision, load_engine
from kiln.errors import InputError
from kiln.repository import Repository
from kiln.spec import ModelSpec


class Predictor:
    """Runs a loaded model: ``predict(array)`` or ``predict({name: array})`` returns ``{output: array}``."""

    def __init__(self, spec: ModelSpec, engine: Engine, version: int, path: Path) -> None:
        self.spec = spec
        self.engine = engine
        self.version = version
        self.path = path

    def __repr__(self) -> str:
        return f"Predictor({self.spec.name!r}, version={self.version}, engine={self.engine.name!r})"

    def as_feed(self, inputs: Mapping[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
        if isinstance(inputs, np.ndarray):
            if len(self.spec.inputs) != 1:
                names = [t.name for t in self.spec.inputs]
                raise InputError("<array>", "form", f"a dict with inputs {names}", "a single array")
            return {self.spec.inputs[0].name: inputs}
        if not isinstance(inputs, Mapping):
            raise InputError("<inputs>", "type", "a numpy array or a dict of arrays", type(inputs).__name__)
        return dict(inputs)

    def predict(self, inputs: Mapping[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
        feed = self.as_feed(inputs)
        self.spec.validate_inputs(feed)
        return self.engine.run(feed)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(
    repo: str | Path | Repository,
    model: str,
    *,
    version: int | None = None,
    engine: str = "onnxruntime",
    device: str = "cpu",
    precision: Precision = "fp32",
    threads: int | None = None,
    **extra: Any,
) -> Predictor:
    """Load ``model`` (latest version unless ``version``) from ``repo`` on ``engine``."""
    repository = repo if isinstance(repo, Repository) else Repository(repo)
    spec = repository.spec(model)
    number, vdir = repository.resolve(model, version)
    options = EngineOptions(device=device, precision=precision, intra_op_threads=threads, extra=extra)
    return Predictor(spec, load_engine(engine, vdir, spec, options), number, vdir)
