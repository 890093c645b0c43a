"""Optimize: passes (graph, precision, int8, compile), accuracy checks, and the search that picks the
fastest variant within an accuracy budget. Entry point: :func:`optimize` with an :class:`OptimizeConfig`.

``kiln.optimize`` is both this package and the entry function: once any ``kiln.optimize.*`` module is
imported Python binds the package to that name on ``kiln``, so the package is made callable and
``kiln.optimize(repo, model, config)`` works either way.
"""

import sys
import types
from typing import Any

from kiln.optimize.config import PRESETS, OptimizeConfig, PassStep, Recipe
from kiln.optimize.search import OptimizeResult, VariantResult, optimize

__all__ = ["PRESETS", "OptimizeConfig", "OptimizeResult", "PassStep", "Recipe", "VariantResult", "optimize"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> OptimizeResult:
        return optimize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
