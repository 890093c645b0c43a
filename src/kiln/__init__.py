"""kiln: take a model trained offline and turn it into fast, reliable online inference.

The road is import → optimize → bench → serve; each stage reads the model repository on disk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# ``kiln.optimize`` and ``kiln.bench`` name both a stage's package and its entry function. Python binds a
# package to its parent's attribute once, when the package is first imported; importing both (light: no
# imports of their own) here, before the functions below are defined, means the functions are what
# ``kiln.optimize`` / ``kiln.bench`` stay bound to, whichever submodules are imported later.
from kiln import bench as _bench_package  # noqa: F401
from kiln import optimize as _optimize_package  # noqa: F401
from kiln._version import __version__ as __version__

if TYPE_CHECKING:
    from pathlib import Path

    from kiln.bench.config import BenchConfig
    from kiln.bench.results import BenchResult
    from kiln.console import ProgressHook
    from kiln.convert import ImportConfig, import_model
    from kiln.errors import KilnError
    from kiln.optimize.config import OptimizeConfig
    from kiln.optimize.search import OptimizeResult
    from kiln.predictor import Predictor, load
    from kiln.repository import Repository
    from kiln.serving import serve
    from kiln.spec import ModelSpec

__all__ = [
    "BenchConfig",
    "ImportConfig",
    "KilnError",
    "ModelSpec",
    "OptimizeConfig",
    "Predictor",
    "Repository",
    "bench",
    "import_model",
    "load",
    "optimize",
    "serve",
]

_LAZY = {
    "BenchConfig": "kiln.bench.config",
    "ImportConfig": "kiln.convert",
    "import_model": "kiln.convert",
    "KilnError": "kiln.errors",
    "OptimizeConfig": "kiln.optimize.config",
    "Predictor": "kiln.predictor",
    "load": "kiln.predictor",
    "Repository": "kiln.repository",
    "serve": "kiln.serving",
    "ModelSpec": "kiln.spec",
}


def __getattr__(name: str) -> Any:
    # Importing kiln must stay cheap (the CLI starts on it); torch and onnx load on first use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")


def optimize(
    repo: str | Path | Repository,
    model: str,
    config: OptimizeConfig | None = None,
    *,
    version: int | None = None,
    progress: ProgressHook | None = None,
    **overrides: Any,
) -> OptimizeResult:
    """Search the variants of ``model`` for the fastest within the accuracy budget and record it.

    ``overrides`` are :class:`~kiln.optimize.config.OptimizeConfig` fields that override ``config``:
    ``kiln.optimize(repo, "digits", preset="quick", max_drop=0.005)``. See :func:`kiln.optimize.search.optimize`.
    """
    from kiln.optimize.search import optimize as run

    return run(repo, model, config, version=version, progress=progress, **overrides)


def bench(
    repo: str | Path | Repository,
    model: str,
    config: BenchConfig | None = None,
    *,
    version: int | None = None,
    progress: ProgressHook | None = None,
    **options: Any,
) -> BenchResult:
    """Measure ``model``'s variants in-process; Ctrl-C stops early and returns what was measured.

    ``options`` are :class:`~kiln.bench.config.BenchConfig` fields that override ``config``:
    ``kiln.bench(repo, "digits", batch_sizes=[1, 8], scenarios=["server"])``. See :func:`kiln.bench.runner.bench`.
    """
    from kiln.bench.runner import bench as run

    return run(repo, model, config, version=version, progress=progress, **options)
