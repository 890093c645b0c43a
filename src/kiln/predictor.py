"""``kiln.load``: a model version from the repository, on an engine, behind input validation."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.engines.base import Engine, EngineOptions, Precision, load_engine
from kiln.errors import InputError
from kiln.repository import RECIPE_FILE, VARIANTS_DIR, Repository, read_recipe
from kiln.spec import ModelSpec


class Predictor:
    """Runs a loaded model: ``predict(array)`` or ``predict({name: array})`` returns ``{output: array}``."""

    def __init__(self, spec: ModelSpec, engine: Engine, version: int, path: Path, variant: str = "reference") -> None:
        self.spec = spec
        self.engine = engine
        self.version = version
        self.path = path
        self.variant = variant

    def __repr__(self) -> str:
        return (
            f"Predictor({self.spec.name!r}, version={self.version}, variant={self.variant!r}, "
            f"engine={self.engine.name!r})"
        )

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


REFERENCE = "reference"
CHOSEN = "chosen"


def load(
    repo: str | Path | Repository,
    model: str,
    *,
    version: int | None = None,
    variant: str | None = None,
    engine: str | None = None,
    device: str | None = None,
    precision: Precision | None = None,
    threads: int | None = None,
    **extra: Any,
) -> Predictor:
    """Load ``model`` (latest version unless ``version``) from ``repo``.

    ``variant`` picks what runs: ``"reference"`` (the imported fp32 artifact), ``"chosen"`` (what
    ``kiln optimize`` chose, falling back to the reference when there is none), or a variant id.
    The default is ``"chosen"`` unless ``engine`` or ``precision`` is given, which asks for the
    reference artifact on that engine and precision. ``device`` defaults to where the optimizer measured
    the variant (its recipe's device), and to the CPU for the reference.
    """
    repository = repo if isinstance(repo, Repository) else Repository(repo)
    spec = repository.spec(model)
    number, vdir = repository.resolve(model, version)
    if variant is None:
        variant = REFERENCE if engine is not None or precision is not None else CHOSEN
    if variant == CHOSEN:
        chosen = spec.chosen_variant
        variant = chosen if chosen and (vdir / VARIANTS_DIR / chosen / RECIPE_FILE).is_file() else REFERENCE
    if variant == REFERENCE:
        options = EngineOptions(device=device or "cpu", precision=precision or "fp32", intra_op_threads=threads,
                                extra=extra)  # fmt: skip
        return Predictor(spec, load_engine(engine or "onnxruntime", vdir, spec, options), number, vdir)
    recipe = read_recipe(vdir / VARIANTS_DIR / variant, model, number)
    options = EngineOptions(
        device=device or recipe.device,
        precision=precision or recipe.precision,
        intra_op_threads=threads,
        extra={**recipe.options, **extra},
    )
    vpath = vdir / VARIANTS_DIR / variant
    return Predictor(spec, load_engine(engine or recipe.engine, vpath, spec, options), number, vpath, variant)
