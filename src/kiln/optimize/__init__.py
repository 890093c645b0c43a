"""Optimize: passes (graph, precision, int8, compile), accuracy checks, and the search that picks the
fastest variant within an accuracy budget.

The entry function is :func:`kiln.optimize` (:func:`kiln.optimize.search.optimize`) with an
:class:`kiln.optimize.config.OptimizeConfig`. This package imports nothing, so that ``import kiln``
stays cheap.
"""
