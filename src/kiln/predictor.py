"""``kiln.load``: a model version from the repository, on an engine, behind input validation."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.engines.base import Engine, EngineOptions, Precision, load_engine
from kiln.engines.routed import BatchRoutedEngine
from kiln.errors import InputError
from kiln.repository import CHOSEN, REFERENCE, Repository, Variant
from kiln.spec import InputCheck, ModelSpec


class Predictor:
    """Runs a loaded model: ``predict(array)`` or ``predict({name: array})`` returns ``{output: array}``."""

    def __init__(self, variant: Variant, engine: Engine) -> None:
        self.handle = variant
        self.spec: ModelSpec = variant.spec
        self.engine = engine
        self.version = variant.version
        self.path: Path = variant.path
        self.variant = variant.id  # the variant's id, or 'reference'
        self._check = InputCheck(self.spec)
        self._single = self.spec.inputs[0].name if len(self.spec.inputs) == 1 else None
        self._run = engine.run

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
        # The hot path: a precomputed check and the engine's bound run, nothing rebuilt per call.
        feed: Any = {self._single: inputs} if self._single is not None and type(inputs) is np.ndarray else inputs
        if not self._check.passes(feed):
            feed = self.as_feed(inputs)
            self.spec.validate_inputs(feed)
        return self._run(feed)

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
    variant: str | Variant | None = None,
    engine: str | None = None,
    device: str | None = None,
    precision: Precision | None = None,
    threads: int | None = None,
    batch_sizes: tuple[int, ...] = (),
    **run: Any,
) -> Predictor:
    """Load ``model`` (latest version unless ``version``) from ``repo``.

    ``variant`` picks what runs: ``"reference"`` (the imported fp32 artifact), ``"chosen"`` (what
    ``kiln optimize`` chose, falling back to the reference when there is none), a variant id, or a
    :class:`~kiln.repository.Variant` handle. The default is ``"chosen"`` unless ``engine`` or ``precision``
    is given, which asks for the reference artifact on that engine and precision. ``device`` defaults to
    where the optimizer measured the variant (its recipe's device), and to the CPU for the reference.
    ``batch_sizes``: the batch sizes you will mostly run, which an engine may compile as static shapes
    (OpenVINO does; default batch 1 and the serving preferred sizes); every other size still runs.
    ``run`` adds engine run options (checked against the engine's options model).
    """
    if isinstance(variant, Variant):
        handle = variant
    else:
        repository = repo if isinstance(repo, Repository) else Repository(repo)
        if variant is None:
            variant = REFERENCE if engine is not None or precision is not None else CHOSEN
        handle = repository.variant(model, version, variant)
    return open_variant(handle, engine=engine, device=device, precision=precision, threads=threads,
                        batch_sizes=batch_sizes, **run)  # fmt: skip


def open_variant(
    variant: Variant,
    *,
    engine: str | None = None,
    device: str | None = None,
    precision: Precision | None = None,
    threads: int | None = None,
    batch_sizes: tuple[int, ...] = (),
    **run: Any,
) -> Predictor:
    """Load the variant a :class:`~kiln.repository.Variant` handle names (see :func:`load`). The chosen
    variant's partner for large batches (``variant.large``), when the optimizer measured one, is loaded
    beside it unless ``engine``, ``precision`` or run options ask for something else."""
    options = EngineOptions(
        device=device or variant.device,
        precision=precision or variant.precision,
        intra_op_threads=threads,
        run={**variant.options, **run},
        batch_sizes=tuple(batch_sizes),
    )
    loaded = load_engine(engine or variant.engine, variant.path, variant.spec, options)
    large = variant.large
    if large is None or engine is not None or precision is not None or run:
        return Predictor(variant, loaded)
    try:
        big = EngineOptions(
            device=device or large.device, precision=large.precision, intra_op_threads=threads,
            run=large.options, batch_sizes=tuple(n for n in batch_sizes if n >= variant.large_from),
        )  # fmt: skip
        partner = load_engine(large.engine, large.path, large.spec, big)
    except BaseException:
        loaded.close()
        raise
    return Predictor(variant, BatchRoutedEngine(loaded, partner, variant.large_from))
