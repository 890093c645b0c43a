"""Optimize: passes (graph, precision, int8, compile), accuracy checks, and the search that picks the
fastest variant within an accuracy budget. Entry point: :func:`optimize` with an :class:`OptimizeConfig`.

``kiln.optimize`` is both this package and the entry function: the package is made callable
(``kiln._callable_package``), so ``kiln.optimize(repo, model, config)`` works either way.
"""

from kiln import _callable_package
from kiln.optimize.config import PRESETS, OptimizeConfig, PassStep, Recipe
from kiln.optimize.search import OptimizeResult, VariantResult, optimize

__all__ = ["PRESETS", "OptimizeConfig", "OptimizeResult", "PassStep", "Recipe", "VariantResult", "optimize"]

_callable_package(__name__, optimize)
