"""kiln: take a model trained offline and turn it into fast, reliable online inference.

The road is import → optimize → bench → serve; each stage reads the model repository on disk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ImportConfig",
    "KilnError",
    "ModelSpec",
    "OptimizeConfig",
    "Predictor",
    "Repository",
    "import_model",
    "load",
    "optimize",
]

if TYPE_CHECKING:
    from kiln.convert import ImportConfig, import_model
    from kiln.errors import KilnError
    from kiln.optimize import OptimizeConfig, optimize
    from kiln.predictor import Predictor, load
    from kiln.repository import Repository
    from kiln.spec import ModelSpec

_LAZY = {
    "ImportConfig": "kiln.convert",
    "import_model": "kiln.convert",
    "KilnError": "kiln.errors",
    "OptimizeConfig": "kiln.optimize",
    "optimize": "kiln.optimize",
    "Predictor": "kiln.predictor",
    "load": "kiln.predictor",
    "Repository": "kiln.repository",
    "ModelSpec": "kiln.spec",
}


def __getattr__(name: str) -> Any:
    # Importing kiln must stay cheap (the CLI starts on it); torch and onnx load on first use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
