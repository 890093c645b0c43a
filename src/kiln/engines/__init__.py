"""Backends that run a model: ONNX Runtime, PyTorch, and more through the same registry."""

from kiln.engines.base import (
    Engine,
    EngineOptions,
    Precision,
    available_engines,
    get_engine,
    load_engine,
    register,
)

__all__ = [
    "Engine",
    "EngineOptions",
    "Precision",
    "available_engines",
    "get_engine",
    "load_engine",
    "register",
]
