"""kiln: take a model trained offline and turn it into fast, reliable online inference.

The road is import → optimize → bench → serve; each stage reads the model repository on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

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

if TYPE_CHECKING:
    from kiln.bench import BenchConfig, bench
    from kiln.convert import ImportConfig, import_model
    from kiln.errors import KilnError
    from kiln.optimize import OptimizeConfig, optimize
    from kiln.predictor import Predictor, load
    from kiln.repository import Repository
    from kiln.serving import serve
    from kiln.spec import ModelSpec

_LAZY = {
    "BenchConfig": "kiln.bench",
    "bench": "kiln.bench",
    "ImportConfig": "kiln.convert",
    "import_model": "kiln.convert",
    "KilnError": "kiln.errors",
    "OptimizeConfig": "kiln.optimize",
    "optimize": "kiln.optimize",
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

        module = importlib.import_module(_LAZY[name])
        # ``bench`` and ``optimize`` are stages (subpackages) and entry functions at once: importing the
        # subpackage binds it here, callable (see _callable_package), so every access returns the same object.
        return globals()[name] if name in globals() else getattr(module, name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")


def _callable_package(package: str, entry: Callable[..., Any]) -> None:
    """Make the package module ``package`` callable as ``entry``.

    ``kiln.optimize`` and ``kiln.bench`` are both a stage's package and its entry function: once any
    ``kiln.<stage>.*`` module is imported, Python binds the package to that name on ``kiln``, so the
    package itself must answer ``kiln.<stage>(...)``.
    """
    import sys
    import types

    module = sys.modules[package]

    class CallablePackage(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return entry(*args, **kwargs)

    CallablePackage.__name__ = CallablePackage.__qualname__ = f"CallablePackage[{package}]"
    module.__class__ = CallablePackage
