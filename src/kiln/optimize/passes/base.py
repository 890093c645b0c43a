"""The pass registry and what a pass is given and gives back."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import NotFoundError
from kiln.optimize.data import Samples
from kiln.spec import ModelSpec

# Modules whose import registers passes; imported on first lookup so that `import kiln` stays cheap.
_PASS_MODULES = (
    "kiln.optimize.passes.graph",
    "kiln.optimize.passes.quantize",
    "kiln.optimize.passes.qat",
    "kiln.optimize.passes.compress",
)


@dataclass
class PassContext:
    """What a pass may read: the work directory holding the artifact, the spec, calibration data; for the
    passes that fine-tune, the model's source (its factory), the version directory (the imported weights),
    training and validation samples, a time budget and a progress hook."""

    work: Path
    spec: ModelSpec
    calibration: list[dict[str, np.ndarray]] | None = None  # batches, each {input name: array}
    device: str = "cpu"
    source: str = ""  # the manifest's source: a factory 'module:callable' when imported from PyTorch code
    version_dir: Path | None = None
    train: Samples | None = None  # inputs with optional labels
    validation: Samples | None = None
    train_budget_s: float = 120.0
    progress: Callable[[str], None] = field(default=lambda what: None)


@dataclass
class PassReport:
    """What a pass did, for ``figures.json``: node counts before and after, what it quantized."""

    name: str
    seconds: float = 0.0
    nodes_before: int | None = None
    nodes_after: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PassFn = Callable[[PassContext, dict[str, Any]], PassReport]
_PASSES: dict[str, PassFn] = {}


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    def deco(fn: PassFn) -> PassFn:
        _PASSES[name] = fn
        return fn

    return deco


def _load_builtin() -> None:
    for module in _PASS_MODULES:
        importlib.import_module(module)


def known_passes() -> list[str]:
    _load_builtin()
    return sorted(_PASSES)


def get_pass(name: str) -> PassFn:
    _load_builtin()
    if name not in _PASSES:
        raise NotFoundError("pass", name, known_passes())
    return _PASSES[name]


def run_passes(steps: Sequence[Any], ctx: PassContext) -> list[PassReport]:
    """Run ``steps`` (each with ``name`` and ``params``) in order on ``ctx.work``."""
    reports = []
    for step in steps:
        fn = get_pass(step.name)
        start = time.perf_counter()
        report = fn(ctx, dict(step.params))
        report.seconds = round(time.perf_counter() - start, 3)
        reports.append(report)
    return reports


def onnx_node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def op_histogram(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
